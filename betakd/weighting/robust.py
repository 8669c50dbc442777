"""The robust pieces every weighting can take: a Gamma hyperprior on the betas and a
shared per-sample trust (their options, and the teacher reliability's, are the typed
models of :mod:`betakd.weighting.options`)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


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


TrustKind = Literal["mixture", "gamma", "superloss"]
TrustReference = Literal["student", "data"]
TRUST_KINDS: tuple[str, ...] = typing.get_args(TrustKind)
TRUST_REFERENCES: tuple[str, ...] = typing.get_args(TrustReference)


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
