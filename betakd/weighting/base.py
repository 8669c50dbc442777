"""The weighting base class, its output, and the positive maps of its betas."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from betakd.reliability import TeacherReliability
from betakd.weighting.options import (
    TRUST_AND_RELIABILITY,
    KindOptions,
    ReliabilityOptions,
    TrustOptions,
)
from betakd.weighting.robust import GammaPrior, SharedTrust

CE = "ce"


@dataclass
class WeightingOutput:
    """Per-sample results of a weighting; every tensor is ``[B]`` or ``[B, C]``."""

    per_sample_loss: Tensor
    betas: Tensor
    weighted: Tensor
    regulariser: Tensor
    at_bound: Tensor
    # The learned precisions before a trust, reliability or channel gain multiplied them
    # (the regulariser is computed on these); None where nothing multiplies them.
    learned_betas: Tensor | None = None


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
    """Base class: knows the channels, which of them carry a beta, and their ``d``.

    It also holds what the robust options need: the per-channel energy scale (a buffer,
    present only when an option uses it) and the shared trust.
    """

    # True where a weighting's betas already depend on each sample's own energy or input.
    per_sample = False
    # The model its options are parsed into (``betakd.weighting.build``, a config's
    # ``weighting.options``); the constructor takes the parsed object.
    options_model: ClassVar[type[KindOptions]] = KindOptions

    def __init__(
        self,
        channels: Sequence[str],
        *,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        prior: GammaPrior | None = None,
        trust: TrustOptions | SharedTrust | None = None,
        reliability: ReliabilityOptions | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
        uses_energy_scale: bool = False,
    ) -> None:
        """``trust``: the shared trust, or its parsed options; ``reliability``: the
        teacher-reliability model (``betakd.reliability``) whose posteriors multiply the
        teacher channels' betas and the CE, or its parsed options; ``channel_teachers``:
        which teacher each teacher channel reads, when there are several (default: one)."""
        super().__init__()
        self._uses_energy_scale = uses_energy_scale
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
        # A schedule's factor per weighted channel (see set_channel_gains); not saved, as
        # the trainer sets it from the step before every step.
        self.register_buffer(
            "channel_gain", torch.ones(len(self.weighted_channels)), persistent=False
        )
        self.prior = prior or GammaPrior()
        self.register_buffer("concentration", self.prior.concentration(self.d), persistent=False)
        self.trust = trust.build() if isinstance(trust, TrustOptions) else trust
        if self.trust is not None:
            unknown = sorted(set(self.trust.channels) - set(self.weighted_channels))
            if unknown:
                raise ValueError(
                    f"trust channels {unknown} are not weighted channels {self.weighted_channels}"
                )
        self.reliability_teacher = self._reliability_teachers(channel_teachers)
        if isinstance(reliability, ReliabilityOptions):
            reliability = reliability.build(teachers=max(self.reliability_teacher) + 1)
        self.reliability = reliability
        if self.reliability is not None and self.trust is not None:
            raise ValueError(TRUST_AND_RELIABILITY)
        if scale_momentum is not None and not 0 <= scale_momentum < 1:
            raise ValueError(f"scale_momentum must be in [0, 1), got {scale_momentum}")
        self.scale_momentum = scale_momentum
        if self.needs_energy_scale:
            # Persistent: checkpoints and init_from carry it, so a resumed run continues
            # with the same scale instead of measuring it again.
            self.register_buffer(
                "energy_scale", torch.full((len(self.weighted_channels),), math.nan)
            )

    def set_channel_gains(self, gains: Mapping[str, float]) -> None:
        """Scheduled factors on some weighted channels' betas (others keep theirs),
        applied like the trust: after the regulariser, as a constant of the gradient."""
        unknown = sorted(set(gains) - set(self.weighted_channels))
        if unknown:
            raise ValueError(f"gains for unknown weighted channel(s) {unknown}")
        for name, gain in gains.items():
            if gain < 0:
                raise ValueError(f"a channel gain must be >= 0, got {gain} for {name!r}")
            self.channel_gain[self.weighted_channels.index(name)] = gain

    # ----------------------------------------------------------------- energy scale

    @property
    def needs_energy_scale(self) -> bool:
        return (
            self._uses_energy_scale
            or self.prior.rate_scale is not None
            or (self.trust is not None and self.trust.reference == "student")
            or self.scale_momentum is not None
        )

    @property
    def has_energy_scale(self) -> bool:
        return self.needs_energy_scale and bool(torch.isfinite(self.energy_scale).all())

    def set_energy_scale(self, mean_energy: Tensor) -> None:
        """Set the scale from each weighted channel's mean energy ``[K]`` (calibration)."""
        values = self._positive_means(mean_energy)
        self.energy_scale.copy_(values)

    def observe_energy(self, mean_energy: Tensor) -> None:
        """Fold one optimizer step's mean energies ``[K]`` into the running scale."""
        if self.scale_momentum is None:
            return
        values = self._positive_means(mean_energy)
        if not self.has_energy_scale:
            self.energy_scale.copy_(values)
            return
        m = self.scale_momentum
        self.energy_scale.mul_(m).add_((1 - m) * values)

    def _positive_means(self, mean_energy: Tensor) -> Tensor:
        if not self.needs_energy_scale:
            raise RuntimeError("this weighting uses no energy scale")
        values = mean_energy.detach().to(self.energy_scale)
        if values.shape != self.energy_scale.shape:
            raise ValueError(
                f"expected {len(self.weighted_channels)} mean energies for "
                f"{self.weighted_channels}, got shape {tuple(values.shape)}"
            )
        # A channel whose energy is exactly zero would make every relative energy infinite.
        return values.clamp_min(1e-8)

    def _scale(self) -> Tensor | None:
        if not self.needs_energy_scale:
            return None
        if not self.has_energy_scale:
            raise RuntimeError(
                "this weighting needs each channel's energy scale (prior_rate_scale, trust "
                "or scale_momentum): call set_energy_scale() first (betakd train measures it "
                "on the first training samples before training)"
            )
        return self.energy_scale

    # ----------------------------------------------------------------- forward

    @property
    def needs_teacher_nll(self) -> bool:
        """Whether ``forward`` needs the teacher's per-sample NLL of the data answers."""
        return self.reliability is not None or (
            self.trust is not None and self.trust.reference == "data"
        )

    def _reliability_teachers(self, channel_teachers: Mapping[str, str | None] | None) -> list:
        """Per weighted channel, the index of its teacher (CE: that of the first one)."""
        teacher_channels = [c for c in self.weighted_channels if c != CE]
        if channel_teachers is None:
            return [0] * len(self.weighted_channels)
        missing = sorted(set(teacher_channels) - set(channel_teachers))
        if missing:
            raise ValueError(f"channel_teachers misses teacher channel(s) {missing}")
        order = list(dict.fromkeys(channel_teachers[c] for c in teacher_channels))
        return [order.index(channel_teachers[c]) if c != CE else 0 for c in self.weighted_channels]

    def reliability_nll(self, teacher_nll: Tensor) -> Tensor:
        """``[B, T]``: each teacher's NLL once, from the per-sample (``[B]``) or
        per-weighted-channel (``[B, K]``) NLLs the trainer passes."""
        if teacher_nll.dim() == 1:
            return teacher_nll[:, None]
        first = {}
        for column, teacher in enumerate(self.reliability_teacher):
            if self.weighted_channels[column] != CE:
                first.setdefault(teacher, column)
        return teacher_nll[:, [first[t] for t in sorted(first)]]

    def forward(
        self,
        losses: Tensor,
        representation: Tensor | None = None,
        teacher_nll: Tensor | None = None,
    ) -> WeightingOutput:
        if losses.dim() != 2 or losses.shape[1] != len(self.channels):
            raise ValueError(
                f"expected losses of shape [B, {len(self.channels)}] for channels "
                f"{self.channels}, got {tuple(losses.shape)}"
            )
        shapes = ((losses.shape[0],), (losses.shape[0], len(self.weighted_channels)))
        if self.needs_teacher_nll and (teacher_nll is None or teacher_nll.shape not in shapes):
            raise ValueError(
                "trust with reference 'data' needs the teacher's per-sample NLL of the answers "
                f"(shape [{losses.shape[0]}], or [{losses.shape[0]}, "
                f"{len(self.weighted_channels)}] with one teacher per weighted channel), got "
                f"{None if teacher_nll is None else tuple(teacher_nll.shape)}"
            )
        with torch.autocast(device_type=losses.device.type, enabled=False):
            if representation is not None:
                representation = at_least_float32(representation)
            losses = at_least_float32(losses)
            if self.reliability is None:
                return self.combine(losses, representation, self.trust_factors(losses, teacher_nll))
            return self.combine_reliable(losses, representation, teacher_nll)

    def combine_reliable(
        self, losses: Tensor, representation: Tensor | None, teacher_nll: Tensor
    ) -> WeightingOutput:
        """Weigh with the reliability's posteriors: each teacher channel's beta times
        ``P(its teacher is right)``, the CE times ``P(the label is right)`` (detached)."""
        if representation is None:
            raise ValueError("the teacher reliability needs a representation h(x) of shape [B, D]")
        teacher_right, label_right = self.reliability.factors(
            self.reliability_nll(teacher_nll), representation
        )
        out = self.combine(losses, representation, self._per_channel(teacher_right, losses.dtype))
        ce = self.channels.index(CE)
        factor = torch.ones_like(out.weighted)
        factor[:, ce] = label_right.to(losses.dtype)
        weighted = out.weighted * factor
        return WeightingOutput(
            per_sample_loss=(weighted + out.regulariser).sum(dim=1),
            betas=out.betas * factor,
            weighted=weighted,
            regulariser=out.regulariser,
            at_bound=out.at_bound,
            learned_betas=out.learned_betas,
        )

    def _per_channel(self, teacher_right: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, K]``: each weighted teacher channel gets its teacher's column of
        ``teacher_right [B, T]``; the CE column 1."""
        columns = teacher_right[:, self.reliability_teacher].to(dtype)
        is_teacher = torch.tensor(
            [c != CE for c in self.weighted_channels], device=teacher_right.device
        )
        return torch.where(is_teacher, columns, 1.0)

    def teacher_factors(self, teacher_nll: Tensor, representation: Tensor | None) -> Tensor:
        """``[B, K]``: the factor the data trust or the reliability puts on each weighted
        channel's beta, from the teacher's NLL of the answers (what the trainer reports
        at the start of a run). Needs ``needs_teacher_nll``."""
        if not self.needs_teacher_nll:
            raise ValueError("teacher factors need a data trust or a teacher reliability")
        if self.reliability is not None:
            right, _ = self.reliability.factors(self.reliability_nll(teacher_nll), representation)
            return self._per_channel(right, torch.float32)
        placeholder = teacher_nll.new_zeros(teacher_nll.shape[0], len(self.channels)).float()
        return self.trust_factors(placeholder, teacher_nll)

    def combine(
        self, losses: Tensor, representation: Tensor | None, trust: Tensor
    ) -> WeightingOutput:
        """Weigh ``losses [B, C]``; ``trust [B, K]`` multiplies the weighted channels' betas.

        The trust (a detached factor) is applied after the regulariser is computed: it
        re-weights samples, it is not a learned precision.
        """
        betas, regulariser, at_bound = self.precisions(losses, representation)
        factor = trust.to(betas.dtype) * self.channel_gain.to(betas.dtype)
        out = self.assemble(losses, betas * factor, regulariser, at_bound)
        out.learned_betas = self.assemble(losses, betas, regulariser, at_bound).betas
        return out

    def precisions(
        self, losses: Tensor, representation: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, K]`` betas, regularisers and at-bound flags of the weighted channels."""
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

    def trust_factors(self, losses: Tensor, teacher_nll: Tensor | None = None) -> Tensor:
        """``[B, K]`` multipliers of the weighted channels' betas (ones without trust)."""
        ones = losses.new_ones(losses.shape[0], len(self.weighted_channels))
        if self.trust is None:
            return ones
        if self.trust.reference == "data":
            disagreement = teacher_nll.detach().to(losses)
        else:
            scale = self._scale()
            weighted = self.weighted_losses(losses).detach()
            columns = [self.weighted_channels.index(c) for c in self.trust.channels]
            disagreement = (weighted[:, columns] / scale[columns]).mean(dim=1)
        tau = self.trust.factor(disagreement).to(losses.dtype)
        applies = torch.tensor(
            [
                c != CE and not (self.per_sample and c in self.trust.channels)
                for c in self.weighted_channels
            ],
            device=losses.device,
        )
        return torch.where(applies, tau if tau.dim() == 2 else tau[:, None], ones)

    def weighted_losses(self, losses: Tensor) -> Tensor:
        return losses[:, self.weighted_mask]

    def laplace_terms(
        self, log_beta: Tensor, losses: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """beta and the regulariser ``b * beta - c * log beta`` for ``[B, K]`` log-betas.

        Without a hyperprior, ``b = 0`` and ``c = d/2``: the Laplace term -(d/2) log beta.
        """
        beta = log_beta.exp()
        regulariser = -self.concentration * log_beta
        if self.prior.active:
            rates = self.prior.rates(self._scale(), self.concentration)
            regulariser = regulariser + rates * beta
        return beta, regulariser

    def prior_rates(self) -> Tensor:
        """b per weighted channel ``[K]`` (zeros without a hyperprior)."""
        return self.prior.rates(self._scale(), self.concentration)


def _per_channel(
    value: float | Mapping[str, float], channels: Sequence[str], what: str, default: float
) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(channels))
        if unknown:
            raise ValueError(f"{what} names unknown channel(s) {unknown}; channels: {channels}")
        return {c: float(value.get(c, default)) for c in channels}
    return {c: float(value) for c in channels}


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
