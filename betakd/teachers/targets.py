"""The teacher's per-token targets, in the forms a teacher source can produce them.

Every form gives teacher logits (or log-probabilities, which are valid logits) for a
range of aligned tokens, ``logits(start, stop, vocab_size) -> [stop - start, V]``, so
the dense path asks for all rows at once and the chunked path
(:mod:`betakd.chunked`) a chunk at a time; no form holds an ``[N, V]`` tensor unless
it was given one:

* :class:`DenseLogits`: logits already at hand ``[N, V']`` (an online teacher's output);
* :class:`HiddenStateLogits`: the teacher's final hidden states ``[N, H]`` and
  ``lm_head``; a chunk's logits are one matmul (an online teacher in chunked mode);
* :class:`TopKLogits`: a top-k summary with the tail mass (the offline cache).

A teacher of another vocabulary gives :class:`GroupedTargets` instead: one target per
group of answer text (:mod:`betakd.cross_tokenizer`).

**The tail rule** (one rule, for the dense and the chunked path alike): a top-k summary
is the k most likely tokens' log-probabilities, their ids and the log of the remaining
probability mass (the tail). A row is rebuilt as the k tokens with their
probabilities and the tail spread evenly over the other ``V - k`` tokens, the tail
floored at ``e**LOG_TAIL_FLOOR`` (so every token keeps a positive probability and
reverse-KL-type energies stay finite), then renormalised to sum to 1 (which also
absorbs float16 rounding of the stored values). The tail is stored, not derived as
``1 - sum(top k)``: that subtraction loses a small tail to rounding. An energy on
standardised logits (``cosine_logits``, ``mse_logits``) sees a flat tail instead of
the teacher's logits there, so probability energies are the natural choice with a
top-k teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from betakd.chunked import TeacherLogits
from betakd.cross_tokenizer.groups import BatchGroups
from betakd.cross_tokenizer.vocabulary import SharedVocabulary

LOG_TAIL_FLOOR = -80.0


@dataclass
class DenseLogits:
    """Teacher logits ``[N, V']`` at hand; columns beyond the vocabulary are padding."""

    values: Tensor

    @property
    def num_tokens(self) -> int:
        return self.values.shape[0]

    def logits(self, start: int, stop: int, vocab_size: int) -> Tensor:
        return self.values[start:stop, :vocab_size].detach()

    def rows(self, index: Tensor) -> DenseLogits:
        return DenseLogits(self.values[index.to(self.values.device)])


@dataclass
class HiddenStateLogits:
    """A teacher given by its final hidden states ``[N, H_t]`` and ``lm_head``.

    It gets no gradient. An ``lm_head`` with more rows than the vocabulary (padding
    rows, e.g. a vocabulary rounded up to a multiple of 64) is sliced to it; fewer rows
    is an error.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def logits(self, start: int, stop: int, vocab_size: int) -> Tensor:
        if self.weight.shape[0] < vocab_size:
            raise ValueError(
                f"teacher lm_head has {self.weight.shape[0]} rows, fewer than the "
                f"student's vocabulary of {vocab_size}"
            )
        weight = self.weight[:vocab_size].detach()
        bias = None if self.bias is None else self.bias[:vocab_size].detach()
        with torch.no_grad():
            return F.linear(self.hidden[start:stop].detach(), weight, bias)

    def rows(self, index: Tensor) -> HiddenStateLogits:
        return HiddenStateLogits(self.hidden[index.to(self.hidden.device)], self.weight, self.bias)


@dataclass
class TopKLogits:
    """A top-k teacher: log-probabilities ``[N, k]``, token ids ``[N, k]`` and the log of
    the tail mass ``[N]``, expanded a range of rows at a time by :func:`dense_from_topk`.

    An energy's temperature T then gives ``p ** (1/T)`` renormalised: exactly the
    teacher's ``softmax(z / T)`` when k = V, an approximation otherwise (the uniform
    tail is tempered as a block).
    """

    log_probs: Tensor
    ids: Tensor
    tail_log_mass: Tensor
    vocab_size: int

    @property
    def num_tokens(self) -> int:
        return self.log_probs.shape[0]

    def logits(self, start: int, stop: int, vocab_size: int) -> Tensor:
        if vocab_size != self.vocab_size:
            raise ValueError(
                f"top-k teacher was summarised for a vocabulary of {self.vocab_size}, "
                f"the student has {vocab_size}"
            )
        rows = slice(start, stop)
        return dense_from_topk(
            self.log_probs[rows], self.ids[rows], self.tail_log_mass[rows], vocab_size
        )

    def rows(self, index: Tensor) -> TopKLogits:
        index = index.to(self.log_probs.device)
        return TopKLogits(
            self.log_probs[index], self.ids[index], self.tail_log_mass[index], self.vocab_size
        )

    def truncated(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs [n, k], ids [n, k], log tail mass [n]) of the ``k`` most likely kept
        tokens, the others' mass added to the tail: the summary a top-k of fewer tokens
        would have stored."""
        if k > self.log_probs.shape[1]:
            raise ValueError(f"a top-{self.log_probs.shape[1]} summary has no top {k}")
        values, order = self.log_probs.float().sort(dim=-1, descending=True)
        tail = self.tail_log_mass.float()
        if k < values.shape[1]:
            tail = torch.logaddexp(tail, values[:, k:].logsumexp(dim=-1))
        return values[:, :k], self.ids.gather(1, order)[:, :k], tail.clamp_min(LOG_TAIL_FLOOR)

    def captured_mass(self, ks: Sequence[int]) -> Tensor:
        """``[n, len(ks)]``: the probability mass of each row's ``k`` most likely tokens,
        for each ``k`` in ``ks`` (at most the summary's k; cf. :func:`captured_mass`)."""
        cumulative = self.log_probs.float().exp().sort(dim=-1, descending=True).values.cumsum(-1)
        return cumulative[:, [k - 1 for k in ks]]


def check_topk(log_probs: Tensor, ids: Tensor, tail_log_mass: Tensor, vocab_size: int) -> None:
    n, k = log_probs.shape
    if ids.shape != (n, k) or tail_log_mass.shape != (n,):
        raise ValueError(
            f"top-k summary shapes disagree: log-probs {tuple(log_probs.shape)}, ids "
            f"{tuple(ids.shape)}, tail {tuple(tail_log_mass.shape)}"
        )
    if k > vocab_size:
        raise ValueError(f"k = {k} exceeds the vocabulary size {vocab_size}")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"top-k ids must lie in [0, {vocab_size})")


def dense_from_topk(
    topk_log_probs: Tensor, topk_ids: Tensor, tail_log_mass: Tensor, vocab_size: int
) -> Tensor:
    """Dense float32 log-probabilities ``[n, V]`` from a top-k summary (the tail rule in
    the module docstring)."""
    check_topk(topk_log_probs, topk_ids, tail_log_mass, vocab_size)
    n, k = topk_log_probs.shape
    head = topk_log_probs.float()
    ids = topk_ids.long()
    if k == vocab_size:
        log_norm = head.logsumexp(dim=-1, keepdim=True)
        dense = head.new_full((n, vocab_size), LOG_TAIL_FLOOR)
        return dense.scatter_(1, ids, head - log_norm)
    tail = tail_log_mass.float().clamp_min(LOG_TAIL_FLOOR).unsqueeze(1)
    # The row's total mass from the k head entries and the tail: an [n, k] reduction
    # instead of a log-sum-exp over the whole vocabulary.
    log_norm = torch.logaddexp(head.logsumexp(dim=-1, keepdim=True), tail)
    fill = tail - math.log(vocab_size - k) - log_norm
    dense = fill.expand(n, vocab_size).contiguous()
    return dense.scatter_(1, ids, head - log_norm)


def captured_mass(logits: Tensor, ks: Sequence[int]) -> Tensor:
    """``[n, len(ks)]``: the probability mass of each row's ``k`` most likely tokens, for
    each ``k`` in ``ks`` (how much of the teacher a top-k cache keeps)."""
    probs = torch.softmax(logits.float(), dim=-1)
    cumulative = probs.topk(max(ks), dim=-1).values.cumsum(dim=-1)
    return cumulative[:, [k - 1 for k in ks]]


def topk_summary(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k log-probs [n, k], ids [n, k], log tail mass [n]) of logits [n, V]."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    top = log_p.topk(k, dim=-1)
    # The tail as a log-sum-exp of the rest, not 1 - sum(top): exact for tiny tails.
    rest = log_p.scatter(1, top.indices, float("-inf"))
    tail = rest.logsumexp(dim=-1).clamp_min(LOG_TAIL_FLOOR)
    return top.values, top.indices, tail


@dataclass
class GroupedTargets:
    """A teacher of another vocabulary: one target per group of answer text
    (:mod:`betakd.cross_tokenizer`).

    ``first`` holds the teacher's logits at each group's first token (its own
    vocabulary, ``teacher_vocab`` columns; any :class:`TeacherLogits` form),
    ``rest_log_prob [G]`` the teacher's summed log-probabilities of each group's other
    tokens, ``answer_nll [B]`` its mean NLL per answer token of each sample (under its
    own tokens: what the data trust and the reliability read), and ``groups`` the rows of
    the student's aligned answer tokens each group covers.
    """

    groups: BatchGroups
    first: TeacherLogits
    rest_log_prob: Tensor
    answer_nll: Tensor
    shared: SharedVocabulary
    teacher_vocab: int
    loss: str = "prefix"

    @property
    def num_groups(self) -> int:
        return len(self.groups)
