"""A teacher with another tokenizer than the student's, aligned by text (a
:class:`~betakd.teachers.TeacherSource`).

It wraps a source of the teacher's own targets (an :class:`~betakd.teachers.OnlineTeacher`
built for the teacher's vocabulary), runs it on the teacher's own batch with the
teacher's answer tokens aligned to themselves, and groups both sides' answer tokens by
text (:mod:`betakd.cross_tokenizer`). The aligned positions it returns are the student's
answer tokens (aligned with themselves: ``teacher_pos`` carries no teacher meaning); the
teacher's side travels as :class:`~betakd.teachers.targets.GroupedTargets`.
"""

from __future__ import annotations

from betakd import chunked
from betakd.align import AlignedPositions, align_positions
from betakd.cross_tokenizer.groups import BatchGroups, batch_groups, sum_by_group
from betakd.cross_tokenizer.vocabulary import SharedVocabulary
from betakd.objective import per_sample_mean
from betakd.teachers.online import OnlineTeacher
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import GroupedTargets


class TextAlignedTeacher:
    """A teacher of another vocabulary: per-group targets over the answers' text.

    Args:
        teacher: the teacher's own source, built for its vocabulary (``vocab_rows`` =
            ``teacher_vocab``), returning logits for its answer tokens.
        student_tokenizer, teacher_tokenizer: fast tokenizers (offsets).
        shared: the shared vocabulary of the two.
        teacher_vocab: the teacher's logit columns that are tokens.
        loss: ``hybrid`` or ``uld`` (:mod:`betakd.cross_tokenizer.group_loss`).
        chunk_size: rows at a time for the teacher's NLL of its own tokens.
    """

    def __init__(
        self,
        teacher: OnlineTeacher,
        student_tokenizer,
        teacher_tokenizer,
        shared: SharedVocabulary,
        *,
        teacher_vocab: int,
        loss: str = "hybrid",
        chunk_size: int | None = None,
    ) -> None:
        self.teacher = teacher
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.shared = shared
        self.teacher_vocab = teacher_vocab
        self.loss = loss
        self.chunk_size = chunk_size

    def prepare(self, accelerator) -> TextAlignedTeacher:
        self.teacher.prepare(accelerator)
        return self

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        teacher_batch = meta.teacher_batch
        if teacher_batch is None:
            raise ValueError(
                "a teacher of another tokenizer needs the teacher's batch: collate with the "
                "teacher's encoder (KDCollator(student, teacher))"
            )
        student = align_positions(student_batch, student_batch, sample_ids=meta.sample_ids)
        teacher = align_positions(teacher_batch, teacher_batch, sample_ids=meta.sample_ids)
        counts = teacher_batch.get("image_counts")
        counts = meta.image_counts if counts is None else counts.tolist()
        own = self.teacher.targets(teacher_batch, teacher, counts)
        groups = batch_groups(student, teacher, self.student_tokenizer, self.teacher_tokenizer)
        return student, TeacherTargets(
            None,
            own.visual,
            own.representation,
            groups=self._grouped(own, teacher, groups),
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
