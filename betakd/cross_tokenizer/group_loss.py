"""Energies between a student and a teacher of another vocabulary, one value per group.

A *group* (:mod:`betakd.cross_tokenizer.alignment`) pairs student and teacher tokens
covering the same text. Three losses per group, each a divergence (zero only at a match,
as Beta-KD's Laplace step needs):

* **prefix** (default, :func:`prefix`): each side's distribution at the group's first
  token projected onto the shared tokens by longest prefix, then any betakd energy.
* **hybrid** (GOLD, Patiño et al. 2025): each side's *group distribution* is its first
  position's full distribution times the probabilities of the group's remaining actual
  tokens (unnormalised): ``log P = log_softmax(z_first) + rest``, with ``rest`` the summed
  log-probabilities of the remaining tokens (0 for a one-token group). On the shared
  vocabulary (:class:`SharedVocabulary`), any betakd energy between the two group
  distributions restricted to the shared tokens plus one bucket holding all the rest of
  the mass (``1 - sum P[shared]``: other first tokens and other continuations of the
  group), so both rows are distributions. On the tokens outside the shared vocabulary,
  ULD's sorted L1. The two are mixed by the teacher's share of probability on shared
  tokens at the group's first position, ``w``: ``w * energy + (1 - w) * ULD``.
* **uld** (Boizard et al. 2024): the L1 distance between the two whole group
  distributions sorted in decreasing order, the shorter one padded with zeros.

With one vocabulary on both sides (every token shared, every group one token) prefix and
hybrid are the energy itself, exactly. Limits: ULD cannot see which token carries the
mass (a permutation of the teacher's distribution costs nothing), and a text that the two
tokenizers split differently (numbers, for one) falls outside the shared vocabulary,
where only ULD sees it (X-Token, 2026).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from betakd.chunked import TeacherLogits
from betakd.cross_tokenizer.vocabulary import SharedVocabulary
from betakd.energies import EnergyFn

LOSSES = ("prefix", "hybrid", "uld")


def group_log_probs(first_logits: Tensor, rest_log_prob: Tensor) -> Tensor:
    """``[G, V]`` log of the unnormalised group distributions."""
    return torch.log_softmax(first_logits.float(), dim=-1) + rest_log_prob.float()[:, None]


def sorted_l1(a: Tensor, b: Tensor) -> Tensor:
    """``[G]``: the L1 distance between the rows of ``a [G, A]`` and ``b [G, B]``, each
    sorted in decreasing order, the shorter one padded with zeros (ULD)."""
    width = max(a.shape[1], b.shape[1])
    a_sorted = _pad_columns(a.sort(dim=1, descending=True).values, width)
    b_sorted = _pad_columns(b.sort(dim=1, descending=True).values, width)
    return (a_sorted - b_sorted).abs().sum(dim=1)


def _pad_columns(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def uld(
    student_logits: Tensor, student_rest: Tensor, teacher_logits: Tensor, teacher_rest: Tensor
) -> Tensor:
    """``[G]`` ULD between whole group distributions."""
    return sorted_l1(
        group_log_probs(student_logits, student_rest).exp(),
        group_log_probs(teacher_logits, teacher_rest).exp(),
    )


def hybrid(
    energy: EnergyFn,
    student_logits: Tensor,
    student_rest: Tensor,
    teacher_logits: Tensor,
    teacher_rest: Tensor,
    shared: SharedVocabulary,
) -> Tensor:
    """``[G]`` the hybrid loss (module docstring): ``energy`` on the shared tokens and the
    rest bucket, ULD outside, mixed by the teacher's shared share ``w``."""
    student_first = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_first = torch.log_softmax(teacher_logits.float(), dim=-1).detach()
    student_rest = student_rest.float()
    teacher_rest = teacher_rest.float().to(teacher_first.device).detach()
    ids_s = shared.student_ids.to(student_first.device)
    ids_t = shared.teacher_ids.to(teacher_first.device)
    unshared_s = shared.unshared_student.to(student_first.device)
    unshared_t = shared.unshared_teacher.to(teacher_first.device)
    multi_token = bool(((student_rest != 0) | (teacher_rest != 0)).any())
    if unshared_s.numel() or unshared_t.numel() or multi_token:
        student_shared = torch.cat(
            [
                student_first[:, ids_s] + student_rest[:, None],
                _rest_bucket(student_first, student_rest, unshared_s),
            ],
            dim=1,
        )
        teacher_shared = torch.cat(
            [
                teacher_first[:, ids_t] + teacher_rest[:, None],
                _rest_bucket(teacher_first, teacher_rest, unshared_t),
            ],
            dim=1,
        )
    else:
        # Nothing outside the shared tokens: the energy of the logits themselves (an
        # energy is shift-invariant), the same-tokenizer value to the last bit.
        student_shared = student_logits[:, ids_s]
        teacher_shared = teacher_logits[:, ids_t].detach()
    shared_energy = energy(student_shared, teacher_shared)
    if not unshared_t.numel() and not unshared_s.numel():
        return shared_energy
    w = teacher_first[:, ids_t].logsumexp(dim=1).exp()
    outside = sorted_l1(
        (student_first[:, unshared_s] + student_rest[:, None]).exp(),
        (teacher_first[:, unshared_t] + teacher_rest[:, None]).exp(),
    )
    return w * shared_energy + (1 - w) * outside


def prefix(
    energy: EnergyFn, student_logits: Tensor, teacher_logits: Tensor, shared: SharedVocabulary
) -> Tensor:
    """``[G]`` the prefix loss: each side's distribution at the group's first token
    projected onto the shared tokens, every token's probability added to the shared token
    that is the longest prefix of its text (the rest to one bucket), then ``energy``
    between the two projections.

    Where one tokenizer keeps a word whole (``Ġblue``) and the other splits it (``Ġbl``,
    ``u``, ``e``), both sides' mass for that word lands on the same shared token (``Ġbl``),
    as does each side's mass for the other words starting that way; so the teacher's
    preference between alternatives (blue or green) reaches the student in the student's
    own tokens, which comparing first tokens directly does not do (the hybrid loss
    then pushes the student towards the teacher's pieces). One vocabulary on both sides:
    the energy itself.
    """
    if shared.identical:
        return energy(student_logits, teacher_logits.detach())
    if shared.student_prefix is None or shared.teacher_prefix is None:
        raise ValueError("the prefix loss needs SharedVocabulary.between's prefix keys")
    return energy(
        _projected(student_logits, shared.student_prefix, len(shared)),
        _projected(teacher_logits.detach(), shared.teacher_prefix, len(shared)),
    )


def _projected(logits: Tensor, keys: Tensor, num_shared: int) -> Tensor:
    """``[G, S + 1]``: log of the probability each shared token (and the bucket) collects."""
    probs = torch.softmax(logits.float(), dim=-1)
    mass = probs.new_zeros(probs.shape[0], num_shared + 1)
    mass = mass.index_add(1, keys.to(probs.device), probs)
    # The where keeps log's gradient finite at an empty column (see _rest_bucket).
    return torch.where(mass > 0, mass.clamp_min(1e-38).log(), float("-inf"))


def _rest_bucket(first_log_p: Tensor, rest: Tensor, unshared: Tensor) -> Tensor:
    """``[G, 1]``: the log of the group distribution's mass outside the shared tokens,
    ``1 - exp(rest) + exp(rest) * P_first[unshared]``; ``-inf`` where none is left."""
    unshared_mass = first_log_p[:, unshared].exp().sum(dim=1) if unshared.numel() else 0.0
    mass = -torch.expm1(rest) + rest.exp() * unshared_mass
    # The where keeps log's gradient finite at an empty bucket (the energy gives a -inf
    # entry no gradient, but 0 * inf would still be nan).
    positive = mass > 0
    return torch.where(positive, mass.clamp_min(1e-38).log(), float("-inf"))[:, None]


GroupLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def chunked_group_values(
    loss: GroupLoss,
    student_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    student_rest: Tensor,
    teacher_first: TeacherLogits,
    teacher_rest: Tensor,
    teacher_vocab: int,
    chunk_size: int,
) -> Tensor:
    """``[G]``: ``loss(student_logits, student_rest, teacher_logits, teacher_rest)`` of
    every group, ``chunk_size`` groups at a time, from the student's hidden states at the
    groups' first tokens ``[G, H]`` and its ``lm_head`` (``weight``, ``bias``).

    Each chunk runs under activation checkpointing (``torch.utils.checkpoint``): its
    ``[chunk, V_student]`` and ``[chunk, V_teacher]`` logits are rebuilt in backward
    instead of being kept, so memory holds one chunk's logits at a time.
    """

    def chunk(hidden: Tensor, rest: Tensor, start: int, stop: int) -> Tensor:
        student_logits = torch.nn.functional.linear(hidden, weight, bias)
        teacher_logits = teacher_first.logits(start, stop, teacher_vocab)
        return loss(
            student_logits, rest, teacher_logits.to(hidden.device), teacher_rest[start:stop]
        )

    values = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, student_hidden.shape[0])
        values.append(
            checkpoint(
                chunk,
                student_hidden[start:stop],
                student_rest[start:stop],
                start,
                stop,
                use_reentrant=False,
            )
        )
    return torch.cat(values) if values else student_hidden.new_zeros(0)
