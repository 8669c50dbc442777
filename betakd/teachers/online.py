"""A frozen teacher model run on every step (a :class:`~betakd.teachers.TeacherSource`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from betakd import align
from betakd.align import AlignedPositions, align_positions
from betakd.models import FamilyAdapter, forward_inputs, slice_vocab, with_image_outputs
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import DenseLogits, HiddenStateLogits


class OnlineTeacher:
    """A frozen teacher model, run under ``torch.no_grad`` on the teacher's own batch.

    It is deliberately not an ``nn.Module`` attribute of the trained module, so that
    DDP/FSDP never wrap it as something to train.

    Args:
        vocab_rows: the shared vocabulary size (logit columns beyond it are padding).
        need_logits / need_visual: what the channels use.
        representation: the instance weighting's ``h(x)`` (see
            :func:`betakd.align.instance_representation`), or None.
        chunk_size: None builds the teacher's ``[N, V]`` logits; a number keeps its
            final hidden states and ``lm_head`` instead, so logits only ever exist that
            many tokens at a time.
        student_adapter, include_prompt: align prompt positions too (needs both adapters
            to tell image tokens apart).
        reuse_images: keep the last batch's image tensor and the teacher's encoding of
            it, and reuse that encoding when the next batch holds the very same tensor
            (an on-policy step scores the data's answers and the student's for the same
            images); off, nothing is kept between batches.
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
        chunk_size: int | None = None,
        student_adapter: FamilyAdapter | None = None,
        include_prompt: bool = False,
        reuse_images: bool = False,
    ) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.adapter = adapter
        self.vocab_rows = vocab_rows
        self.need_logits = need_logits
        self.need_visual = need_visual
        self.representation = representation
        self.chunk_size = chunk_size
        self.student_adapter = student_adapter
        self.include_prompt = include_prompt
        self.reuse_images = reuse_images
        self._last_images: tuple[torch.Tensor, object] | None = None

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

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        teacher_batch, counts = _teacher_batch(meta)
        aligned = align_positions(
            student_batch,
            teacher_batch,
            student_adapter=self.student_adapter,
            teacher_adapter=self.adapter,
            include_prompt=self.include_prompt,
            sample_ids=meta.sample_ids,
        )
        return aligned, self.targets(teacher_batch, aligned, counts)

    def own_targets(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        """The teacher's targets for its own answer tokens (its batch aligned with itself):
        what a teacher of another tokenizer is aligned from by text."""
        teacher_batch, counts = _teacher_batch(meta)
        teacher = align_positions(teacher_batch, teacher_batch, sample_ids=meta.sample_ids)
        return teacher, self.targets(teacher_batch, teacher, counts)

    @torch.no_grad()
    def targets(
        self, teacher_batch: dict, aligned: AlignedPositions, image_counts: Sequence[int]
    ) -> TeacherTargets:
        """The teacher's targets at already aligned positions (the cache writer aligns the
        teacher batch with itself)."""
        if not (self.need_logits or self.need_visual or self.representation):
            return TeacherTargets(None, None, None)  # CE only: the teacher has nothing to add
        chunked = self.chunk_size is not None
        wants_hidden = chunked or self.representation == "teacher_answer_hidden"
        # Chunked: only the last position's logits are built by the model; the energies
        # get the hidden states and lm_head and build logits a chunk at a time.
        extra = {"logits_to_keep": 1} if chunked else {}
        inputs = forward_inputs(teacher_batch, self.adapter)
        images = inputs.get("pixel_values") if self.reuse_images else None
        last, self._last_images = self._last_images, None
        second_pass = images is not None and last is not None and last[0] is images
        if second_pass:  # encoded once for both passes; then nothing is kept
            inputs = with_image_outputs(inputs, last[1])
        out = self.model(**inputs, output_hidden_states=wants_hidden, **extra)
        if images is not None and not second_pass:
            self._last_images = (images, getattr(out, "image_outputs", None))
        if chunked:
            head = self.model.get_output_embeddings()
            hidden = aligned.teacher(out.hidden_states[-1]).detach()
            tokens = HiddenStateLogits(hidden, head.weight, head.bias)
        else:
            tokens = DenseLogits(slice_vocab(aligned.teacher(out.logits), self.vocab_rows))
        visual = None
        if self.need_visual or self.representation == "teacher_visual":
            visual = [v.detach() for v in self.adapter.visual_tokens(out, image_counts)]
        representation = None
        if self.representation is not None:
            representation = align.instance_representation(
                self.representation,
                aligned=aligned,
                teacher_visual=visual,
                teacher_hidden=out.hidden_states[-1] if wants_hidden else None,
                teacher_logits=tokens.values if not chunked else tokens,
                vocab_size=self.vocab_rows,
                chunk_size=self.chunk_size,
            )
        # The tokens come with the forward pass at no extra cost, so they are always
        # returned (a trust measured against the data reads them too).
        return TeacherTargets(tokens, visual if self.need_visual else None, representation)


def _teacher_batch(meta: BatchMeta) -> tuple[dict, list[int]]:
    """The teacher's own batch and its visual pieces per sample (tiles differ between
    families; the student's counts when the collator kept none)."""
    if meta.teacher_batch is None:
        raise ValueError(
            "the online teacher needs the teacher's batch: collate with the teacher's "
            "encoder (KDCollator(student, {None: teacher}))"
        )
    counts = meta.teacher_batch.get("image_counts")
    return meta.teacher_batch, meta.image_counts if counts is None else counts.tolist()


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
