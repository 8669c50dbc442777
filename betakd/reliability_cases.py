"""The likelihood side of the teacher reliability (:mod:`betakd.reliability`): how a
teacher's NLL of a sample's answer is distributed in each case.

* :func:`fit_nll_mixture`: the first look, two Gaussians on ``log n`` (agreement and
  disagreement) by EM, as DivideMix separates clean from noisy samples by their loss;
* the three components of the full model (:data:`COMPONENTS`: agreement, a label the
  teacher rejects, a right label a wrong teacher rejects) and the five cases' joint
  probabilities given the teacher's local reliability ``r``, the label noise ``eps`` and
  the coincidence probability ``q`` (:func:`case_log_joints`), their posteriors
  (:func:`posterior`) and likelihood (:func:`mixture_log_likelihood`);
* :func:`fit_components`: the components and ``q`` by maximum likelihood given ``r``
  and ``eps`` (L-BFGS).

Tensors in, tensors out; the model and its fit are described in
:mod:`betakd.reliability`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# NLLs are floored before the log: a teacher that is certain of an answer gives ~0 nats.
NLL_FLOOR = 1e-6
# A component's spread in log-NLL never falls below this (a degenerate EM solution).
MIN_LOG_STD = 0.05
# q is at most this: a wrong label that agrees with the wrong teacher more often than
# not is no longer chance (labels made by a model like the teacher), which this model
# does not cover; without a blind region q is not identified and went to 1 unbounded.
MAX_COINCIDENCE = 0.5


@dataclass(frozen=True)
class NllMixture:
    """Two Gaussians on ``log(max(nll, NLL_FLOOR))``: agreement (the lower mean) and
    disagreement; ``agree_weight`` is the agreement component's share."""

    agree_weight: float
    agree_mean: float
    agree_std: float
    disagree_mean: float
    disagree_std: float

    def log_densities(self, nll: Tensor) -> tuple[Tensor, Tensor]:
        """``log f_agree(n)`` and ``log f_disagree(n)``, densities of ``log n``."""
        x = log_nll(nll)
        return (
            _normal_log_pdf(x, self.agree_mean, self.agree_std),
            _normal_log_pdf(x, self.disagree_mean, self.disagree_std),
        )

    def agree_posterior(self, nll: Tensor) -> Tensor:
        """Each sample's posterior probability of the agreement component."""
        log_a, log_d = self.log_densities(nll)
        w = self.agree_weight
        return torch.sigmoid(log_a + math.log(w) - log_d - math.log1p(-w))

    def log_likelihood(self, nll: Tensor) -> float:
        """Mean log-likelihood of ``log n`` under the mixture."""
        log_a, log_d = self.log_densities(nll)
        w = self.agree_weight
        return float(torch.logaddexp(log_a + math.log(w), log_d + math.log1p(-w)).mean())


def log_nll(nll: Tensor) -> Tensor:
    return torch.log(nll.double().clamp_min(NLL_FLOOR))


def _normal_log_pdf(x: Tensor, mean: float, std: float) -> Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def fit_nll_mixture(nll: Tensor, iterations: int = 200, tolerance: float = 1e-10) -> NllMixture:
    """Maximum-likelihood two-Gaussian mixture on ``log n`` by EM.

    Starts from the lower and upper quartiles; stops when the mean log-likelihood gains
    less than ``tolerance``. The component with the lower mean is the agreement one.
    """
    x = log_nll(nll.flatten())
    if x.numel() < 4:
        raise ValueError(f"fitting the NLL mixture needs at least 4 samples, got {x.numel()}")
    lo, hi = torch.quantile(x, 0.25).item(), torch.quantile(x, 0.75).item()
    spread = max(float(x.std()), MIN_LOG_STD)
    if hi - lo < MIN_LOG_STD:
        lo, hi = lo - spread, hi + spread
    means = torch.tensor([lo, hi], dtype=torch.float64)
    stds = torch.tensor([spread, spread], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    previous = -math.inf
    for _ in range(iterations):
        log_p = (
            -0.5 * ((x[:, None] - means) / stds) ** 2
            - torch.log(stds)
            - 0.5 * math.log(2 * math.pi)
            + torch.log(weights)
        )
        total = torch.logsumexp(log_p, dim=1, keepdim=True)
        resp = torch.exp(log_p - total)
        current = float(total.mean())
        counts = resp.sum(dim=0).clamp_min(1e-12)
        weights = (counts / x.numel()).clamp(1e-6, 1 - 1e-6)
        means = (resp * x[:, None]).sum(dim=0) / counts
        var = (resp * (x[:, None] - means) ** 2).sum(dim=0) / counts
        stds = var.sqrt().clamp_min(MIN_LOG_STD)
        if current - previous < tolerance:
            break
        previous = current
    order = torch.argsort(means)
    means, stds, weights = means[order], stds[order], weights[order]
    return NllMixture(
        float(weights[0]), float(means[0]), float(stds[0]), float(means[1]), float(stds[1])
    )


# The NLL distributions, in the order of the fitted components: teacher and label agree;
# the teacher rejects a label that is not its answer; the teacher is wrong on a right label.
COMPONENTS = ("agree", "label_rejected", "teacher_wrong")


def component_log_densities(nll: Tensor, components: Tensor) -> Tensor:
    """``[N, 3]`` log densities of ``log n`` under the components' Gaussians, given
    ``components [3, 2]`` (mean, std of ``log n`` per component)."""
    x = log_nll(nll)[:, None]
    mean, std = components[:, 0], components[:, 1]
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


@dataclass
class ReliabilityPosterior:
    """Per sample ``[B]``: the posteriors of the five cases (teacher right or wrong, label
    right or wrong; both wrong with the label the teacher's answer, or not), and the
    factors they give."""

    both_right: Tensor
    label_wrong: Tensor
    teacher_wrong: Tensor
    both_wrong: Tensor
    coincidence: Tensor

    @property
    def teacher_right(self) -> Tensor:
        """The factor on the teacher's channels."""
        return self.both_right + self.label_wrong

    @property
    def label_right(self) -> Tensor:
        """The factor on the CE."""
        return self.both_right + self.teacher_wrong


def case_log_joints(
    log_densities: Tensor,
    teacher_right: Tensor,
    label_noise: float,
    coincidence: float | Tensor = 0.0,
) -> Tensor:
    """``[N, 5]``: log of prior times likelihood of each case (the module docstring).
    ``coincidence`` (``q``) may be a tensor, so that the fit can differentiate it; at 0
    the fifth case is impossible (log joint ``-inf``)."""
    r = teacher_right.to(log_densities.dtype).clamp(1e-12, 1 - 1e-12)
    eps = min(max(label_noise, 1e-12), 1 - 1e-12)
    q = torch.as_tensor(coincidence, dtype=log_densities.dtype).clamp(0, 1 - 1e-12)
    log_r, log_not_r = torch.log(r), torch.log1p(-r)
    agree, rejected, wrong = log_densities.unbind(dim=-1)
    both_wrong = log_not_r + math.log(eps)
    return torch.stack(
        [
            log_r + math.log1p(-eps) + agree,
            log_r + math.log(eps) + rejected,
            log_not_r + math.log1p(-eps) + wrong,
            both_wrong + torch.log1p(-q) + rejected,
            both_wrong + torch.log(q) + agree,
        ],
        dim=-1,
    )


def posterior(
    log_densities: Tensor,
    teacher_right: Tensor,
    label_noise: float,
    coincidence: float | Tensor = 0.0,
) -> ReliabilityPosterior:
    """Bayes' rule over the five cases, given each sample's ``[N, 3]`` log densities."""
    joints = case_log_joints(log_densities, teacher_right, label_noise, coincidence)
    return ReliabilityPosterior(*torch.softmax(joints, dim=-1).unbind(dim=-1))


def mixture_log_likelihood(
    log_densities: Tensor,
    teacher_right: Tensor,
    label_noise: float,
    coincidence: float | Tensor = 0.0,
) -> Tensor:
    """Per sample, the NLL's log-likelihood with the five cases summed."""
    joints = case_log_joints(log_densities, teacher_right, label_noise, coincidence)
    return torch.logsumexp(joints, dim=-1)


def fit_components(
    nll: Tensor,
    teacher_right: Tensor,
    label_noise: float,
    components: Tensor,
    coincidence: float,
    max_iter: int = 500,
) -> tuple[Tensor, float]:
    """Maximum likelihood of the cases' ``[3, 2]`` Gaussians on ``log n`` and of the
    coincidence probability ``q`` given each sample's ``r`` and ``eps``: the mean of
    :func:`mixture_log_likelihood`, by L-BFGS from the given values (``0 < coincidence
    < 1``; ``max_iter``: L-BFGS's evaluations). Standard deviations stay above
    ``MIN_LOG_STD``; the two rejections share theirs."""
    if not 0 < coincidence < MAX_COINCIDENCE:
        raise ValueError(
            f"the coincidence start must be in (0, {MAX_COINCIDENCE}), got {coincidence}"
        )
    # Two spreads: the agreement's, and one shared by the two rejections, so that
    # neither can narrow to a spike that rules the other out by itself.
    spreads = torch.log((components[:2, 1] - MIN_LOG_STD).clamp_min(1e-6))
    share = coincidence / MAX_COINCIDENCE
    q_logit = torch.tensor([math.log(share / (1 - share))], dtype=torch.float64)
    theta = torch.cat([components[:, 0], spreads, q_logit]).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def unpack(values: Tensor) -> tuple[Tensor, Tensor]:
        stds = MIN_LOG_STD + torch.exp(values[3:5])
        stds = torch.cat([stds, stds[1:]])
        return torch.stack([values[:3], stds], dim=1), MAX_COINCIDENCE * torch.sigmoid(values[5])

    def objective() -> Tensor:
        optimizer.zero_grad()
        cases, q = unpack(theta)
        densities = component_log_densities(nll, cases)
        loss = -mixture_log_likelihood(densities, teacher_right, label_noise, q).mean()
        loss.backward()
        return loss

    optimizer.step(objective)
    cases, q = unpack(theta.detach())
    return cases.clone(), float(q)
