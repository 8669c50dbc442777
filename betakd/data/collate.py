"""Collation: one batch per model from the same conversations, padded, with what the
teacher sources and the trainer need to know about it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from betakd.data.encoding import Encoded, SampleEncoder
from betakd.data.records import Conversation, DataError, SkipSample
from betakd.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Collation


def pad_encoded(
    samples: Sequence[Encoded], encoder: SampleEncoder, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded samples into one model's batch."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), width), encoder.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = sample.input_ids
        labels[row, span] = sample.labels
        attention[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    batch.update(encoder.adapter.collate_vision([s.vision for s in samples]))
    batch.update(encoder.adapter.extra_inputs(input_ids))
    return batch


class KDCollator:
    """Collates raw conversations into a student batch and, optionally, a teacher batch.

    Output: the student's model inputs and `labels` at the top level (so the
    Trainer sees them), each teacher's batch under "teacher", by teacher name (None:
    the single teacher; absent without teacher encoders), and per-sample metadata:
    `sample_index` (row in the data file), `sample_ids`, `image_counts` and the
    `conversations` themselves (a source that reads the text, a served teacher, takes
    them from there).

    ``on_collate(conversations, batch)``, when given, hears of every batch the data
    loader collates (a served teacher sends its requests then: the loader collates a
    batch ahead of the one the step computes); :meth:`collate` with ``announce=False``
    does not call it (a batch no teacher will score with the data's answers).
    """

    def __init__(
        self,
        student: SampleEncoder,
        teachers: Mapping[str | None, SampleEncoder] | None = None,
        *,
        student_padding_side: str = "right",
        teacher_padding_side: str = "right",
        on_collate: Callable[[Sequence[Conversation], dict], None] | None = None,
    ):
        self.student = student
        self.teachers = dict(teachers or {})
        self.student_padding_side = student_padding_side
        self.teacher_padding_side = teacher_padding_side
        self.on_collate = on_collate

    def _encode_all(self, encoder: SampleEncoder, conversations) -> list[Encoded]:
        encoded = []
        for conversation in conversations:
            try:
                encoded.append(encoder.encode_cached(conversation))
            except SkipSample as skip:
                # Validation accepted this sample, so this is a changed file or a misconfiguration.
                raise DataError(
                    f"sample {conversation.id} passed validation but now fails: {skip}"
                ) from skip
        return encoded

    def _teacher_batch(self, encoder: SampleEncoder, conversations) -> dict:
        encoded = self._encode_all(encoder, conversations)
        batch = pad_encoded(encoded, encoder, self.teacher_padding_side)
        # The teacher's own pieces: tile counts differ between families.
        batch["image_counts"] = image_counts(encoded)
        return batch

    def __call__(self, conversations: Sequence[Conversation]) -> dict:
        return self.collate(conversations)

    def collate(self, conversations: Sequence[Conversation], *, announce: bool = True) -> dict:
        encoded = self._encode_all(self.student, conversations)
        batch = pad_encoded(encoded, self.student, self.student_padding_side)
        if self.teachers:
            batch["teacher"] = {
                name: self._teacher_batch(encoder, conversations)
                for name, encoder in self.teachers.items()
            }
        batch["sample_index"] = torch.tensor([c.index for c in conversations], dtype=torch.long)
        batch["sample_ids"] = [c.id for c in conversations]
        batch["conversations"] = list(conversations)
        batch["image_counts"] = image_counts(encoded)
        if announce and self.on_collate is not None:
            self.on_collate(conversations, batch)
        return batch


def image_counts(encoded: Sequence[Encoded]) -> torch.Tensor:
    """Each sample's visual pieces ``[B]`` (see :class:`Encoded`)."""
    return torch.tensor([e.image_count for e in encoded], dtype=torch.long)
