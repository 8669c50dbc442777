"""What betakd runs on of accelerate's engines, checked when a run is built."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The run asks for an engine that accelerate does not run it with."""


def check_engine(trainer, on_policy: bool) -> None:
    """Refuse what accelerate would quietly run otherwise, or what betakd cannot run:
    FSDP asked for where accelerate runs data parallel (it enables FSDP on GPUs and
    other accelerators only), and a student generating its answers while its
    parameters are sharded (FSDP, DeepSpeed ZeRO-3). ``trainer``: a built
    ``transformers.Trainer``."""
    if trainer.args.fsdp and not trainer.is_fsdp_enabled:
        raise EngineError(
            "training.fsdp is set, but accelerate runs this job as "
            f"{trainer.accelerator.distributed_type.value} (it enables FSDP on GPUs and "
            "other accelerators, not on CPUs): remove training.fsdp to train data "
            "parallel, or run on GPUs"
        )
    zero_3 = (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if on_policy and (trainer.is_fsdp_enabled or zero_3):
        raise EngineError(
            "policy.mode: the student generates its answers with its full parameters, "
            "which FSDP and DeepSpeed ZeRO-3 shard; betakd does not gather them for "
            "generation yet: use DDP or ZeRO-1/2, or policy.mode: off_policy"
        )
