"""Where the teacher's supervision comes from: a frozen model run online (or, later, a cache).

A teacher source turns a teacher batch and the aligned positions into
:class:`TeacherTargets`: the teacher logits at the aligned positions, its visual tokens,
and the representation ``h(x)`` that an instance weighting sees. Everything it returns
is detached; the teacher never receives gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from betakd import align
from betakd.align import AlignedPositions
from betakd.chunked import LinearTeacher
from betakd.models import FamilyAdapter, forward_inputs, slice_vocab


@dataclass
class TeacherTargets:
    """The teacher's side of one batch."""

    logits: Tensor | None  # [N, V] at the aligned teacher positions
    visual: list[Tensor] | None  # per sample [n_i, d_teacher]
    representation: Tensor | None  # [B, D], detached float32
    # Chunked mode: the teacher's final hidden states at the aligned positions and its
    # lm_head, so that logits are only ever built a chunk at a time.
    logit_source: LinearTeacher | None = None


class OnlineTeacher:
    """A frozen teacher model run on every step, under ``torch.no_grad``.

    It is deliberately not an ``nn.Module`` attribute of the trained module, so that
    DDP/FSDP never wrap it as something to train.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        *,
        vocab_rows: int,
        need_logits: bool,
        need_visual: bool,
        representation: str | None,
        chunked: bool = False,
    ) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.adapter = adapter
        self.vocab_rows = vocab_rows
        self.need_logits = need_logits
        self.need_visual = need_visual
        self.representation = representation
        self.chunked = chunked

    def prepare(self, accelerator) -> OnlineTeacher:
        """Place the frozen teacher for the engine in use, without making it trainable.

        DeepSpeed ZeRO-3 partitions it through an optimizer-less DeepSpeed engine (so no
        GPU holds the whole teacher), FSDP shards it in evaluation mode; otherwise it moves
        to the device.
        """
        kind = accelerator.distributed_type.value
        if kind == "DEEPSPEED" and _zero_stage(accelerator) == 3:
            self.model = _deepspeed_inference_engine(self.model, accelerator)
        elif kind == "FSDP":
            self.model = accelerator.prepare_model(self.model, evaluation_mode=True)
        else:
            self.model.to(accelerator.device)
        return self

    @torch.no_grad()
    def __call__(
        self, batch: dict, aligned: AlignedPositions, image_counts: Sequence[int]
    ) -> TeacherTargets:
        if not (self.need_logits or self.need_visual or self.representation):
            return TeacherTargets(None, None, None)  # CE only: the teacher has nothing to add
        if self.chunked:
            return self._chunked_targets(batch, aligned, image_counts)
        wants_hidden = self.representation == "teacher_answer_hidden"
        out = self.model(**forward_inputs(batch, self.adapter), output_hidden_states=wants_hidden)
        logits = slice_vocab(aligned.teacher(out.logits), self.vocab_rows)
        visual = None
        if self.need_visual or self.representation == "teacher_visual":
            visual = [v.detach() for v in self.adapter.visual_tokens(out, image_counts)]
        return TeacherTargets(
            logits=logits if self.need_logits or self.representation else None,
            visual=visual if self.need_visual else None,
            representation=self._representation(out, logits, visual, aligned),
        )

    def _chunked_targets(self, batch, aligned, image_counts) -> TeacherTargets:
        # Only the last position's logits are built by the model; the energies get the
        # hidden states and lm_head and build logits a chunk at a time.
        out = self.model(
            **forward_inputs(batch, self.adapter), output_hidden_states=True, logits_to_keep=1
        )
        hidden = aligned.teacher(out.hidden_states[-1]).detach()
        head = self.model.get_output_embeddings()
        source = LinearTeacher(hidden, head.weight, head.bias)
        visual = None
        if self.need_visual or self.representation == "teacher_visual":
            visual = [v.detach() for v in self.adapter.visual_tokens(out, image_counts)]
        representation = None
        if self.representation is not None:
            representation = align.instance_representation(
                self.representation,
                aligned=aligned,
                teacher_visual=visual,
                teacher_hidden=out.hidden_states[-1],
                teacher_logits=(
                    source.logits(0, source.num_tokens, self.vocab_rows)
                    if self.representation == "teacher_confidence"
                    else None
                ),
            )
        return TeacherTargets(None, visual if self.need_visual else None, representation, source)

    def _representation(
        self, out, logits: Tensor, visual: list[Tensor] | None, aligned: AlignedPositions
    ) -> Tensor | None:
        if self.representation is None:
            return None
        hidden = out.hidden_states[-1] if out.hidden_states is not None else None
        return align.instance_representation(
            self.representation,
            aligned=aligned,
            teacher_visual=visual,
            teacher_hidden=hidden,
            teacher_logits=logits,
        )


def _zero_stage(accelerator) -> int:
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _deepspeed_inference_engine(model: nn.Module, accelerator):
    import deepspeed

    train_config = accelerator.state.deepspeed_plugin.deepspeed_config
    config = {
        "train_micro_batch_size_per_gpu": train_config.get("train_micro_batch_size_per_gpu", 1),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": train_config.get("bf16", {"enabled": False}),
        "fp16": train_config.get("fp16", {"enabled": False}),
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
