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

Two additions bound the per-sample forms (analysis and measurements: docs/weighting.md):

* a conjugate **Gamma(a, b) hyperprior** on every beta (``prior_shape`` a,
  ``prior_rate`` b or ``prior_rate_scale`` rho with b = rho * the channel's energy
  scale): the surrogate becomes ``beta * (l + b) - (d/2 + a - 1) * log(beta)``, its
  optimum ``(d/2 + a - 1) / (l + b)`` is bounded by its value at ``l = 0``, and its
  profile ``(d/2 + a - 1) * log(l + b)`` is bounded below (a Student-t-like robust loss);
* a **shared per-sample trust** (``trust``): a factor in (0, tau_max] computed from the
  relative energy of some channels (by default the logit channels) that multiplies the
  betas of the channels that cannot tell by themselves where the teacher is unreliable
  (feature channels, whose energy is no higher where the teacher is wrong).

The **energy scale** of a channel (a buffer) is its mean energy over the first
training samples, measured before training (``calibrate_energy_scale``), optionally
followed by a running mean over earlier optimizer steps (``scale_momentum``). It never
comes from the current micro-batch, so the weights do not depend on how a batch is split.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from betakd.reliability import TeacherReliability

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


# --------------------------------------------------------------------------- robust pieces


@dataclass(frozen=True)
class GammaPrior:
    """A conjugate Gamma(shape a, rate b) hyperprior on beta.

    ``rate`` is absolute; ``rate_scale`` (rho) makes it relative: b = rho * the
    channel's energy scale. ``shape=1, rate=0`` is the flat prior (plain Beta-KD).
    """

    shape: float = 1.0
    rate: float = 0.0
    rate_scale: float | None = None

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"prior_rate must be >= 0, got {self.rate}")
        if self.rate_scale is not None and self.rate_scale <= 0:
            raise ValueError(f"prior_rate_scale must be > 0, got {self.rate_scale}")
        if self.rate_scale is not None and self.rate > 0:
            raise ValueError("give prior_rate or prior_rate_scale, not both")

    @property
    def active(self) -> bool:
        return self.shape != 1.0 or self.rate > 0 or self.rate_scale is not None

    def concentration(self, d: Tensor) -> Tensor:
        """c = d/2 + a - 1: the weight of -log(beta) in the surrogate."""
        c = d / 2 + self.shape - 1
        if not bool((c > 0).all()):
            raise ValueError(f"d/2 + prior_shape - 1 must be > 0, got {c.tolist()}")
        return c

    def rates(self, energy_scale: Tensor | None, like: Tensor) -> Tensor:
        if self.rate_scale is None:
            return torch.full_like(like, self.rate)
        return self.rate_scale * energy_scale


TRUST_KINDS = ("mixture", "gamma", "superloss")
TRUST_REFERENCES = ("student", "data")


@dataclass(frozen=True)
class SharedTrust:
    """A per-sample trust in the teacher in (0, 1], shared by the teacher's channels.

    It is a function of how much the teacher disagrees on a sample, measured against
    ``reference``:

    * ``"data"``: the teacher's mean negative log-likelihood of the sample's answer
      tokens, in nats. Available from the first step and independent of the student:
      where the teacher cannot explain the data (its blind spots, and wrong labels) it is
      trusted less. Applies to every teacher channel.
    * ``"student"``: the relative student-teacher energy
      ``r_i = mean_{k in channels} l_ik / s_k`` (``s_k`` the channel's energy scale).
      Applies to the channels whose beta is not already per sample from its own energy
      (closed-form and instance betas of the trust channels keep theirs).

    and a shape (the disagreement ``x`` is detached):

    * ``kind="mixture"``: ``tau = 1 / (1 + exp(x - threshold))``. For ``reference="data"``
      this is the posterior probability that the answer came from the teacher rather
      than from an alternative that explains it no matter what (a wrong label, or a
      sample the teacher does not know), in a two-component mixture whose prior odds and
      alternative likelihood set ``threshold`` (nats): full trust while the teacher gives
      the answer a fair probability, then an exponential fall-off;
    * ``kind="gamma"``: ``tau = rho / (x + rho)``, the Gamma posterior's precision relative
      to its bound (1 where the teacher agrees, fading like ``rho / x``);
    * ``kind="superloss"`` (Castells et al., NeurIPS 2020): SuperLoss's closed-form
      confidence ``exp(-W(max(-2/e, (x - threshold) / lam) / 2))``, divided by its
      maximum ``e`` so it lies in (0, 1].

    The CE channel never takes it.
    """

    channels: tuple[str, ...] = ()
    reference: str = "student"
    kind: str = "mixture"
    rho: float = 1.0
    lam: float = 1.0
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.reference not in TRUST_REFERENCES:
            raise ValueError(
                f"trust reference must be one of {TRUST_REFERENCES}, got {self.reference!r}"
            )
        if self.reference == "student" and not self.channels:
            raise ValueError("trust with reference 'student' needs channels to infer it from")
        if self.reference == "data" and self.channels:
            raise ValueError(
                "trust with reference 'data' is inferred from the answers: no channels"
            )
        if self.kind not in TRUST_KINDS:
            raise ValueError(f"trust kind must be one of {TRUST_KINDS}, got {self.kind!r}")
        if self.rho <= 0 or self.lam <= 0:
            raise ValueError(f"trust rho and lam must be > 0, got {self.rho}, {self.lam}")

    def factor(self, disagreement: Tensor) -> Tensor:
        x = disagreement.detach()
        if self.kind == "mixture":
            return torch.sigmoid(self.threshold - x)
        if self.kind == "gamma":
            return self.rho / (x + self.rho)
        clamped = torch.clamp((x - self.threshold) / self.lam, min=-2 / math.e) / 2
        return torch.exp(-lambert_w(clamped) - 1)


def lambert_w(x: Tensor, iterations: int = 12) -> Tensor:
    """Principal branch W0 of the Lambert W function (w e^w = x) for x >= -1/e.

    Halley's iteration from a start that is exact to second order at the branch point.
    """
    x64 = x.double()
    branch = torch.sqrt((2 * (math.e * x64 + 1)).clamp_min(0))
    w = torch.where(x64 < 0.25, -1 + branch - branch**2 / 3, torch.log1p(x64))
    w = torch.where(x64 > 3, torch.log(x64) - torch.log(torch.log(x64.clamp_min(3))), w)
    for _ in range(iterations):
        ew = torch.exp(w)
        f = w * ew - x64
        denom = ew * (w + 1) - (w + 2) * f / (2 * w + 2).where(w != -1, torch.ones_like(w))
        step = torch.where(denom.abs() > 1e-300, f / denom, torch.zeros_like(f))
        w = w - step
    return w.to(x.dtype)


def option_group(value: object, name: str, keys: set[str]) -> dict:
    """A nested option group (``trust``, ``reliability``) as a dict, its keys checked."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping of options {sorted(keys)}, got {value!r}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; expected some of {sorted(keys)}")
    return dict(value)


TRUST_KEYS = {"channels", "reference", "kind", "rho", "lam", "threshold"}


def build_trust(trust: Mapping | SharedTrust | None) -> SharedTrust | None:
    if trust is None or isinstance(trust, SharedTrust):
        return trust
    options = option_group(trust, "trust", TRUST_KEYS)
    channels = options.pop("channels", None)
    if isinstance(channels, str):
        channels = [channels]
    return SharedTrust(tuple(channels or ()), **options)


RELIABILITY_KEYS = {"input_dim", "teachers", "l2", "anchor_share"}


def build_reliability(
    reliability: Mapping | TeacherReliability | None,
) -> TeacherReliability | None:
    """A :class:`TeacherReliability` from its options (``input_dim``: the width of the
    representation h(x), which ``betakd train`` fills in)."""
    if reliability is None or isinstance(reliability, TeacherReliability):
        return reliability
    options = option_group(reliability, "reliability", RELIABILITY_KEYS)
    if "input_dim" not in options:
        raise ValueError("reliability needs input_dim, the width of the representation h(x)")
    return TeacherReliability(int(options.pop("input_dim")), **options)


# --------------------------------------------------------------------------- base class


class Weighting(nn.Module):
    """Base class: knows the channels, which of them carry a beta, and their ``d``.

    It also holds what the robust options need: the per-channel energy scale (a buffer,
    present only when an option uses it) and the shared trust.
    """

    # True where a weighting's betas already depend on each sample's own energy or input.
    per_sample = False

    def __init__(
        self,
        channels: Sequence[str],
        *,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        prior: GammaPrior | None = None,
        trust: Mapping | SharedTrust | None = None,
        reliability: Mapping | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
        uses_energy_scale: bool = False,
    ) -> None:
        """``reliability``: the teacher-reliability model (``betakd.reliability``) whose
        posteriors multiply the teacher channels' betas and the CE; ``channel_teachers``:
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
        self.trust = build_trust(trust)
        if self.trust is not None:
            unknown = sorted(set(self.trust.channels) - set(self.weighted_channels))
            if unknown:
                raise ValueError(
                    f"trust channels {unknown} are not weighted channels {self.weighted_channels}"
                )
        self.reliability_teacher = self._reliability_teachers(channel_teachers)
        if reliability is not None and not isinstance(reliability, TeacherReliability):
            reliability = {"teachers": max(self.reliability_teacher) + 1, **reliability}
        self.reliability = build_reliability(reliability)
        if self.reliability is not None and self.trust is not None:
            raise ValueError(
                "give trust or reliability, not both: both set a per-sample factor on the "
                "teacher channels"
            )
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


def prior_from_options(
    prior_shape: float = 1.0, prior_rate: float = 0.0, prior_rate_scale: float | None = None
) -> GammaPrior:
    return GammaPrior(prior_shape, prior_rate, prior_rate_scale)


# --------------------------------------------------------------------------- fixed weightings


class EqualWeighting(Weighting):
    """Every channel, CE included, with weight 1: the plain sum."""

    def __init__(self, channels: Sequence[str]) -> None:
        super().__init__(channels, weight_ce=True)

    def precisions(self, losses: Tensor, representation: Tensor | None):
        zeros = torch.zeros_like(losses)
        return torch.ones_like(losses), zeros, zeros.bool()


class FixedWeighting(Weighting):
    """User-given constant weights per channel (CE defaults to 1), no regulariser.

    ``scale_relative=True`` gives the weights in units of the initial loss scales: the
    weight of teacher channel k is ``weights[k] * s_ce / s_k`` (``s`` the energy scales
    measured before training), so all-ones weights are the paper's manual baseline,
    every channel starting at the CE's scale. With ``trust``, the teacher channels'
    weights are multiplied per sample by the shared trust (the robust re-weighting
    alone, without learned precisions).
    """

    def __init__(
        self,
        channels: Sequence[str],
        weights: Mapping[str, float],
        *,
        scale_relative: bool = False,
        trust: Mapping | SharedTrust | None = None,
        reliability: Mapping | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
    ) -> None:
        super().__init__(
            channels,
            weight_ce=True,
            trust=trust,
            reliability=reliability,
            channel_teachers=channel_teachers,
            scale_momentum=scale_momentum,
            uses_energy_scale=scale_relative,
        )
        if scale_relative and CE not in channels:
            raise ValueError(f"scale_relative weights are relative to the {CE!r} channel")
        self.scale_relative = scale_relative
        missing = sorted(set(channels) - set(weights) - {CE})
        if missing:
            raise ValueError(f"fixed weighting needs a weight for channel(s) {missing}")
        values = _per_channel(weights, channels, "weights", default=1.0)
        if any(v < 0 for v in values.values()):
            raise ValueError(f"fixed weights must be >= 0, got {values}")
        self.register_buffer("weights", torch.tensor([values[c] for c in channels]))

    def precisions(self, losses: Tensor, representation: Tensor | None):
        betas = self.weights.expand_as(losses)
        if self.scale_relative:
            scale = self._scale()
            betas = betas * (scale[self.channels.index(CE)] / scale)
        zeros = torch.zeros_like(losses)
        return betas, zeros, zeros.bool()


# --------------------------------------------------------------------------- Beta-KD weightings


class TaskWeighting(Weighting):
    """Task-level Beta-KD: one learned positive beta per weighted channel, shared by all samples.

    With a Gamma hyperprior the learned beta tends to ``(d/2 + a - 1) / (mean l + b)``.
    """

    def __init__(
        self,
        channels: Sequence[str],
        *,
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        parameterization: str = "exp",
        bounds: tuple[float, float] | None = None,
        init_beta: float = 1.0,
        prior_shape: float = 1.0,
        prior_rate: float = 0.0,
        prior_rate_scale: float | None = None,
        trust: Mapping | SharedTrust | None = None,
        reliability: Mapping | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
    ) -> None:
        super().__init__(
            channels,
            weight_ce=weight_ce,
            d=d,
            prior=prior_from_options(prior_shape, prior_rate, prior_rate_scale),
            trust=trust,
            reliability=reliability,
            channel_teachers=channel_teachers,
            scale_momentum=scale_momentum,
        )
        self.positive = PositiveMap(parameterization, bounds)
        k = len(self.weighted_channels)
        self.raw = nn.Parameter(torch.full((k,), self.positive.inverse(init_beta)))

    def precisions(self, losses: Tensor, representation: Tensor | None):
        log_beta = self.positive.log_beta(self.raw).expand(losses.shape[0], -1)
        beta, reg = self.laplace_terms(log_beta)
        return beta, reg, self.positive.at_bound(log_beta)


class InstanceWeighting(Weighting):
    """Instance-level Beta-KD: beta per sample and channel predicted from a representation.

    ``g_phi``: Linear(D, hidden) -> ReLU -> Linear(hidden, K), mapped to positive values;
    ``normalize_input`` puts a LayerNorm in front (useful for wide inputs such as pooled
    visual tokens, harmful for a handful of statistics, whose relative scale it erases).
    The representation is whatever the caller feeds (pooled teacher visual tokens,
    pooled answer hidden states, teacher confidence statistics); it is detached by
    default so the weighting cannot steer the student's features. The last layer starts
    at zero, so every beta starts at ``init_beta``. With a Gamma hyperprior the network
    learns ``(d/2 + a - 1) / (E[l | h(x)] + b)``: an amortised, bounded, robust beta.
    """

    per_sample = True

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
        prior_shape: float = 1.0,
        prior_rate: float = 0.0,
        prior_rate_scale: float | None = None,
        trust: Mapping | SharedTrust | None = None,
        reliability: Mapping | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
    ) -> None:
        super().__init__(
            channels,
            weight_ce=weight_ce,
            d=d,
            prior=prior_from_options(prior_shape, prior_rate, prior_rate_scale),
            trust=trust,
            reliability=reliability,
            channel_teachers=channel_teachers,
            scale_momentum=scale_momentum,
        )
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

    def log_betas(self, representation: Tensor) -> Tensor:
        """The network's log-betas ``[B, K]`` for representations ``[B, D]`` (no trust)."""
        h = _require_representation(representation, representation.shape[0], self.input_dim)
        if self.detach_representation:
            h = h.detach()
        return self.positive.log_beta(self.net(at_least_float32(h)))

    def precisions(self, losses: Tensor, representation: Tensor | None):
        h = _require_representation(representation, losses.shape[0], self.input_dim)
        log_beta = self.log_betas(h)
        beta, reg = self.laplace_terms(log_beta)
        return beta, reg, self.positive.at_bound(log_beta)


class ClosedFormWeighting(Weighting):
    """No parameters: beta = c / (stopgrad(l) + b), the optimum of the surrogate for fixed l.

    ``c = d/2 + a - 1`` and ``b`` come from the Gamma hyperprior (without one: ``d / (2 l)``,
    unbounded as ``l -> 0``). ``per="sample"`` uses each sample's energy; ``per="channel"``
    the channel's energy scale when the weighting keeps one, else the micro-batch mean
    (which depends on how a batch is split). ``min_energy`` keeps beta finite when an
    energy reaches zero and no hyperprior rate bounds it.
    """

    def __init__(
        self,
        channels: Sequence[str],
        *,
        per: str = "sample",
        weight_ce: bool = False,
        d: float | Mapping[str, float] = 1.0,
        min_energy: float = 1e-6,
        prior_shape: float = 1.0,
        prior_rate: float = 0.0,
        prior_rate_scale: float | None = None,
        trust: Mapping | SharedTrust | None = None,
        reliability: Mapping | TeacherReliability | None = None,
        channel_teachers: Mapping[str, str | None] | None = None,
        scale_momentum: float | None = None,
    ) -> None:
        super().__init__(
            channels,
            weight_ce=weight_ce,
            d=d,
            prior=prior_from_options(prior_shape, prior_rate, prior_rate_scale),
            trust=trust,
            reliability=reliability,
            channel_teachers=channel_teachers,
            scale_momentum=scale_momentum,
        )
        if per not in ("sample", "channel"):
            raise ValueError(f"per must be 'sample' or 'channel', got {per!r}")
        if not min_energy > 0:
            raise ValueError(f"min_energy must be > 0, got {min_energy}")
        self.per = per
        self.per_sample = per == "sample"
        self.min_energy = min_energy

    def precisions(self, losses: Tensor, representation: Tensor | None):
        energy = self.weighted_losses(losses).detach()
        if self.per == "channel":
            scale = self.energy_scale if self.has_energy_scale else energy.mean(dim=0)
            energy = scale.reshape(1, -1).expand_as(energy)
        rates = self.prior_rates()
        floored = energy + rates <= self.min_energy
        log_beta = torch.log(self.concentration) - torch.log(
            (energy + rates).clamp_min(self.min_energy)
        )
        beta, reg = self.laplace_terms(log_beta)
        if self.prior.active:
            # At the hyperprior's bound c / b: the sample's energy is under 1% of b.
            floored = floored | (energy <= 0.01 * rates)
        return beta, reg, floored


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

    def set_channel_gains(self, gains: Mapping[str, float]) -> None:
        if any(g != 1 for g in gains.values()):
            raise ValueError("the reference weighting takes no channel schedule (anneal_steps)")

    def combine(
        self, losses: Tensor, representation: Tensor | None, trust: Tensor
    ) -> WeightingOutput:
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
    accepted = options_of(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"weighting {name!r}: unknown option(s) {unknown}; its options: {', '.join(accepted)}"
        )
    try:
        return cls(channels, **options)
    except TypeError as err:
        raise TypeError(f"weighting {name!r}: {err}") from err


def options_of(name: str) -> list[str]:
    """The options a weighting accepts (its constructor's keyword arguments)."""
    parameters = inspect.signature(WEIGHTINGS[name].__init__).parameters
    return [p for p in parameters if p not in ("self", "channels")]
