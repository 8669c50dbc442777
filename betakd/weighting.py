"""Beta-KD weightings: how the CE channel and the teacher channels are combined.

Each weighting maps per-sample channel energies ``losses [B, C]`` (column order given
by ``channels``; the CE channel is named ``"ce"``) to a :class:`WeightingOutput`: a
per-sample loss ``[B]`` plus the betas, weighted terms and regularisers behind it.
Batch reduction is the objective's job (``betakd.objective``), not the weighting's.

The Beta-KD surrogate for a weighted channel k is (SPEC section 2)::

    beta_k * l_k - (d_k / 2) * log(beta_k)

whose minimiser over beta is ``d_k / (2 * l_k)``. ``d_k`` defaults to 1: each channel
counts as one scalar observation. Following the Laplace derivation literally would
set ``d_k`` to the activation dimension (e.g. the vocabulary size), which scales every
beta by the same large factor.

Unweighted channels (CE, by default, as in the paper) enter with weight 1 and no
regulariser. All weighting math runs in float32, also under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

CE = "ce"


@dataclass
class WeightingOutput:
    """Per-sample results of a weighting; every tensor is ``[B]`` or ``[B, C]``."""

    per_sample_loss: Tensor
    betas: Tensor
    weighted: Tensor
    regulariser: Tensor
    at_bound: Tensor


# --------------------------------------------------------------------------- positivity


class PositiveMap(nn.Module):
    """Maps an unconstrained value to a positive beta, optionally inside bounds.

    ``exp``: beta = exp(raw). ``softplus``: beta = softplus(raw). With ``bounds=(lo, hi)``
    the map is log(beta) = log(lo) + (log(hi) - log(lo)) * sigmoid(raw): smooth, with a
    non-zero gradient everywhere, unlike a clamp whose flat regions stop learning.
    """

    def __init__(
        self, parameterization: str = "exp", bounds: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        if parameterization not in ("exp", "softplus"):
            raise ValueError(
                f"parameterization must be 'exp' or 'softplus', got {parameterization!r}"
            )
        if bounds is not None:
            lo, hi = bounds
            if not 0 < lo < hi:
                raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
        self.parameterization = parameterization
        self.bounds = tuple(bounds) if bounds is not None else None

    def log_beta(self, raw: Tensor) -> Tensor:
        if self.bounds is not None:
            log_lo, log_hi = (math.log(b) for b in self.bounds)
            return log_lo + (log_hi - log_lo) * torch.sigmoid(raw)
        if self.parameterization == "exp":
            return raw
        # log(softplus(x)) computed without underflow for very negative x.
        return torch.where(
            raw < -20, raw, torch.log(torch.nn.functional.softplus(raw).clamp_min(1e-30))
        )

    def inverse(self, beta: float) -> float:
        """The raw value that gives ``beta`` (used to initialise parameters)."""
        if not beta > 0:
            raise ValueError(f"initial beta must be > 0, got {beta}")
        if self.bounds is not None:
            log_lo, log_hi = (math.log(b) for b in self.bounds)
            frac = (math.log(beta) - log_lo) / (log_hi - log_lo)
            if not 0 < frac < 1:
                raise ValueError(f"initial beta {beta} lies outside the bounds {self.bounds}")
            return math.log(frac / (1 - frac))
        if self.parameterization == "exp":
            return math.log(beta)
        return beta + math.log(-math.expm1(-beta))

    def at_bound(self, log_beta: Tensor, tolerance: float = 0.01) -> Tensor:
        """True where beta lies within ``tolerance`` (share of the log range) of a bound."""
        if self.bounds is None:
            return torch.zeros_like(log_beta, dtype=torch.bool)
        log_lo, log_hi = (math.log(b) for b in self.bounds)
        margin = tolerance * (log_hi - log_lo)
        return (log_beta <= log_lo + margin) | (log_beta >= log_hi - margin)

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization!r}, bounds={self.bounds}"


# --------------------------------------------------------------------------- base class


class Weighting(nn.Module):
    """Base class: knows the channels, which of them carry a beta, and their ``d``."""

    def __init__(
        self,
        channels: Sequence[str],
        *,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if len(set(channels)) != len(channels):
            raise ValueError(f"channel names must be unique, got {channels}")
        if not channels:
            raise ValueError("a weighting needs at least one channel")
        self.channels = channels
        self.weight_ce = weight_ce
        self.weighted_channels = [c for c in channels if c != CE or weight_ce]
        dims = _per_channel(d, self.weighted_channels, "d", default=1.0)
        if any(v <= 0 for v in dims.values()):
            raise ValueError(f"d must be > 0 for every channel, got {dims}")
        self.register_buffer(
            "d", torch.tensor([dims[c] for c in self.weighted_channels]), persistent=False
        )
        self.register_buffer(
            "weighted_mask",
            torch.tensor([c in self.weighted_channels for c in channels]),
            persistent=False,
        )

    def forward(self, losses: Tensor, representation: Tensor | None = None) -> WeightingOutput:
        if losses.dim() != 2 or losses.shape[1] != len(self.channels):
            raise ValueError(
                f"expected losses of shape [B, {len(self.channels)}] for channels "
                f"{self.channels}, got {tuple(losses.shape)}"
            )
        with torch.autocast(device_type=losses.device.type, enabled=False):
            if representation is not None:
                representation = at_least_float32(representation)
            return self.combine(at_least_float32(losses), representation)

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        raise NotImplementedError

    def assemble(
        self, losses: Tensor, betas: Tensor, regulariser: Tensor, at_bound: Tensor
    ) -> WeightingOutput:
        """Fill the weighted columns with beta-weighted terms; other columns enter as-is."""
        b, c = losses.shape
        losses = losses.to(torch.promote_types(losses.dtype, betas.dtype))
        full_betas = losses.new_ones(b, c)
        full_reg = losses.new_zeros(b, c)
        full_bound = torch.zeros(b, c, dtype=torch.bool, device=losses.device)
        full_betas = full_betas.masked_scatter(self.weighted_mask, betas.to(losses.dtype))
        full_reg = full_reg.masked_scatter(self.weighted_mask, regulariser.to(losses.dtype))
        full_bound = full_bound.masked_scatter(self.weighted_mask, at_bound)
        weighted = full_betas * losses
        return WeightingOutput(
            per_sample_loss=(weighted + full_reg).sum(dim=1),
            betas=full_betas.detach(),
            weighted=weighted,
            regulariser=full_reg,
            at_bound=full_bound,
        )

    def weighted_losses(self, losses: Tensor) -> Tensor:
        return losses[:, self.weighted_mask]

    def laplace_terms(self, log_beta: Tensor) -> tuple[Tensor, Tensor]:
        """beta and the Laplace regulariser -(d/2) log beta for ``[B, K]`` log-betas."""
        return log_beta.exp(), -0.5 * self.d * log_beta


def _per_channel(
    value: float | Mapping[str, float], channels: Sequence[str], what: str, default: float
) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(channels))
        if unknown:
            raise ValueError(f"{what} names unknown channel(s) {unknown}; channels: {channels}")
        return {c: float(value.get(c, default)) for c in channels}
    return {c: float(value) for c in channels}


# --------------------------------------------------------------------------- fixed weightings


class EqualWeighting(Weighting):
    """Every channel, CE included, with weight 1: the plain sum."""

    def __init__(self, channels: Sequence[str]) -> None:
        super().__init__(channels, weight_ce=True)

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        zeros = torch.zeros_like(losses)
        return self.assemble(losses, torch.ones_like(losses), zeros, zeros.bool())


class FixedWeighting(Weighting):
    """User-given constant weights per channel (CE defaults to 1), no regulariser."""

    def __init__(self, channels: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(channels, weight_ce=True)
        missing = sorted(set(channels) - set(weights) - {CE})
        if missing:
            raise ValueError(f"fixed weighting needs a weight for channel(s) {missing}")
        values = _per_channel(weights, channels, "weights", default=1.0)
        if any(v < 0 for v in values.values()):
            raise ValueError(f"fixed weights must be >= 0, got {values}")
        self.register_buffer("weights", torch.tensor([values[c] for c in channels]))

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        betas = self.weights.expand_as(losses)
        zeros = torch.zeros_like(losses)
        return self.assemble(losses, betas, zeros, zeros.bool())


# --------------------------------------------------------------------------- Beta-KD weightings


class TaskWeighting(Weighting):
    """Task-level Beta-KD: one learned positive beta per weighted channel, shared by all samples."""

    def __init__(
        self,
        channels: Sequence[str],
        *,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        parameterization: str = "exp",
        bounds: tuple[float, float] | None = None,
        init_beta: float = 1.0,
    ) -> None:
        super().__init__(channels, weight_ce=weight_ce, d=d)
        self.positive = PositiveMap(parameterization, bounds)
        k = len(self.weighted_channels)
        self.raw = nn.Parameter(torch.full((k,), self.positive.inverse(init_beta)))

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        log_beta = self.positive.log_beta(self.raw).expand(losses.shape[0], -1)
        beta, reg = self.laplace_terms(log_beta)
        return self.assemble(losses, beta, reg, self.positive.at_bound(log_beta))


class InstanceWeighting(Weighting):
    """Instance-level Beta-KD: beta per sample and channel predicted from a representation.

    ``g_phi``: Linear(D, hidden) -> ReLU -> Linear(hidden, K), mapped to positive values;
    ``normalize_input`` puts a LayerNorm in front (useful for wide inputs such as pooled
    visual tokens, harmful for a handful of statistics, whose relative scale it erases). The representation is whatever the caller feeds (pooled teacher
    visual tokens, pooled answer hidden states, teacher confidence statistics); it is
    detached by default so the weighting cannot steer the student's features.
    The last layer starts at zero, so every beta starts at ``init_beta``.
    """

    def __init__(
        self,
        channels: Sequence[str],
        input_dim: int,
        *,
        hidden: int = 128,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        parameterization: str = "exp",
        bounds: tuple[float, float] | None = None,
        init_beta: float = 1.0,
        detach_representation: bool = True,
        normalize_input: bool = False,
    ) -> None:
        super().__init__(channels, weight_ce=weight_ce, d=d)
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        self.positive = PositiveMap(parameterization, bounds)
        self.detach_representation = detach_representation
        self.input_dim = input_dim
        k = len(self.weighted_channels)
        self.net = nn.Sequential(
            nn.LayerNorm(input_dim, elementwise_affine=False) if normalize_input else nn.Identity(),
            nn.Linear(input_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, k),
        )
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.fill_(self.positive.inverse(init_beta))

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        h = _require_representation(representation, losses.shape[0], self.input_dim)
        if self.detach_representation:
            h = h.detach()
        log_beta = self.positive.log_beta(self.net(h))
        beta, reg = self.laplace_terms(log_beta)
        return self.assemble(losses, beta, reg, self.positive.at_bound(log_beta))


class ClosedFormWeighting(Weighting):
    """No parameters: beta = d / (2 * stopgrad(l)), the optimum of the surrogate for fixed l.

    ``per="sample"`` uses each sample's energy; ``per="channel"`` the (micro-)batch mean.
    ``min_energy`` keeps beta finite when an energy reaches zero.
    """

    def __init__(
        self,
        channels: Sequence[str],
        *,
        per: str = "sample",
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        min_energy: float = 1e-6,
    ) -> None:
        super().__init__(channels, weight_ce=weight_ce, d=d)
        if per not in ("sample", "channel"):
            raise ValueError(f"per must be 'sample' or 'channel', got {per!r}")
        if not min_energy > 0:
            raise ValueError(f"min_energy must be > 0, got {min_energy}")
        self.per = per
        self.min_energy = min_energy

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        energy = self.weighted_losses(losses).detach()
        if self.per == "channel":
            energy = energy.mean(dim=0, keepdim=True).expand_as(energy)
        floored = energy <= self.min_energy
        log_beta = torch.log(self.d / 2) - torch.log(energy.clamp_min(self.min_energy))
        beta, reg = self.laplace_terms(log_beta)
        return self.assemble(losses, beta, reg, floored)


class ReferenceWeighting(Weighting):
    """The authors' code, reproduced exactly for parity runs (CE is always weighted).

    Log-variance ``s``, ``beta = exp(-clamp(s, -5, 5))``.
    ``task``:     sum_k 0.5 * (beta_k * L_k + s_k)
    ``instance``: mean_i sum_k (beta_ik * L_k + s_ik), with ``L_k`` the batch-mean loss,
    so instance weights never re-weight samples against each other (a known defect),
    and the result depends on the micro-batch (no accumulation invariance).
    """

    def __init__(
        self,
        channels: Sequence[str],
        *,
        level: str = "task",
        input_dim: int | None = None,
        hidden: int = 128,
    ) -> None:
        super().__init__(channels, weight_ce=True)
        if level not in ("task", "instance"):
            raise ValueError(f"reference level must be 'task' or 'instance', got {level!r}")
        self.level = level
        k = len(self.channels)
        if level == "task":
            self.s = nn.Parameter(torch.zeros(k))
        else:
            if input_dim is None or input_dim < 1:
                raise ValueError("reference instance weighting needs input_dim >= 1")
            self.input_dim = input_dim
            self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def combine(self, losses: Tensor, representation: Tensor | None) -> WeightingOutput:
        if self.level == "task":
            s = self.s.expand_as(losses)
            scale, used = 0.5, losses
        else:
            h = _require_representation(representation, losses.shape[0], self.input_dim)
            s = self.net(h.detach())
            scale, used = 1.0, losses.mean(dim=0, keepdim=True).expand_as(losses)
        beta = torch.exp(-s.clamp(-5.0, 5.0))
        weighted = scale * beta * used
        regulariser = scale * s
        return WeightingOutput(
            per_sample_loss=(weighted + regulariser).sum(dim=1),
            betas=(scale * beta).detach(),
            weighted=weighted,
            regulariser=regulariser,
            at_bound=s.detach().abs() >= 5.0,
        )


def at_least_float32(x: Tensor) -> Tensor:
    """Half-precision inputs go to float32; float64 stays (finite-difference checks use it)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _require_representation(representation: Tensor | None, batch: int, dim: int) -> Tensor:
    if representation is None:
        raise ValueError("instance weighting needs a representation h(x) of shape [B, D]")
    if representation.shape != (batch, dim):
        raise ValueError(
            f"representation must have shape [{batch}, {dim}], got {tuple(representation.shape)}"
        )
    return representation


# --------------------------------------------------------------------------- registry

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "task": TaskWeighting,
    "instance": InstanceWeighting,
    "closed_form": ClosedFormWeighting,
    "reference": ReferenceWeighting,
}


def names() -> list[str]:
    return sorted(WEIGHTINGS)


def build(name: str, channels: Sequence[str], **options: object) -> Weighting:
    """Build a weighting by name; unknown names or options raise with what is accepted."""
    if name not in WEIGHTINGS:
        raise KeyError(f"unknown weighting {name!r}; available: {', '.join(names())}")
    cls = WEIGHTINGS[name]
    try:
        return cls(channels, **options)
    except TypeError as err:
        raise TypeError(f"weighting {name!r}: {err}") from err
