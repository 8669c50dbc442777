"""Which student tokens and which teacher tokens cover the same answer text.

Both models tokenise the same answer text. Each token has a character span in that text
(the fast tokenizer's offset mapping). Walking both token lists, the side whose current
token ends first advances; a *group* closes at a position where both sides' tokens end
together and no later token of either side ends at or before it (a character that
byte-level BPE splits into several tokens gives all of them the same span, and they must
stay in one group). Each group pairs one or more student tokens with one or more teacher
tokens covering the same text.

The two answer texts can differ where the chat templates do: most often in the
end-of-turn marker each template appends (``<|im_end|>`` against ``</s>``). Tokens are
aligned over the texts' common prefix; when both remainders consist of whole special
tokens (end-of-turn markers) they form one last group, so the student's end of answer
keeps a teacher target. Any other token outside the groups is *unaligned*: counted,
never silently dropped (:class:`TokenGroups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class TokenGroups:
    """Groups of one sample's answer tokens: ``student[g]`` and ``teacher[g]`` are
    ``[start, stop)`` ranges of answer-token indices covering the same text."""

    student: tuple[Span, ...]
    teacher: tuple[Span, ...]
    student_tokens: int
    teacher_tokens: int

    def __len__(self) -> int:
        return len(self.student)

    @property
    def unaligned_student(self) -> int:
        """Student answer tokens in no group."""
        return self.student_tokens - sum(stop - start for start, stop in self.student)

    @property
    def unaligned_teacher(self) -> int:
        return self.teacher_tokens - sum(stop - start for start, stop in self.teacher)

    @classmethod
    def identity(cls, count: int) -> TokenGroups:
        """Every token its own group (the same tokenizer on both sides)."""
        spans = tuple((i, i + 1) for i in range(count))
        return cls(spans, spans, count, count)


@dataclass(frozen=True)
class TokenizedAnswer:
    """One model's answer tokens: their text, ids and character spans in the text."""

    text: str
    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    special: tuple[bool, ...]  # the token is one of the tokenizer's special tokens


def tokenize_answer(tokenizer, text: str) -> TokenizedAnswer:
    """The answer's tokens as the data encoder makes them (no special tokens added), with
    their character spans; needs a fast tokenizer (the offsets come from it)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"aligning tokenizers by text needs a fast tokenizer (offset mappings); "
            f"{type(tokenizer).__name__} is not one"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(int(i) for i in encoded["input_ids"])
    special_ids = set(tokenizer.all_special_ids)
    return TokenizedAnswer(
        text,
        ids,
        tuple((int(a), int(b)) for a, b in encoded["offset_mapping"]),
        tuple(i in special_ids for i in ids),
    )


def common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def align_answers(student: TokenizedAnswer, teacher: TokenizedAnswer) -> TokenGroups:
    """Groups of student and teacher tokens over the two answers' common text (module
    docstring), plus one group of both sides' trailing special tokens where the texts
    differ only in them."""
    limit = common_prefix_length(student.text, teacher.text)
    s_inside = _tokens_within(student.spans, limit)
    t_inside = _tokens_within(teacher.spans, limit)
    s_groups, t_groups = align_spans(student.spans[:s_inside], teacher.spans[:t_inside])
    s_done = s_groups[-1][1] if s_groups else 0
    t_done = t_groups[-1][1] if t_groups else 0
    if (
        s_done == s_inside
        and t_done == t_inside
        and _special_tail(student, s_inside)
        and _special_tail(teacher, t_inside)
    ):
        s_groups.append((s_inside, len(student.ids)))
        t_groups.append((t_inside, len(teacher.ids)))
    return TokenGroups(tuple(s_groups), tuple(t_groups), len(student.ids), len(teacher.ids))


def _tokens_within(spans: Sequence[Span], limit: int) -> int:
    """How many leading tokens end at or before ``limit``."""
    count = 0
    for _, end in spans:
        if end > limit:
            break
        count += 1
    return count


def _special_tail(answer: TokenizedAnswer, start: int) -> bool:
    return start < len(answer.ids) and all(answer.special[start:])


def align_spans(student: Sequence[Span], teacher: Sequence[Span]) -> tuple[list[Span], list[Span]]:
    """Group two token lists over one text by their spans' ends (module docstring).

    Returns the groups' ``[start, stop)`` token ranges on each side. Tokens after the
    last point where both sides end together are left out (unaligned).
    """
    s_groups: list[Span] = []
    t_groups: list[Span] = []
    i = j = 0
    while i < len(student) and j < len(teacher):
        i_start, j_start = i, j
        s_end, t_end = student[i][1], teacher[j][1]
        i, j = i + 1, j + 1
        while True:
            if i < len(student) and (s_end < t_end or student[i][1] <= s_end):
                s_end = max(s_end, student[i][1])
                i += 1
            elif j < len(teacher) and (t_end < s_end or teacher[j][1] <= t_end):
                t_end = max(t_end, teacher[j][1])
                j += 1
            else:
                break
        if s_end != t_end:
            break  # one side ran out before the other's token ended
        s_groups.append((i_start, i))
        t_groups.append((j_start, j))
    return s_groups, t_groups
