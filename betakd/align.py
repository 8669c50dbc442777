"""Which student position matches which teacher position, and what they see.

Teacher and student may put different numbers of image tokens in front of the
text and pad on different sides, so equal indices mean nothing. Text tokens
are matched by their order among the supervised (or all text) tokens of a
sample; the logits that predict the token at position p sit at p - 1.

Also here: pooling visual tokens to a common grid, and the detached per-sample
representations that the instance weighting sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from betakd import chunked
from betakd.labels import supervised
from betakd.models import FamilyAdapter, text_width


@dataclass(frozen=True)
class AlignedPositions:
    """N aligned predictions; gather logits with `logits[batch_index, student_pos]`.

    `token_ids[i]` is the token that both `student_pos[i]` and `teacher_pos[i]`
    predict. `is_answer[i]` is False for prompt positions (opt-in).
    """

    batch_index: torch.Tensor  # [N] long
    student_pos: torch.Tensor  # [N] long
    teacher_pos: torch.Tensor  # [N] long
    token_ids: torch.Tensor  # [N] long
    is_answer: torch.Tensor  # [N] bool
    batch_size: int

    def __len__(self) -> int:
        return int(self.batch_index.numel())

    def counts(self) -> torch.Tensor:
        """Aligned tokens per sample, [B]."""
        return torch.bincount(self.batch_index, minlength=self.batch_size)

    def student(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of a [B, T, ...] student tensor at the aligned positions -> [N, ...]."""
        device = tensor.device
        return tensor[self.batch_index.to(device), self.student_pos.to(device)]

    def teacher(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of a [B, T, ...] teacher tensor (it may live on another device)."""
        device = tensor.device
        return tensor[self.batch_index.to(device), self.teacher_pos.to(device)]


def _targets(
    batch: dict, adapter: FamilyAdapter | None, include_prompt: bool, row: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (>= 1, real tokens) whose token is a KD target, and their answer flag."""
    input_ids = batch["input_ids"][row]
    real = batch["attention_mask"][row].bool()
    answer = supervised(batch["labels"][row])
    if include_prompt:
        image = adapter.image_mask(input_ids) if adapter is not None else torch.zeros_like(real)
        chosen = real & ~image
    else:
        chosen = answer & real
    # A target needs a real predecessor whose logits predict it.
    predecessor_real = torch.zeros_like(real)
    predecessor_real[1:] = real[:-1]
    positions = (chosen & predecessor_real).nonzero().flatten()
    return positions, answer[positions]


def align_positions(
    student_batch: dict,
    teacher_batch: dict,
    *,
    student_adapter: FamilyAdapter | None = None,
    teacher_adapter: FamilyAdapter | None = None,
    include_prompt: bool = False,
    sample_ids: Sequence[str] | None = None,
) -> AlignedPositions:
    """Match the student's and the teacher's predictions of the same tokens.

    Both batches hold the same samples in the same order (`input_ids`,
    `attention_mask`, `labels`). By default only answer tokens (labels != IGNORE_INDEX)
    are targets; `include_prompt=True` adds every text token that is not part
    of an image (the adapters say which tokens are). When one side was cut
    shorter (truncation), the common leading part is used. Differing token ids
    are an error naming the sample.
    """
    if include_prompt and (student_adapter is None or teacher_adapter is None):
        raise ValueError("include_prompt=True needs both adapters to recognise image tokens")
    size = student_batch["input_ids"].shape[0]
    if teacher_batch["input_ids"].shape[0] != size:
        raise ValueError(
            f"student batch has {size} samples, teacher batch {teacher_batch['input_ids'].shape[0]}"
        )
    device = student_batch["input_ids"].device
    rows, s_pos, t_pos, ids, answer = [], [], [], [], []
    for row in range(size):
        s_targets, s_answer = _targets(student_batch, student_adapter, include_prompt, row)
        t_targets, _ = _targets(teacher_batch, teacher_adapter, include_prompt, row)
        n = min(s_targets.numel(), t_targets.numel())
        s_targets, t_targets, s_answer = s_targets[:n], t_targets[:n], s_answer[:n]
        s_ids = student_batch["input_ids"][row, s_targets]
        t_ids = teacher_batch["input_ids"][row, t_targets]
        if not torch.equal(s_ids, t_ids):
            name = sample_ids[row] if sample_ids is not None else row
            first = int((s_ids != t_ids).nonzero()[0])
            raise ValueError(
                f"sample {name}: student and teacher target tokens differ at target {first} "
                f"({int(s_ids[first])} vs {int(t_ids[first])}); same tokenizer and template?"
            )
        rows.append(torch.full((n,), row, dtype=torch.long))
        s_pos.append(s_targets - 1)
        t_pos.append(t_targets - 1)
        ids.append(s_ids)
        answer.append(s_answer)
    return AlignedPositions(
        batch_index=torch.cat(rows).to(device),
        student_pos=torch.cat(s_pos).to(device),
        teacher_pos=torch.cat(t_pos).to(device),
        token_ids=torch.cat(ids).to(device),
        is_answer=torch.cat(answer).to(device),
        batch_size=size,
    )


# ---------------------------------------------------------------------------
# Visual tokens


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def pool_tokens(tokens: torch.Tensor, n_out: int) -> torch.Tensor:
    """Average-pool [n, d] tokens to [n_out, d]: 2-D when both grids are square."""
    n, d = tokens.shape
    if n == n_out:
        return tokens
    side_in, side_out = _square_side(n), _square_side(n_out)
    if side_in is not None and side_out is not None:
        grid = tokens.T.reshape(1, d, side_in, side_in)
        return F.adaptive_avg_pool2d(grid, side_out).reshape(d, n_out).T
    return F.adaptive_avg_pool1d(tokens.T.unsqueeze(0), n_out)[0].T


@dataclass(frozen=True)
class PooledVisual:
    """Student and teacher visual tokens, each sample pooled to its own common grid and
    padded to the batch's largest; padding and samples without image are zeros."""

    student: torch.Tensor  # [B, n, d_student]
    teacher: torch.Tensor  # [B, n, d_teacher]
    mask: torch.Tensor  # [B] bool, True where the sample has visual tokens
    tokens: torch.Tensor  # [B, n] bool, True for each sample's own pooled tokens


def pool_visual_pair(
    student_tokens: Sequence[torch.Tensor], teacher_tokens: Sequence[torch.Tensor]
) -> PooledVisual:
    """Pool both sides of every sample to the smaller of its two token counts.

    Inputs are per-sample lists of [n_i, d] (as `FamilyAdapter.visual_tokens`
    returns). Dynamic-resolution towers and image splitting give samples different
    counts; each sample keeps its own grid (a sample's energy does not depend on the
    others in its batch), and ``tokens`` marks the rows that are not padding.
    """
    if len(student_tokens) != len(teacher_tokens):
        raise ValueError(f"{len(student_tokens)} student vs {len(teacher_tokens)} teacher samples")
    has = [s.shape[0] > 0 and t.shape[0] > 0 for s, t in zip(student_tokens, teacher_tokens)]
    if not any(has):
        raise ValueError("no sample in the batch has visual tokens")
    counts = [
        min(s.shape[0], t.shape[0]) if h else 0
        for s, t, h in zip(student_tokens, teacher_tokens, has)
    ]
    n = max(counts)
    reference_s = next(s for s, h in zip(student_tokens, has) if h)
    reference_t = next(t for t, h in zip(teacher_tokens, has) if h)
    student = reference_s.new_zeros(len(has), n, reference_s.shape[1])
    teacher = reference_t.new_zeros(len(has), n, reference_t.shape[1])
    for row, (s, t, count) in enumerate(zip(student_tokens, teacher_tokens, counts)):
        if count:
            student[row, :count] = pool_tokens(s, count)
            teacher[row, :count] = pool_tokens(t, count)
    device = reference_s.device
    tokens = torch.arange(n, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    return PooledVisual(student, teacher, torch.tensor(has, device=device), tokens)


# ---------------------------------------------------------------------------
# Representations for the instance weighting (all detached, float32)


def pooled_visual(teacher_visual: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over visual tokens -> [B, d] (the paper's choice of h(x)).

    Accepts [B, n, d] or a per-sample list of [n_i, d]; a sample without
    visual tokens gets zeros.
    """
    if isinstance(teacher_visual, torch.Tensor):
        return teacher_visual.detach().float().mean(dim=1)
    width = max(t.shape[-1] for t in teacher_visual)
    rows = [
        t.detach().float().mean(dim=0) if t.shape[0] else torch.zeros(width, device=t.device)
        for t in teacher_visual
    ]
    return torch.stack(rows)


def _segment_mean(values: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of rows of `values` [N, ...] grouped by batch_index -> [B, ...] (0 if none)."""
    batch_index = batch_index.to(values.device)
    sums = values.new_zeros((batch_size, *values.shape[1:]))
    sums.index_add_(0, batch_index, values)
    counts = torch.bincount(batch_index, minlength=batch_size).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


def pooled_answer_hidden(
    hidden: torch.Tensor, aligned: AlignedPositions, side: str = "teacher"
) -> torch.Tensor:
    """Hidden states [B, T, d] averaged over the aligned positions -> [B, d] (``side``:
    whose positions, the teacher's or the student's).

    The positions are those whose outputs predict the answer tokens (p - 1),
    i.e. the states the answer distributions come from.
    """
    pick = aligned.teacher if side == "teacher" else aligned.student
    rows = pick(hidden.detach()).float()
    return _segment_mean(rows, aligned.batch_index, aligned.batch_size)


def token_confidence(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row of logits ``[n, V]``: [entropy, max-probability] -> ``[n, 2]`` (float32)."""
    log_p = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    return torch.stack([entropy, p.max(dim=-1).values], dim=-1)


def confidence_stats(
    teacher_logits: torch.Tensor | chunked.TeacherLogits,
    aligned: AlignedPositions,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Teacher's per-sample [mean entropy, mean max-probability] -> [B, 2].

    `teacher_logits` is the full [B, T, V] tensor, the [N, V] rows already gathered at
    `aligned.teacher_pos`, or a source of those rows (e.g. hidden states and lm_head),
    read `chunk_size` rows at a time so that no [N, V] tensor is built.
    """
    if isinstance(teacher_logits, torch.Tensor):
        logits = teacher_logits.detach()
        if logits.dim() == 3:
            logits = aligned.teacher(logits)
        stats = token_confidence(logits, temperature)
    else:
        if vocab_size is None:
            raise ValueError("confidence_stats of a teacher source needs vocab_size")
        stats = chunked.map_rows(
            teacher_logits,
            lambda logits, _start: token_confidence(logits, temperature),
            vocab_size,
            chunk_size,
        )
    return _segment_mean(stats, aligned.batch_index, aligned.batch_size)


REPRESENTATIONS = ("teacher_visual", "teacher_answer_hidden", "teacher_confidence")


def representation_dim(kind: str, teacher_config) -> int:
    """Width of h(x) for the instance weighting network, known before any forward.

    Projected visual tokens live in the language model's width, like its
    hidden states; the confidence is [mean entropy, mean max-probability].
    """
    if kind == "teacher_confidence":
        return 2
    if kind in ("teacher_visual", "teacher_answer_hidden"):
        return text_width(teacher_config)
    raise ValueError(f"unknown instance representation {kind!r}; expected one of {REPRESENTATIONS}")


def instance_representation(
    kind: str,
    *,
    aligned: AlignedPositions | None = None,
    teacher_visual: torch.Tensor | Sequence[torch.Tensor] | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | chunked.TeacherLogits | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The detached float32 [B, D] representation that `kind` names (`vocab_size` and
    `chunk_size`: see :func:`confidence_stats`)."""
    if kind == "teacher_visual":
        _require(kind, teacher_visual=teacher_visual)
        return pooled_visual(teacher_visual)
    if kind == "teacher_answer_hidden":
        _require(kind, teacher_hidden=teacher_hidden, aligned=aligned)
        return pooled_answer_hidden(teacher_hidden, aligned)
    if kind == "teacher_confidence":
        _require(kind, teacher_logits=teacher_logits, aligned=aligned)
        return confidence_stats(
            teacher_logits, aligned, temperature, vocab_size=vocab_size, chunk_size=chunk_size
        )
    raise ValueError(f"unknown instance representation {kind!r}; expected one of {REPRESENTATIONS}")


def _require(kind: str, **inputs) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"instance representation {kind!r} needs {', '.join(missing)}")
