"""Teacher reliability: tell a teacher's error from a label's error, per sample.

The data term (CE on the label) and every teacher channel are two sources of evidence
about the answer, and either can be wrong (SPEC, "Two sources that can each be
wrong"). Their disagreement alone cannot say which one is: the teacher's negative
log-likelihood (NLL) of a sample's answer is high both where the label is wrong and
where the teacher is blind. What tells them apart is *where* the disagreement happens:
a teacher's blind spot is a region of inputs in which it disagrees with the data
systematically; label noise is scattered over inputs where the teacher is otherwise
right (the reasoning of noisy-label learning with transition matrices and label
correction, and of CA-MKD's per-teacher confidence from the label's CE).

The model, per sample ``i`` with input representation ``h_i`` and teacher NLL ``n_i``
of its answer:

* the teacher is right at ``x_i`` with probability ``r(h_i) = sigmoid(w . z_i + c)``
  (``z`` the standardised representation): a function of the input, not of the label,
  so that every input of a blind region loses the teacher whatever its label;
* the label is wrong with probability ``eps``, independently of the input (scattered);
* the teacher's NLL of the label has one of three distributions, each a Gaussian on
  ``log n``: ``f_agree`` (teacher and label agree), ``f_rejected`` (the label is not
  the teacher's answer: the teacher rejects it) and ``f_wrong`` (a right label that the
  teacher, wrong, rejects: confidently, where it is blind). The two rejections share one
  spread. No hand-set threshold: they adapt to the teacher's calibration.

Four cases, with posteriors from Bayes' rule::

    teacher  label
    right    right    r (1 - eps)        f_agree(n)
    right    wrong    r eps              f_rejected(n)    keep the teacher, drop the CE
    wrong    right    (1 - r) (1 - eps)  f_wrong(n)       drop the teacher, keep the CE
    wrong    wrong    (1 - r) eps        f_rejected(n)

The teacher's channels are multiplied by ``P(teacher right | n, h)`` and the CE by
``P(label right | n, h)``.

``r`` and ``eps`` are not identifiable from agreement alone: a constant 20% disagreement
is explained as well by 20% wrong labels under a reliable teacher as by a teacher wrong
on 20% of inputs. The fit takes the *anchor-point* assumption of noisy-label learning
(Patrini et al., CVPR 2017: the noise rate is read where the clean signal is surest): the
teacher is right on the inputs where it agrees with the data most (the top
``anchor_share`` of inputs by predicted agreement), so the disagreement there is label
noise. In steps, before training (``fit``):

1. a two-component mixture (agree, disagree) on ``log n`` by EM, as DivideMix (Li et
   al., ICLR 2020) separates clean from noisy samples by their loss, and each sample's
   posterior of agreement ``p_i``;
2. ``a(h) = P(agree | h)``: a logistic regression of ``p_i`` on the standardised
   representation, with an L2 penalty. Linear on purpose: a model that could memorise
   single samples would learn each wrong label as a tiny blind region;
3. ``eps = 1 - mean p_i`` over the anchor inputs;
4. with ``eps`` fixed, ``r(h) = sigmoid(w . z + c)`` and the three NLL distributions
   jointly by maximum likelihood (L-BFGS), from step 2's regression and step 1's
   components (the disagreement one for both rejections): where teacher and labels
   agree at the anchors' rate ``r`` goes to 1, and ``f_rejected`` and ``f_wrong`` split
   the disagreements by where they happen.

Everything here is tensors in, tensors out; ``betakd train`` collects the NLLs and
representations (``BetaKDTrainer.fit_reliability``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# NLLs are floored before the log: a teacher that is certain of an answer gives ~0 nats.
NLL_FLOOR = 1e-6
# A component's spread in log-NLL never falls below this (a degenerate EM solution).
MIN_LOG_STD = 0.05


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
    """Per sample ``[B]``: the posteriors of the four cases (teacher right or wrong, label
    right or wrong), and the factors they give."""

    both_right: Tensor
    label_wrong: Tensor
    teacher_wrong: Tensor
    both_wrong: Tensor

    @property
    def teacher_right(self) -> Tensor:
        """The factor on the teacher's channels."""
        return self.both_right + self.label_wrong

    @property
    def label_right(self) -> Tensor:
        """The factor on the CE."""
        return self.both_right + self.teacher_wrong


def case_log_joints(log_densities: Tensor, teacher_right: Tensor, label_noise: float) -> Tensor:
    """``[N, 4]``: log of prior times likelihood of each case (the module docstring)."""
    r = teacher_right.to(log_densities.dtype).clamp(1e-12, 1 - 1e-12)
    eps = min(max(label_noise, 1e-12), 1 - 1e-12)
    log_r, log_not_r = torch.log(r), torch.log1p(-r)
    agree, rejected, wrong = log_densities.unbind(dim=-1)
    return torch.stack(
        [
            log_r + math.log1p(-eps) + agree,
            log_r + math.log(eps) + rejected,
            log_not_r + math.log1p(-eps) + wrong,
            log_not_r + math.log(eps) + rejected,
        ],
        dim=-1,
    )


def posterior(
    log_densities: Tensor, teacher_right: Tensor, label_noise: float
) -> ReliabilityPosterior:
    """Bayes' rule over the four cases, given each sample's ``[N, 3]`` log densities."""
    p = torch.softmax(case_log_joints(log_densities, teacher_right, label_noise), dim=-1)
    return ReliabilityPosterior(*p.unbind(dim=-1))


def mixture_log_likelihood(
    log_densities: Tensor, teacher_right: Tensor, label_noise: float
) -> Tensor:
    """Per sample, the NLL's log-likelihood with the four cases summed."""
    return torch.logsumexp(case_log_joints(log_densities, teacher_right, label_noise), dim=-1)


class TeacherReliability(nn.Module):
    """The fitted reliability of ``teachers`` teachers over a representation of width
    ``input_dim``; ``l2`` is the logistic regression's penalty (on standardised inputs),
    ``anchor_share`` the share of inputs, most agreeing first, assumed to have a right
    teacher.

    Its state (NLL distributions, ``eps``, regression weights, standardisation) lives in
    buffers, so checkpoints and ``init_from`` carry it and a resumed run does not refit.
    """

    def __init__(
        self,
        input_dim: int,
        teachers: int = 1,
        *,
        l2: float = 1e-3,
        anchor_share: float = 0.25,
    ) -> None:
        super().__init__()
        if input_dim < 1 or teachers < 1:
            raise ValueError(f"input_dim and teachers must be >= 1, got {input_dim}, {teachers}")
        if l2 < 0:
            raise ValueError(f"reliability l2 must be >= 0, got {l2}")
        if not 0 < anchor_share <= 1:
            raise ValueError(f"reliability anchor_share must be in (0, 1], got {anchor_share}")
        self.input_dim = input_dim
        self.teachers = teachers
        self.l2 = l2
        self.anchor_share = anchor_share
        nan = math.nan
        # Per teacher and case: mean and std of log NLL.
        self.register_buffer("components", torch.full((teachers, 3, 2), nan, dtype=torch.float64))
        self.register_buffer("label_noise", torch.full((teachers,), nan, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(teachers, input_dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(teachers, dtype=torch.float64))
        self.register_buffer("input_mean", torch.zeros(input_dim, dtype=torch.float64))
        self.register_buffer("input_std", torch.ones(input_dim, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.label_noise).all())

    # ----------------------------------------------------------------- fit

    def fit(self, nll: Tensor, representation: Tensor) -> dict[str, float]:
        """Fit every teacher's NLL distributions, ``eps`` and ``r(h)`` on ``nll [N]`` or
        ``[N, T]`` and ``representation [N, D]``; returns a summary per teacher."""
        nll = _columns(nll, self.teachers)
        h = representation.detach().double().cpu()
        if h.shape != (nll.shape[0], self.input_dim):
            raise ValueError(
                f"representation must have shape [{nll.shape[0]}, {self.input_dim}], "
                f"got {tuple(h.shape)}"
            )
        mean, std = h.mean(dim=0), h.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)
        z = (h - mean) / std
        zeros = torch.zeros(z.shape[1], dtype=torch.float64)
        summary = {}
        for t in range(self.teachers):
            column = nll[:, t].double().cpu()
            mixture = fit_nll_mixture(column)
            agree = mixture.agree_posterior(column)
            weight, bias = _logistic_regression(z, agree, self.l2, zeros, zeros.sum())
            predicted = torch.sigmoid(z @ weight + bias)
            anchors = predicted >= torch.quantile(predicted, 1 - self.anchor_share)
            eps = min(max(1 - float(agree[anchors].mean()), 1e-4), 0.5)
            start = torch.tensor(
                [
                    [mixture.agree_mean, mixture.agree_std],
                    [mixture.disagree_mean, mixture.disagree_std],
                    [mixture.disagree_mean, mixture.disagree_std],
                ],
                dtype=torch.float64,
            )
            weight, bias, components = fit_cases(z, column, eps, self.l2, weight, bias, start)
            self.components[t] = components
            self.label_noise[t] = eps
            self.weight[t] = weight
            self.bias[t] = bias
            prior = torch.sigmoid(z @ weight + bias)
            densities = component_log_densities(column, components)
            teacher_right = posterior(densities, prior, eps).teacher_right
            prefix = f"teacher{t}/" if self.teachers > 1 else ""
            for q in (0.1, 0.5, 0.9):
                summary[f"{prefix}nll_q{int(q * 100)}"] = float(torch.quantile(column, q))
            summary[f"{prefix}agree_share"] = mixture.agree_weight
            for name, (log_median, _) in zip(COMPONENTS, components.tolist()):
                summary[f"{prefix}{name}_nll_median"] = math.exp(log_median)
            summary[f"{prefix}label_noise"] = eps
            summary[f"{prefix}teacher_right_mean"] = float(teacher_right.mean())
        return summary

    # ----------------------------------------------------------------- apply

    def teacher_right_prior(self, representation: Tensor) -> Tensor:
        """``r(h) [B, T]``: the probability that each teacher is right at each input."""
        z = (representation.detach().double() - self.input_mean) / self.input_std
        return torch.sigmoid(z @ self.weight.T + self.bias)

    def posteriors(self, nll: Tensor, representation: Tensor) -> list[ReliabilityPosterior]:
        """One posterior per teacher for ``nll [B]`` or ``[B, T]``."""
        if not self.fitted:
            raise RuntimeError(
                "the teacher reliability is not fitted: call fit() first (betakd train fits "
                "it on the training data before the first step)"
            )
        nll = _columns(nll.detach(), self.teachers)
        prior = self.teacher_right_prior(representation)
        result = []
        for t in range(self.teachers):
            densities = component_log_densities(nll[:, t], self.components[t])
            result.append(posterior(densities, prior[:, t], float(self.label_noise[t])))
        return result

    def factors(self, nll: Tensor, representation: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T]`` factors on each teacher's channels and the ``[B]`` factor on the CE.

        With several teachers, each one's evidence about the label is combined as
        independent experts: the log-odds that the label is right add up, less the
        prior log-odds counted once per extra teacher.
        """
        posts = self.posteriors(nll, representation)
        teacher = torch.stack([p.teacher_right for p in posts], dim=1)
        if len(posts) == 1:
            return teacher, posts[0].label_right
        logits = torch.stack([torch.logit(p.label_right, eps=1e-9) for p in posts], dim=1)
        prior = torch.log((1 - self.label_noise) / self.label_noise)
        combined = logits.sum(dim=1) - prior.to(logits).sum() + prior.to(logits).mean()
        return teacher, torch.sigmoid(combined)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, teachers={self.teachers}, l2={self.l2}, "
            f"anchor_share={self.anchor_share}"
        )


def fit_cases(
    z: Tensor,
    nll: Tensor,
    label_noise: float,
    l2: float,
    weight: Tensor,
    bias: Tensor,
    components: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Maximum likelihood of ``r(h) = sigmoid(w . z + c)`` and the cases' ``[3, 2]``
    Gaussians on ``log n`` for a given ``eps``: the mean of
    :func:`mixture_log_likelihood` less ``l2 / 2 |w|^2``, by L-BFGS from the given
    values. Standard deviations stay above ``MIN_LOG_STD``; the two rejections share
    theirs."""
    d = z.shape[1]
    means = components[:, 0]
    # Two spreads: the agreement's, and one shared by the two rejections, so that
    # neither can narrow to a spike that rules the other out by itself.
    spreads = torch.log((components[:2, 1] - MIN_LOG_STD).clamp_min(1e-6))
    theta = torch.cat([weight, bias.reshape(1), means, spreads]).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def unpack(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        stds = MIN_LOG_STD + torch.exp(values[d + 4 :])
        stds = torch.cat([stds, stds[1:]])
        return values[:d], values[d], torch.stack([values[d + 1 : d + 4], stds], dim=1)

    def objective() -> Tensor:
        optimizer.zero_grad()
        w, c, cases = unpack(theta)
        r = torch.sigmoid(z @ w + c)
        densities = component_log_densities(nll, cases)
        likelihood = mixture_log_likelihood(densities, r, label_noise).mean()
        loss = -likelihood + 0.5 * l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    w, c, cases = unpack(theta.detach())
    return w.clone(), c.clone(), cases.clone()


def _columns(nll: Tensor, teachers: int) -> Tensor:
    if nll.dim() == 1:
        nll = nll[:, None]
    if nll.dim() != 2 or nll.shape[1] != teachers:
        raise ValueError(
            f"expected teacher NLLs of shape [N] or [N, {teachers}], got {tuple(nll.shape)}"
        )
    return nll


def _logistic_regression(
    z: Tensor, target: Tensor, l2: float, weight: Tensor, bias: Tensor, iterations: int = 25
) -> tuple[Tensor, Tensor]:
    """Soft-target logistic regression with an L2 penalty on the weights (not the bias),
    by Newton's method from a warm start; the loss is the mean cross-entropy."""
    n, d = z.shape
    x = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], dim=1)
    theta = torch.cat([weight, bias.reshape(1)])
    penalty = torch.full((d + 1,), l2, dtype=z.dtype)
    penalty[-1] = 0.0

    def objective(t: Tensor) -> Tensor:
        logits = x @ t
        ce = torch.nn.functional.softplus(logits) - target * logits
        return ce.mean() + 0.5 * (penalty * t * t).sum()

    value = objective(theta)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (p - target) / n + penalty * theta
        hessian = (x * (p * (1 - p))[:, None]).T @ x / n + torch.diag(penalty + 1e-9)
        step = torch.linalg.solve(hessian, grad)
        # Backtracking: a full Newton step can overshoot where the classes nearly separate.
        size = 1.0
        while size > 1e-4:
            candidate = theta - size * step
            new_value = objective(candidate)
            if new_value <= value:
                break
            size /= 2
        else:
            break
        theta, gain, value = candidate, float(value - new_value), new_value
        if gain < 1e-12:
            break
    return theta[:-1].clone(), theta[-1].clone()
