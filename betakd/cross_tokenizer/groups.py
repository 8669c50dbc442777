"""A batch's answer tokens grouped across two tokenizers, as index tensors.

Each side's answer tokens are given as aligned rows (:class:`~betakd.align.AlignedPositions`
of the side with itself): sample-major, in order. A sample's answer is split into
*runs* (contiguous answer tokens: one per assistant turn); run k of the student is
aligned with run k of the teacher by text (:func:`~betakd.cross_tokenizer.alignment.align_answers`).
A run's text is its tokens decoded; the tokens' spans are the tokenizer's offsets when
re-tokenising the text gives them back, else (a sampled answer spelt in pieces the
tokenizer would not choose) what each token adds to the decoded text
(:func:`tokenized_run`); a run whose text neither gives is counted unaligned instead of
being guessed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from betakd.align import AlignedPositions
from betakd.cross_tokenizer.alignment import (
    TokenGroups,
    TokenizedAnswer,
    align_answers,
    tokenize_answer,
)
from betakd.labels import supervised


@dataclass(frozen=True)
class BatchGroups:
    """The groups of a batch: rows of each side's aligned answer tokens.

    ``student_first[g]`` / ``teacher_first[g]``: the row of group g's first token on each
    side; ``student_rest`` / ``teacher_rest``: the rows of the groups' other tokens, with
    their group in ``student_rest_group`` / ``teacher_rest_group``; ``sample[g]``: its batch
    row; ``unaligned[b]``: sample b's student answer tokens in no group.
    """

    student_first: Tensor
    teacher_first: Tensor
    student_rest: Tensor
    student_rest_group: Tensor
    teacher_rest: Tensor
    teacher_rest_group: Tensor
    sample: Tensor
    unaligned: Tensor
    batch_size: int

    def __len__(self) -> int:
        return int(self.student_first.numel())


def answer_runs(aligned: AlignedPositions) -> list[list[tuple[int, int]]]:
    """Per sample, its runs as ``[start, stop)`` ranges of aligned rows (answer rows only;
    a run ends where the positions stop being consecutive)."""
    batch = aligned.batch_index.tolist()
    positions = aligned.student_pos.tolist()
    answer = aligned.is_answer.tolist()
    runs: list[list[tuple[int, int]]] = [[] for _ in range(aligned.batch_size)]
    start = None
    for row in range(len(batch) + 1):
        continues = (
            row < len(batch)
            and answer[row]
            and start is not None
            and batch[row] == batch[row - 1]
            and positions[row] == positions[row - 1] + 1
        )
        if continues:
            continue
        if start is not None:
            runs[batch[start]].append((start, row))
            start = None
        if row < len(batch) and answer[row]:
            start = row
    return runs


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def tokenized_run(tokenizer, ids: Sequence[int]) -> TokenizedAnswer | None:
    """A run's tokens with their spans in its decoded text.

    The spans are the tokenizer's offsets when re-tokenising the text gives these tokens
    back (the data's answers); otherwise (a sampled answer may spell a word in pieces the
    tokenizer would not choose) they come from decoding growing prefixes, each token
    spanning what it adds to the text. None when neither holds: a prefix's text is not
    the start of the whole text (a tokenizer that rewrites text as it decodes).
    """
    text = decode(tokenizer, ids)
    answer = tokenize_answer(tokenizer, text)
    if list(answer.ids) == list(ids):
        return answer
    spans, start = [], 0
    for k in range(1, len(ids) + 1):
        prefix = decode(tokenizer, ids[:k])
        # A character split over several byte-level tokens decodes as a replacement
        # character until its last piece: those pieces share the character's span.
        stable = prefix.rstrip("\ufffd")
        if not text.startswith(stable):
            return None
        end = max(start, len(stable))
        spans.append((start, end))
        start = end
    special_ids = set(tokenizer.all_special_ids)
    return TokenizedAnswer(text, tuple(ids), tuple(spans), tuple(i in special_ids for i in ids))


def group_runs(
    student_ids: Sequence[int], teacher_ids: Sequence[int], student_tokenizer, teacher_tokenizer
) -> TokenGroups:
    """One run of each side grouped by text (none grouped when either side's run does not
    survive re-tokenisation)."""
    student = tokenized_run(student_tokenizer, student_ids)
    teacher = tokenized_run(teacher_tokenizer, teacher_ids)
    if student is None or teacher is None:
        return TokenGroups((), (), len(student_ids), len(teacher_ids))
    return align_answers(student, teacher)


def sample_groups(
    student_runs: Sequence[Sequence[int]],
    teacher_runs: Sequence[Sequence[int]],
    student_tokenizer,
    teacher_tokenizer,
) -> list[TokenGroups]:
    """One sample's answer runs grouped, run k of the student with run k of the teacher;
    a student run without a partner has no groups (all its tokens unaligned)."""
    return [
        group_runs(run, teacher_runs[k], student_tokenizer, teacher_tokenizer)
        if k < len(teacher_runs)
        else TokenGroups((), (), len(run), 0)
        for k, run in enumerate(student_runs)
    ]


def batch_groups(
    student: AlignedPositions,
    teacher: AlignedPositions,
    student_tokenizer,
    teacher_tokenizer,
) -> BatchGroups:
    """Group every sample's answer runs (run k with run k; a run without a partner is
    unaligned)."""
    if student.batch_size != teacher.batch_size:
        raise ValueError(
            f"student batch has {student.batch_size} samples, teacher batch {teacher.batch_size}"
        )
    s_ids, t_ids = student.token_ids.tolist(), teacher.token_ids.tolist()
    s_runs, t_runs = answer_runs(student), answer_runs(teacher)
    out: dict[str, list[int]] = {k: [] for k in ("sf", "tf", "sr", "srg", "tr", "trg", "sample")}
    unaligned = []
    for b in range(student.batch_size):
        runs = sample_groups(
            [s_ids[start:stop] for start, stop in s_runs[b]],
            [t_ids[start:stop] for start, stop in t_runs[b]],
            student_tokenizer,
            teacher_tokenizer,
        )
        for groups, (s_run, _), (t_run, _) in zip(runs, s_runs[b], t_runs[b], strict=False):
            for (s0, s1), (t0, t1) in zip(groups.student, groups.teacher, strict=True):
                g = len(out["sf"])
                out["sf"].append(s_run + s0)
                out["tf"].append(t_run + t0)
                out["sample"].append(b)
                out["sr"].extend(range(s_run + s0 + 1, s_run + s1))
                out["srg"].extend([g] * (s1 - s0 - 1))
                out["tr"].extend(range(t_run + t0 + 1, t_run + t1))
                out["trg"].extend([g] * (t1 - t0 - 1))
        unaligned.append(sum(groups.unaligned_student for groups in runs))
    device = student.batch_index.device
    as_tensor = lambda key: torch.tensor(out[key], dtype=torch.long, device=device)  # noqa: E731
    return BatchGroups(
        student_first=as_tensor("sf"),
        teacher_first=as_tensor("tf"),
        student_rest=as_tensor("sr"),
        student_rest_group=as_tensor("srg"),
        teacher_rest=as_tensor("tr"),
        teacher_rest_group=as_tensor("trg"),
        sample=as_tensor("sample"),
        unaligned=torch.tensor(unaligned, dtype=torch.long, device=device),
        batch_size=student.batch_size,
    )


def sum_by_group(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """``[G]``: the sum of ``values [M]`` per group (0 for a group with none)."""
    out = values.new_zeros(num_groups)
    return out.index_add(0, group.to(values.device), values)


def label_runs(labels: Tensor) -> list[list[int]]:
    """The answer runs of one encoded sample's labels (``IGNORE_INDEX`` elsewhere)."""
    runs: list[list[int]] = []
    previous = False
    for value, answer in zip(labels.tolist(), supervised(labels).tolist(), strict=True):
        if answer and not previous:
            runs.append([])
        if answer:
            runs[-1].append(value)
        previous = answer
    return runs


def unaligned_tokens(
    student_runs: Sequence[Sequence[int]],
    teacher_runs: Sequence[Sequence[int]],
    student_tokenizer,
    teacher_tokenizer,
) -> tuple[int, int]:
    """One sample's (student answer tokens, those in no group), run k with run k."""
    runs = sample_groups(student_runs, teacher_runs, student_tokenizer, teacher_tokenizer)
    return sum(len(run) for run in student_runs), sum(g.unaligned_student for g in runs)


@dataclass
class AlignmentSurvey:
    """How much of a data set's answers aligns by text: per sample, the student's answer
    tokens in no group."""

    tokens: int
    unaligned: dict[str, int]  # sample id -> unaligned student tokens (only samples with some)

    @property
    def share(self) -> float:
        return sum(self.unaligned.values()) / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        return (
            f"{sum(self.unaligned.values())} of {self.tokens} student answer tokens "
            f"({self.share:.1%}) in {len(self.unaligned)} samples align with no teacher tokens"
        )

    def enforce(self, bound: float, key: str) -> None:
        """Stop, naming samples, when the unaligned share passes ``bound``."""
        if self.share > bound:
            worst = sorted(self.unaligned, key=self.unaligned.get, reverse=True)[:5]
            raise ValueError(
                f"{key}: {self.summary()}, above max_unaligned={bound}; e.g. samples "
                f"{worst} (answers their tokenizers or chat templates write differently)"
            )


def survey_alignment(
    conversations, student_encoder, teacher_runs, teacher_tokenizer
) -> AlignmentSurvey:
    """Align every conversation's answers, the student's as its encoder encodes them (the
    validation pass cached them) and the teacher's as ``teacher_runs(conversation)`` gives
    its answer runs, and count what stays unaligned."""
    tokens = 0
    unaligned: dict[str, int] = {}
    for conversation in conversations:
        total, missing = unaligned_tokens(
            label_runs(student_encoder.encode_cached(conversation).labels),
            teacher_runs(conversation),
            student_encoder.tokenizer,
            teacher_tokenizer,
        )
        tokens += total
        if missing:
            unaligned[conversation.id] = missing
    return AlignmentSurvey(tokens, unaligned)


class AnswerTranslator:
    """The student's answer as another tokenizer writes it: its text (without the
    student's end-of-answer token) tokenised again, then the other tokenizer's end-of-
    sequence token where the student's answer ended (an on-policy answer for a teacher of
    another tokenizer)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, student_stop_ids: Collection[int]):
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.student_stop_ids = set(student_stop_ids)
        self.teacher_eos = teacher_tokenizer.eos_token_id

    def __call__(self, answer: Tensor) -> Tensor:
        ids = answer.tolist()
        ended = bool(ids) and ids[-1] in self.student_stop_ids
        text = decode(self.student_tokenizer, ids[:-1] if ended else ids)
        out = self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ended and self.teacher_eos is not None:
            out = [*out, self.teacher_eos]
        return torch.tensor(out, dtype=torch.long)
