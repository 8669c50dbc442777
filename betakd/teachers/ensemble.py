"""Several named teachers at once (a :class:`~betakd.teachers.TeacherSource`).

Each member is a teacher source of its own (online or cached) with its own encoding of
the batch (its own image-token count) and its own positions; what ties them together is
the student: every member must align the same student answer tokens, so that each
channel's energy, whichever teacher it reads, covers the same tokens. Members run one
after another, so only one teacher's activations exist at a time; an online member runs
under ``no_grad``, a cached one loads no model at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from betakd.align import AlignedPositions
from betakd.teachers.protocol import BatchMeta, TeacherSource, TeacherTargets, prefetch_hook


class TeacherEnsemble:
    """Named teacher sources; their targets come back as ``TeacherTargets.members``.

    Args:
        members: teacher name -> source, in config order.
        representation_from: the members whose ``representation`` the instance weighting
            sees, concatenated in this order (each member must be built to return one);
            empty when no weighting needs one.
    """

    def __init__(
        self, members: Mapping[str, TeacherSource], representation_from: Sequence[str] = ()
    ) -> None:
        if not members:
            raise ValueError("a teacher ensemble needs at least one member")
        unknown = sorted(set(representation_from) - set(members))
        if unknown:
            raise ValueError(f"representation_from names unknown teachers {unknown}")
        self.members = dict(members)
        self.representation_from = list(representation_from)

    def prepare(self, accelerator) -> TeacherEnsemble:
        self.members = {name: source.prepare(accelerator) for name, source in self.members.items()}
        return self

    def prefetch(self, conversations, batch: dict) -> None:
        """Announce a coming batch to the members that send requests ahead (served)."""
        for source in self.members.values():
            hook = prefetch_hook(source)
            if hook is not None:
                hook(conversations, batch)

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        results = {
            name: source(student_batch, self._member_meta(meta, name))
            for name, source in self.members.items()
        }
        (first_name, (aligned, _)), *others = results.items()
        for name, (other, _) in others:
            check_same_student_positions((first_name, aligned), (name, other), meta.sample_ids)
        targets = {name: member for name, (_, member) in results.items()}
        return aligned, TeacherTargets(None, None, self._representation(targets), targets)

    @staticmethod
    def _member_meta(meta: BatchMeta, name: str) -> BatchMeta:
        """What a member sees: the batch metadata with its own encoding as the single
        teacher's (each member is a single source)."""
        own = meta.teacher_batches.get(name)
        return dataclasses.replace(meta, teacher_batches={} if own is None else {None: own})

    def _representation(self, targets: Mapping[str, TeacherTargets]) -> torch.Tensor | None:
        if not self.representation_from:
            return None
        parts = []
        for name in self.representation_from:
            part = targets[name].representation
            if part is None:
                raise ValueError(f"teacher {name!r} returned no instance representation")
            parts.append(part)
        return torch.cat(parts, dim=1)


def check_same_student_positions(
    first: tuple[str, AlignedPositions],
    other: tuple[str, AlignedPositions],
    sample_ids: Sequence[str],
) -> None:
    """Both teachers' alignments cover the same student tokens, or a ValueError naming the
    teachers and the samples that differ (an answer cut by ``data.max_length`` for one
    teacher's longer sequence and not for the other's)."""
    (name_a, a), (name_b, b) = first, other
    same = len(a) == len(b) and all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("batch_index", "student_pos", "token_ids", "is_answer")
    )
    if same:
        return
    counts_a, counts_b = a.counts(), b.counts()
    differing = [sample_ids[i] for i in range(a.batch_size) if counts_a[i] != counts_b[i]]
    raise ValueError(
        f"teachers {name_a!r} and {name_b!r} align different answer tokens of the student "
        f"(samples {differing or list(sample_ids)}): each teacher's encoding must keep the "
        "whole answer; raise data.max_length if a teacher's longer sequence cuts it"
    )
