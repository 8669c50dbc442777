"""The weightings: fixed ones (equal, fixed) and Beta-KD's (task, instance, closed
form, the authors' reference formulas)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from betakd.weighting.base import (
    CE,
    PositiveMap,
    Weighting,
    WeightingOutput,
    _per_channel,
    _require_representation,
    at_least_float32,
)
from betakd.weighting.options import (
    ClosedFormOptions,
    EqualOptions,
    FixedOptions,
    InstanceOptions,
    ReferenceOptions,
    TaskOptions,
)

# --------------------------------------------------------------------------- fixed weightings


class EqualWeighting(Weighting):
    """Every channel, CE included, with weight 1: the plain sum."""

    options_model = EqualOptions

    def __init__(self, channels: Sequence[str], options: EqualOptions | None = None) -> None:
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

    options_model = FixedOptions

    def __init__(self, channels: Sequence[str], options: FixedOptions) -> None:
        scale_relative, weights = options.scale_relative, options.weights
        super().__init__(
            channels, weight_ce=True, uses_energy_scale=scale_relative, **options.arguments()
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

    options_model = TaskOptions

    def __init__(self, channels: Sequence[str], options: TaskOptions | None = None) -> None:
        options = TaskOptions() if options is None else options
        super().__init__(channels, **options.arguments())
        self.positive = PositiveMap(options.parameterization, options.bounds)
        k = len(self.weighted_channels)
        self.raw = nn.Parameter(torch.full((k,), self.positive.inverse(options.init_beta)))

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

    options_model = InstanceOptions

    def __init__(self, channels: Sequence[str], options: InstanceOptions) -> None:
        super().__init__(channels, **options.arguments())
        input_dim = options.input_dim
        if input_dim is None:
            raise TypeError("instance weighting needs input_dim, the width of h(x)")
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        self.positive = PositiveMap(options.parameterization, options.bounds)
        self.detach_representation = options.detach_representation
        self.input_dim = input_dim
        k = len(self.weighted_channels)
        self.net = nn.Sequential(
            nn.LayerNorm(input_dim, elementwise_affine=False)
            if options.normalize_input
            else nn.Identity(),
            nn.Linear(input_dim, options.hidden),
            nn.ReLU(),
            nn.Linear(options.hidden, k),
        )
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.fill_(self.positive.inverse(options.init_beta))

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

    options_model = ClosedFormOptions

    def __init__(self, channels: Sequence[str], options: ClosedFormOptions | None = None) -> None:
        options = ClosedFormOptions() if options is None else options
        super().__init__(channels, **options.arguments())
        per, min_energy = options.per, options.min_energy
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

    options_model = ReferenceOptions

    def __init__(self, channels: Sequence[str], options: ReferenceOptions | None = None) -> None:
        options = ReferenceOptions() if options is None else options
        level, input_dim, hidden = options.level, options.input_dim, options.hidden
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
