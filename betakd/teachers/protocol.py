"""The teacher-source protocol: the one way the trainer obtains teacher supervision.

A teacher source gets a collated student batch and its :class:`BatchMeta` (sample ids,
rows in the data file, image counts and, when the collator built one, the teacher's
own batch) and returns the aligned positions (which student position predicts which
answer token, and where the teacher's target for it is) and the
:class:`TeacherTargets`. The trainer and :class:`~betakd.distill.DistillationModule`
call nothing else, so a new source (a served teacher, several teachers, a scorer of
student samples) needs no change to either.

Implementations: :class:`~betakd.teachers.online.OnlineTeacher` (a frozen model run on
every step), :class:`~betakd.teachers.cache_reader.CachedTeacher` (the offline cache)
and :class:`~betakd.teachers.ensemble.TeacherEnsemble` (several named sources at once).
Everything a source returns is detached: the teacher never receives gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from betakd.align import AlignedPositions
from betakd.chunked import TeacherLogits
from betakd.teachers.targets import GroupedTargets


@dataclass
class TeacherTargets:
    """The teacher's side of one batch."""

    # Per aligned token: logits for any range of rows (dense, hidden states + lm_head,
    # or top-k + tail); None when no logit channel needs them.
    tokens: TeacherLogits | None
    visual: list[Tensor] | None  # per sample [n_i, d_teacher]
    representation: Tensor | None  # [B, D], detached float32
    # Several teachers (betakd.teachers.ensemble): each one's targets by name; tokens and
    # visual are then None and representation is what the weighting sees.
    members: dict[str, TeacherTargets] | None = None
    # Per aligned token [N]: the teacher's exact log-probability of it, when the source
    # has it beside a top-k (a server returns it): the data trust's and the reliability's
    # NLL of the answer read it instead of the top-k rebuild's.
    answer_log_probs: Tensor | None = None
    # A teacher of another vocabulary (betakd.cross_tokenizer): its targets per group of
    # answer text; tokens is then None.
    groups: GroupedTargets | None = None

    def of(self, teacher: str | None) -> TeacherTargets:
        """The named teacher's targets; None names the one teacher of a single source."""
        if teacher is None and self.members is None:
            return self
        if teacher is None or self.members is None or teacher not in self.members:
            have = "one unnamed teacher" if self.members is None else sorted(self.members)
            raise KeyError(f"no targets of teacher {teacher!r}; the source has {have}")
        return self.members[teacher]


@dataclass
class BatchMeta:
    """What a teacher source gets besides the student batch."""

    sample_ids: Sequence[str]
    sample_index: Tensor  # [B] rows in the data file
    image_counts: list[int]
    # Each teacher's own encoding by teacher name (None: the single teacher), when the
    # collator made them; an ensemble hands each member its own as the single one.
    teacher_batches: dict = field(default_factory=dict)
    # The batch's samples as collated (text, images, metadata), when the collator kept them.
    conversations: Sequence | None = None
    # The rows carry the student's own answers (on-policy), not the data's: a source
    # that reads the data's conversations (a served teacher) scores these instead.
    student_answers: bool = False

    @property
    def teacher_batch(self) -> dict | None:
        """The single teacher's own encoding (an ensemble member's: its own), if made."""
        return self.teacher_batches.get(None)

    @classmethod
    def pop_from(cls, inputs: dict) -> BatchMeta:
        """Take the metadata out of a collated batch, leaving the student's model inputs."""
        return cls(
            sample_ids=inputs.pop("sample_ids"),
            sample_index=inputs.pop("sample_index"),
            image_counts=inputs.pop("image_counts").tolist(),
            teacher_batches=inputs.pop("teacher", {}),
            conversations=inputs.pop("conversations", None),
            student_answers=inputs.pop("student_answers", False),
        )


class TeacherSource(Protocol):
    """Where the teacher's supervision comes from."""

    def prepare(self, accelerator) -> TeacherSource:
        """Place the source for the engine in use (device, sharding); returns it."""
        ...

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        """Aligned answer positions and the teacher's targets for them."""
        ...


def prefetch_hook(source: TeacherSource):
    """The source's ``prefetch(conversations, batch)``, when it has one: a source that can
    start on a batch before the step asks for it (a served teacher sends its requests)
    hears of each batch as the data loader collates it (:class:`~betakd.data.KDCollator`'s
    ``on_collate``). None for the others."""
    return getattr(source, "prefetch", None)
