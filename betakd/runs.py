"""One training run in its output folder: refuse to mix two runs there, resume one,
train it and save the student in the standard format (``betakd train``'s work, and the
demo's)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.checkpoints import last_complete_checkpoint, save_student_and_head
from betakd.data import DataCache, SkipReport
from betakd.files import write_json_atomic
from betakd.trainer import BetaKDTrainer

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "betakd_config.yaml"
# What a resumed run may change: how long it runs and what it logs or saves, never what
# it learns from (models, data, channels, weighting, optimisation).
RESUMABLE_KEYS = frozenset({"schedule.restart_at"}) | frozenset(
    f"training.{key}"
    for key in (
        "output_dir",  # a copied or moved run folder resumes where it now is
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "logging_strategy",
        "logging_dir",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "report_to",
        "run_name",
        "disable_tqdm",
    )
)


class OutputDirError(RuntimeError):
    """The output directory holds another run."""


SKIPPED_FILE = "betakd_skipped.json"


@dataclass
class TrainResult:
    output_dir: Path
    skips: SkipReport
    log_history: list[dict]
    trainer: BetaKDTrainer


def check_output_dir(output_dir: Path, config: cfg.TrainConfig, resume: bool) -> None:
    """Refuse to mix two runs in one folder; only the same run may be resumed there."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        if resume:
            raise OutputDirError(f"--resume: {output_dir} holds no run to resume")
        return
    resolved = output_dir / RESOLVED_CONFIG
    if not resume:
        raise OutputDirError(
            f"output directory {output_dir} is not empty (it holds another run); pass --resume "
            "to continue a run there, or choose another training.output_dir"
        )
    if not resolved.is_file():
        raise OutputDirError(f"--resume: {output_dir} holds no betakd run ({RESOLVED_CONFIG})")
    previous = cfg.validate(yaml.safe_load(resolved.read_text()), source=str(resolved))
    refused = [
        key
        for key in changed_keys(previous.model_dump(), config.model_dump())
        if key not in RESUMABLE_KEYS
    ]
    if refused:
        raise OutputDirError(
            f"--resume: {output_dir} holds a run with another config ({resolved}): "
            f"{', '.join(refused)} changed; a resumed run may change only "
            f"{', '.join(sorted(RESUMABLE_KEYS))}: resume it with the same settings or "
            "choose another training.output_dir"
        )


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (lists compared whole)."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += changed_keys(a, b, prefix=f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


def run_training(
    config: cfg.TrainConfig,
    *,
    resume: bool = False,
    sample_groups: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    data_cache: DataCache | None = None,
) -> TrainResult:
    """Train, save the student (standard format) and the head, return the log history.

    ``data_cache``: see :func:`build_trainer`."""
    args = training_arguments(config)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, config, resume)
    trainer = build_trainer(
        config, args, sample_groups=sample_groups, callbacks=callbacks, data_cache=data_cache
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_world_process_zero():
        cfg.dump(config, output_dir / RESOLVED_CONFIG)
        write_json_atomic(output_dir / SKIPPED_FILE, trainer.train_dataset.report.as_dict())
    resume_from = last_complete_checkpoint(output_dir) if resume else None
    if resume_from is not None:
        _explain_an_extension(resume_from, trainer, config.schedule.restart_at)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    save_final(trainer, output_dir)
    # Every process returns once the saved student exists: one that reached its exit
    # while another was still saving could abort in the distributed teardown.
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output_dir, trainer.train_dataset.report, trainer.state.log_history, trainer)


def _explain_an_extension(checkpoint: Path, trainer: BetaKDTrainer, restart_at: int | None) -> None:
    """Say what a resumed run with another length does to the learning rate."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step, planned, now = state["global_step"], state["max_steps"], trainer.args.max_steps
    if now <= 0 or now == planned:
        return
    if restart_at is None:
        logger.warning(
            "resuming at step %d a run planned for %d steps, now %d: the learning rate "
            "follows the schedule planned for %d steps from step %d on (after a finished "
            "decay it jumps back up). For a fresh warmup and decay over the added steps, "
            "resume with --set schedule.restart_at=%d",
            step, planned, now, now, step + 1, step,
        )  # fmt: skip
    else:
        logger.info(
            "resuming at step %d: the learning-rate schedule restarts after step %d and "
            "spans the steps up to %d",
            step, restart_at, now,
        )  # fmt: skip


def save_final(trainer: BetaKDTrainer, output_dir: Path) -> None:
    """The student as a standard model (LoRA merged), its processor, and the head."""
    student = trainer.distillation_module.student
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if trainer.is_world_process_zero():
        save_student_and_head(student, trainer.head, output_dir, processor=trainer.processing_class)


def release_processes() -> bool:
    """Destroy a multi-process run's process group (after its run); returns whether
    this process was one of several."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        return True
    return False


def exit_process() -> None:
    """End a finished multi-process run's process without the interpreter's teardown:
    torch.distributed's C++ state aborts it now and then at exit (SIGABRT, "terminate
    called without an active exception"), after everything is saved, which the launcher
    reports as a failed run. Output streams and logs are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
