"""A teacher with another tokenizer than the student's, aligned by text (a
:class:`~betakd.teachers.TeacherSource`).

It wraps a source of the teacher's own targets, built for the teacher's vocabulary (an
:class:`~betakd.teachers.OnlineTeacher` on the teacher's own batch, or a
:class:`~betakd.teachers.CachedTeacher` of a cache that ``betakd cache-teacher`` wrote
with the teacher's tokenizer), asks it for the teacher's answer tokens with their targets
(``own_targets``), and groups both sides' answer tokens by text (:mod:`betakd.cross_tokenizer`). The aligned positions it returns are the student's
answer tokens (aligned with themselves: ``teacher_pos`` carries no teacher meaning); the
teacher's side travels as :class:`~betakd.teachers.targets.GroupedTargets`.
"""

from __future__ import annotations

from betakd import chunked
from betakd.align import AlignedPositions, align_positions
from betakd.cross_tokenizer.groups import (
    AlignmentSurvey,
    BatchGroups,
    batch_groups,
    label_runs,
    sum_by_group,
    survey_alignment,
)
from betakd.cross_tokenizer.vocabulary import SharedVocabulary
from betakd.objective import per_sample_mean
from betakd.teachers.cache_reader import CachedTeacher
from betakd.teachers.online import OnlineTeacher
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import GroupedTargets

# Below this many answer tokens seen, one odd batch would decide the run's share.
MIN_TOKENS_FOR_BOUND = 512


class TextAlignedTeacher:
    """A teacher of another vocabulary: per-group targets over the answers' text.

    Args:
        teacher: the teacher's own source, built for its vocabulary (``vocab_rows`` =
            ``teacher_vocab``), with ``own_targets(student_batch, meta)``: its answer
            tokens aligned with themselves and their targets.
        student_tokenizer, teacher_tokenizer: fast tokenizers (offsets).
        shared: the shared vocabulary of the two.
        teacher_vocab: the teacher's logit columns that are tokens.
        loss: ``prefix``, ``hybrid`` or ``uld`` (:mod:`betakd.cross_tokenizer.group_loss`).
        chunk_size: rows at a time for the teacher's NLL of its own tokens.
    """

    def __init__(
        self,
        teacher: OnlineTeacher | CachedTeacher,
        student_tokenizer,
        teacher_tokenizer,
        shared: SharedVocabulary,
        *,
        teacher_vocab: int,
        loss: str = "prefix",
        chunk_size: int | None = None,
        max_unaligned: float = 1.0,
    ) -> None:
        self.teacher = teacher
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.shared = shared
        self.teacher_vocab = teacher_vocab
        self.loss = loss
        self.chunk_size = chunk_size
        self.max_unaligned = max_unaligned
        self.tokens_seen = 0
        self.tokens_unaligned = 0

    def survey(self, conversations, student_encoder, teacher_encoder=None) -> AlignmentSurvey:
        """How much of a data set's answers aligns: the teacher's answer runs from its
        encoder (online) or from the cache (one run per sample)."""
        if teacher_encoder is not None:

            def runs(conversation):
                return label_runs(teacher_encoder.encode_cached(conversation).labels)

        else:
            runs = self.teacher.cached_answer_runs
        return survey_alignment(conversations, student_encoder, runs, self.teacher_tokenizer)

    def prepare(self, accelerator) -> TextAlignedTeacher:
        self.teacher.prepare(accelerator)
        return self

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        student = align_positions(student_batch, student_batch, sample_ids=meta.sample_ids)
        teacher, own = self.teacher.own_targets(student_batch, meta)
        groups = batch_groups(student, teacher, self.student_tokenizer, self.teacher_tokenizer)
        self._count(student, groups, meta.sample_ids)
        return student, TeacherTargets(
            None,
            own.visual,
            own.representation,
            groups=self._grouped(own, teacher, groups),
        )

    def _count(self, student: AlignedPositions, groups: BatchGroups, sample_ids) -> None:
        """Keep the run's share of unaligned student answer tokens under the bound (the
        data's answers were surveyed before training; the student's own are new)."""
        self.tokens_seen += len(student)
        self.tokens_unaligned += int(groups.unaligned.sum())
        share = self.tokens_unaligned / max(self.tokens_seen, 1)
        if self.tokens_seen >= MIN_TOKENS_FOR_BOUND and share > self.max_unaligned:
            rows = groups.unaligned.nonzero().flatten().tolist()
            raise ValueError(
                f"cross_tokenizer: {self.tokens_unaligned} of {self.tokens_seen} student "
                f"answer tokens so far ({share:.1%}) align with no teacher tokens, above "
                f"max_unaligned={self.max_unaligned}; in this batch samples "
                f"{[sample_ids[r] for r in rows][:5]}"
            )

    def _grouped(
        self, own: TeacherTargets, teacher: AlignedPositions, groups: BatchGroups
    ) -> GroupedTargets:
        if own.tokens is None:
            raise ValueError("the teacher source returned no logits for its answer tokens")
        nll = chunked.teacher_token_nll(
            own.tokens, teacher.token_ids, self.teacher_vocab, self.chunk_size
        )
        rest = sum_by_group(-nll[groups.teacher_rest], groups.teacher_rest_group, len(groups))
        answer_nll = per_sample_mean(nll, teacher.batch_index, teacher.batch_size)
        return GroupedTargets(
            groups=groups,
            first=own.tokens.rows(groups.teacher_first),
            rest_log_prob=rest,
            answer_nll=answer_nll,
            shared=self.shared,
            teacher_vocab=self.teacher_vocab,
            loss=self.loss,
        )
