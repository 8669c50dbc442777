"""Token-level alignment energies between student and teacher distributions.

Every energy maps student logits ``[N, V]`` and teacher logits ``[N, V]`` to
per-token energies ``[N]`` in float32. Divergences are exactly zero when the
two logit rows are equal and non-negative otherwise, because Beta-KD's Laplace
step assumes the energy minimum is zero (SPEC section 2). ``ce_teacher`` is the
one exception, kept only to reproduce the authors' runs.

Masked vocabulary entries (``-inf`` logits) are supported: a term whose
probability is zero contributes nothing, and the zero-probability entries are
replaced *before* any arithmetic so that neither values nor gradients see
``0 * inf``.

Use :func:`get` to build an energy by name::

    energy = betakd.energies.get("fkl", temperature=2.0)
    per_token = energy(student_logits, teacher_logits)  # [N]
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

EnergyFn = Callable[[Tensor, Tensor], Tensor]

_REGISTRY: dict[str, Callable[..., Tensor]] = {}
_DIVERGENCES: set[str] = set()


def register(name: str, *, divergence: bool = True):
    """Add an energy ``fn(student_logits, teacher_logits, **options) -> [N]`` to the registry."""

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"energy {name!r} is already registered")
        _REGISTRY[name] = fn
        if divergence:
            _DIVERGENCES.add(name)
        return fn

    return decorator


def names() -> list[str]:
    """All registered energy names."""
    return sorted(_REGISTRY)


def is_divergence(name: str) -> bool:
    """True when the energy is zero at a perfect match (a valid Beta-KD energy)."""
    _check_name(name)
    return name in _DIVERGENCES


def options(name: str) -> dict[str, object]:
    """The options an energy accepts, with their defaults."""
    _check_name(name)
    params = list(inspect.signature(_REGISTRY[name]).parameters.values())[2:]
    return {p.name: p.default for p in params}


def get(name: str, **opts: object) -> EnergyFn:
    """The energy ``name`` with its options bound; unknown names or options raise at once."""
    _check_name(name)
    accepted = options(name)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise TypeError(
            f"energy {name!r} got unknown option(s) {unknown}; it accepts {sorted(accepted)}"
        )
    fn = _REGISTRY[name]
    # Validate the options now, not at the first training step.
    probe = torch.zeros(1, 2)
    fn(probe, probe, **opts)
    return partial(fn, **opts)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(f"unknown energy {name!r}; registered energies: {', '.join(names())}")


# --------------------------------------------------------------------------- helpers


# Log-probabilities of finite logits are floored here: with logits near +-1e38 the
# log-softmax overflows to -inf, and KL terms would become infinite.
LOG_PROB_FLOOR = -1e30
# Below this magnitude, squares of logits summed over any vocabulary stay far from
# float32 overflow, so standardisation needs no rescaling.
MODERATE_LOGIT = 1e15

# Masked (-inf) entries and huge logits need the guards below; ordinary rows do not,
# and on a CPU skipping them saves most of an energy's elementwise passes (what a
# chunked energy costs besides its matmuls). Where no guard applies, the plain formula
# computes the same values and gradients (standardisation up to float rounding: it
# skips a rescaling that cancels). Compiled code and GPUs always take the guarded form:
# it fuses there, and the data-dependent check would break a graph or cost a sync.


def _unguarded(x: Tensor, no_guard_needed: Callable[[Tensor], Tensor]) -> bool:
    """True when ``no_guard_needed(x)`` holds and skipping the guard pays (eager CPU)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(no_guard_needed(x.detach()))


def _no_minus_inf(x: Tensor) -> Tensor:
    return x.amin() > float("-inf")


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float32 log-softmax of ``logits / temperature``; only ``-inf`` logits give ``-inf``.

    Inside :func:`sharing_log_probs`, computed once per tensor and temperature.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shared = getattr(_SHARING, "memo", None)
    if shared is None or torch.compiler.is_compiling():
        return _log_probs(logits, temperature)
    key = (id(logits), temperature)
    if key not in shared or shared[key][0] is not logits:
        shared[key] = (logits, _log_probs(logits, temperature))
    return shared[key][1]


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    out = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    if _unguarded(out, lambda x: x.amin() >= LOG_PROB_FLOOR):
        return out
    return torch.where(torch.isneginf(logits), out, out.clamp_min(LOG_PROB_FLOOR))


_SHARING = threading.local()


@contextlib.contextmanager
def sharing_log_probs() -> Iterator[None]:
    """Within the block, :func:`log_probs` of one tensor at one temperature is computed
    once: several energies of the same logits (and a CE taken from
    :func:`cross_entropy`) share their log-softmax, and its backward pass. The block
    keeps those log-probabilities alive until it ends."""
    if getattr(_SHARING, "memo", None) is not None:  # nested: the outer block shares
        yield
        return
    _SHARING.memo = {}
    try:
        yield
    finally:
        _SHARING.memo = None


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-row CE ``[n]`` of logits ``[n, V]`` (float32; 0 where the label is
    ``ignore_index``), from :func:`log_probs`, so it shares their log-softmax with the
    energies inside :func:`sharing_log_probs`."""
    keep = labels != ignore_index
    picked = log_probs(logits).gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(keep, -picked, torch.zeros_like(picked))


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities, with ``0 * log 0 = 0``."""
    if _unguarded(log_p, _no_minus_inf):
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)
    absent = torch.isneginf(log_p)
    # Replace before subtracting: the gradient of an unselected ``where`` branch is
    # still multiplied through, and ``-inf - -inf`` would poison it with NaN.
    safe_p = log_p.masked_fill(absent, 0.0)
    safe_q = log_q.masked_fill(absent, 0.0)
    terms = log_p.exp() * (safe_p - safe_q)
    return terms.sum(dim=-1).clamp_min(0.0)


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight * p + (1 - weight) * q), computed in log space."""
    if not 0.0 < weight < 1.0:
        raise ValueError(f"mixture weight must lie in (0, 1), got {weight}")
    if _unguarded(log_p, _no_minus_inf) or _unguarded(log_q, _no_minus_inf):
        return _LogMixture.apply(log_p, log_q, weight)
    both_absent = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_p = log_p.masked_fill(both_absent, 0.0)
    log_q = log_q.masked_fill(both_absent, 0.0)
    return _LogMixture.apply(log_p, log_q, weight).masked_fill(both_absent, float("-inf"))


class _LogMixture(torch.autograd.Function):
    """The mixture of two log-probability rows, where at most one side is ``-inf``.

    Forward: m = hi * (1 + w_lo * (lo/hi - 1)) in log space, exact when p == q (so
    divergences are exactly zero at a perfect match, which logaddexp is not) and free of
    overflow since lo <= hi. Backward: the analytic gradients ``w p / m`` and
    ``(1 - w) q / m``, instead of a graph through the branches of the forward.
    """

    @staticmethod
    def forward(ctx, log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
        hi = torch.maximum(log_p, log_q)
        if weight == 0.5:
            w_lo = 0.5
        else:
            w_lo = torch.where(log_p >= log_q, 1.0 - weight, weight)
        mix = torch.minimum(log_p, log_q).sub_(hi).expm1_().mul_(w_lo).log1p_().add_(hi)
        ctx.save_for_backward(log_p, log_q, mix)
        ctx.weight = weight
        return mix

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        log_p, log_q, mix = ctx.saved_tensors
        w = ctx.weight
        grad_p = (log_p - mix).exp_().mul_(grad).mul_(w) if ctx.needs_input_grad[0] else None
        grad_q = (log_q - mix).exp_().mul_(grad).mul_(1 - w) if ctx.needs_input_grad[1] else None
        return grad_p, grad_q, None


def standardize(logits: Tensor) -> Tensor:
    """Per-row zero-mean unit-variance logits over finite entries; masked entries become 0."""
    centred, count = _centre(logits)
    var = centred.pow(2).sum(dim=-1, keepdim=True) / count
    return centred / (var + 1e-12).sqrt()


def _centre(logits: Tensor) -> tuple[Tensor, Tensor | int]:
    """Per-row logits minus their mean over finite entries (masked entries become 0),
    possibly rescaled, and the finite entries' count. What standardisation and a cosine
    of standardised logits need: neither sees a common scale of a row."""
    logits = logits.float()
    if _moderate(logits):
        return logits - logits.mean(dim=-1, keepdim=True), logits.shape[-1]
    finite = torch.isfinite(logits)
    zeros = torch.zeros_like(logits)
    # Dividing by the largest magnitude (when above 1) keeps the squares below float32
    # overflow for logits near 1e38.
    scale = torch.where(finite, logits.abs(), zeros).amax(dim=-1, keepdim=True).clamp_min(1.0)
    x = torch.where(finite, logits, zeros) / scale.detach()
    count = finite.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = x.sum(dim=-1, keepdim=True) / count
    return torch.where(finite, x - mean, zeros), count


def _moderate(logits: Tensor) -> bool:
    """All finite and far from float32 overflow, known without a device sync (eager CPU)."""
    return _unguarded(logits, lambda x: x.abs().amax() < MODERATE_LOGIT)


def cosine_distance(a: Tensor, b: Tensor, centre: bool = False) -> Tensor:
    """1 - cos(a, b) per row, as 0.5 * |a/|a| - b/|b||^2: exactly zero for identical rows.

    ``centre``: the distance of the rows minus their means (every entry finite), without
    the centred rows as tensors of their own.
    """
    return _CosineDistance.apply(a, b, centre)


class _CosineDistance(torch.autograd.Function):
    """0.5 * |u - v|^2 with u = a / r_a, r_a = sqrt(|a|^2 + 1e-12) (likewise v, b).

    The tiny offset keeps the gradient finite for an all-zero row (constant logits
    standardise to zeros), where F.normalize's gradient is 0/0. The gradient is the
    analytic one, ``((u - v) - u <u, u - v>) / r_a`` for ``a`` (and symmetrically for
    ``b``): a few passes over the rows instead of a graph through the normalisation.
    Centred rows need no more: u and v then have zero row means, so this gradient has
    too, and the centring's gradient (minus the row mean) leaves it as it is.
    Vocabulary-wide rows make every ``[rows, V]`` tensor count, so forward keeps two
    (u, and u - v written over v) and backward makes one per input.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, centre: bool) -> Tensor:
        u, r_a = _unit_rows(a, centre)
        v, r_b = _unit_rows(b, centre)
        diff = v.neg_().add_(u)
        ctx.save_for_backward(u, diff, r_a, r_b)
        return 0.5 * torch.linalg.vector_norm(diff, dim=-1).square()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        u, diff, r_a, r_b = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            along = torch.linalg.vecdot(u, diff).unsqueeze(-1)
            grad_a = u.mul(-along).add_(diff).mul_(grad / r_a)
        if ctx.needs_input_grad[1]:
            v = u - diff
            along = torch.linalg.vecdot(v, diff).unsqueeze(-1)
            grad_b = v.mul_(along).sub_(diff).mul_(grad / r_b)
        return grad_a, grad_b, None


def _unit_rows(x: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """Rows (centred when asked) over their offset norm, as a new tensor, and the norm."""
    if centre:
        x = x - x.mean(dim=-1, keepdim=True)
        norm = _offset_norm(x)
        return x.div_(norm), norm
    norm = _offset_norm(x)
    return x / norm, norm


def _offset_norm(x: Tensor) -> Tensor:
    return (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + 1e-12).sqrt()


# --------------------------------------------------------------------------- probability energies


@register("fkl")
def forward_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s): mode-covering, the classic KD loss."""
    return kl_from_log_probs(log_probs(teacher, temperature), log_probs(student, temperature))


@register("rkl")
def reverse_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_s || p_t): mode-seeking."""
    return kl_from_log_probs(log_probs(student, temperature), log_probs(teacher, temperature))


@register("jsd")
def jensen_shannon(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised JSD: beta*KL(p_t||m) + (1-beta)*KL(p_s||m), m = beta*p_t + (1-beta)*p_s."""
    log_t, log_s = log_probs(teacher, temperature), log_probs(student, temperature)
    log_m = log_mixture(log_t, log_s, beta)
    return beta * kl_from_log_probs(log_t, log_m) + (1 - beta) * kl_from_log_probs(log_s, log_m)


@register("tvd")
def total_variation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """0.5 * sum |p_t - p_s|."""
    p_t = log_probs(teacher, temperature).exp()
    p_s = log_probs(student, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(dim=-1)


@register("skew_fkl")
def skew_forward_kl(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """KL(p_t || alpha*p_t + (1-alpha)*p_s): bounded even where the student puts no mass."""
    log_t, log_s = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_from_log_probs(log_t, log_mixture(log_t, log_s, alpha))


@register("skew_rkl")
def skew_reverse_kl(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """KL(p_s || alpha*p_s + (1-alpha)*p_t)."""
    log_t, log_s = log_probs(teacher, temperature), log_probs(student, temperature)
    return kl_from_log_probs(log_s, log_mixture(log_s, log_t, alpha))


def akl_head_weight(log_t: Tensor, log_s: Tensor, head_threshold: float) -> Tensor:
    """Share of the probability gap |p_t - p_s| that falls on the teacher's head tokens.

    The head is the smallest set of most likely teacher tokens whose cumulative mass
    reaches ``head_threshold``. The weight is a constant of the step (no gradient), as in
    adaptive KL (Wu et al., 2024).
    """
    with torch.no_grad():
        p_t, p_s = log_t.exp(), log_s.exp()
        sorted_t, order = p_t.sort(dim=-1, descending=True)
        gap = (sorted_t - p_s.gather(-1, order)).abs()
        mass_before = sorted_t.cumsum(dim=-1) - sorted_t
        in_head = mass_before < head_threshold
        head_gap = (gap * in_head).sum(dim=-1)
        total_gap = gap.sum(dim=-1)
        # At a perfect match both KLs are zero; any weight gives zero, avoid 0/0.
        return torch.where(total_gap > 0, head_gap / total_gap.clamp_min(1e-30), 0.5)


@register("akl")
def adaptive_kl(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, head_threshold: float = 0.5
) -> Tensor:
    """Adaptive KL: w_head * FKL + (1 - w_head) * RKL, w_head from the head/tail gap split."""
    if not 0.0 < head_threshold <= 1.0:
        raise ValueError(f"head_threshold must lie in (0, 1], got {head_threshold}")
    log_t, log_s = log_probs(teacher, temperature), log_probs(student, temperature)
    w_head = akl_head_weight(log_t, log_s, head_threshold)
    return w_head * kl_from_log_probs(log_t, log_s) + (1 - w_head) * kl_from_log_probs(log_s, log_t)


@register("cosine_probs")
def cosine_probs(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """1 - cos(p_s, p_t): the paper's best energy."""
    p_t = log_probs(teacher, temperature).exp()
    p_s = log_probs(student, temperature).exp()
    return cosine_distance(p_s, p_t)


@register("mse_probs")
def mse_probs(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over the vocabulary of (p_s - p_t)^2."""
    p_t = log_probs(teacher, temperature).exp()
    p_s = log_probs(student, temperature).exp()
    return (p_s - p_t).pow(2).mean(dim=-1)


@register("ce_teacher", divergence=False)
def teacher_cross_entropy(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """H(p_t, p_s), the authors' default "KL". NOT a divergence: its minimum is H(p_t) > 0.

    Kept for parity runs with the reference code; it biases learned betas because the
    Laplace approximation assumes a zero minimum.
    """
    log_t, log_s = log_probs(teacher, temperature), log_probs(student, temperature)
    absent = torch.isneginf(log_t)
    terms = -log_t.exp() * log_s.masked_fill(absent, 0.0)
    return terms.sum(dim=-1)


# --------------------------------------------------------------------------- logit energies
# Standardised logits are invariant to temperature, so these take no temperature option.


@register("cosine_logits")
def cosine_logits(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos of per-token standardised logits (their scale cancels in the cosine, so
    centring is all the standardisation it computes)."""
    student, teacher = student.float(), teacher.float()
    if _moderate(student) and _moderate(teacher):
        return cosine_distance(student, teacher, centre=True)
    return cosine_distance(_centre(student)[0], _centre(teacher)[0])


@register("mse_logits")
def mse_logits(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over finite vocabulary entries of the squared difference of standardised logits."""
    finite = torch.isfinite(student) & torch.isfinite(teacher)
    sq = (standardize(student) - standardize(teacher)).pow(2) * finite
    return sq.sum(dim=-1) / finite.sum(dim=-1).clamp_min(1)
