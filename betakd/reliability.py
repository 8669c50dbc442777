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

* the teacher is right at ``x_i`` with probability ``r(h_i)``: a function of the input,
  not of the label, so that every input of a blind region loses the teacher whatever
  its label. ``r`` is *local*: at an input, the mean posterior that the teacher is
  right over its ``neighbours`` nearest samples of the fit set (a k-nearest-neighbour
  regression in the standardised representation, its directions scaled by how much
  they predict agreement). It follows a blind region as sharply as the representation
  separates it, and it cannot learn a single wrong label as a tiny blind region: in the
  fit, a sample never counts in its own ``r`` (in training, where the weighting sees
  h(x) and not which sample it is, a fit sample is one of its own ``k`` neighbours);
* the label is wrong with probability ``eps``, independently of the input (scattered);
* the teacher's NLL of the label has one of three distributions, each a Gaussian on
  ``log n``: ``f_agree`` (teacher and label agree), ``f_rejected`` (the label is not
  the teacher's answer: the teacher rejects it) and ``f_wrong`` (a right label that the
  teacher, wrong, rejects: confidently, where it is blind). The two rejections share one
  spread. No hand-set threshold: they adapt to the teacher's calibration.

Five cases, with posteriors from Bayes' rule::

    teacher  label
    right    right    r (1 - eps)             f_agree(n)
    right    wrong    r eps                   f_rejected(n)  keep the teacher, drop the CE
    wrong    right    (1 - r) (1 - eps)       f_wrong(n)     drop the teacher, keep the CE
    wrong    wrong    (1 - r) eps (1 - q)     f_rejected(n)  drop both
    wrong    wrong,   (1 - r) eps q           f_agree(n)     drop both
             the teacher's answer

The last case is a coincidence: a wrong label that happens to be the wrong teacher's
answer (probability ``q``; with answers drawn at random from ``K`` classes, about
``1 / (K - 1)``). Without it, the few agreements inside a blind region can only be
explained by a right teacher, which pulls ``r`` up over the region and leaks the
teacher's weight into it through its wrong labels (where the teacher factor is ``r``).
The teacher's channels are multiplied by ``P(teacher right | n, h)`` and the CE by
``P(label right | n, h)``.

``r`` and ``eps`` are not identifiable from agreement alone: a constant 20% disagreement
is explained as well by 20% wrong labels under a reliable teacher as by a teacher wrong
on 20% of inputs. The fit takes the *anchor-point* assumption of noisy-label learning
(Patrini et al., CVPR 2017: the noise rate is read where the clean signal is surest): the
teacher is right on the inputs where it agrees with the data most (the top
``anchor_share`` of inputs by local agreement), so the disagreement there is label
noise. In steps, before training (``fit``):

1. a two-component mixture (agree, disagree) on ``log n`` by EM, as DivideMix (Li et
   al., ICLR 2020) separates clean from noisy samples by their loss, and each sample's
   posterior of agreement ``p_i``;
2. the local agreement ``a_i``: the mean of ``p`` over the sample's neighbours;
3. ``eps = 1 - mean p_i`` over the anchor inputs;
4. with ``eps`` fixed, alternate until ``r`` settles (an EM whose M-step for ``r`` is
   the local mean of the posteriors): the three NLL distributions and ``q`` by maximum
   likelihood given ``r`` (L-BFGS, from step 1's components, the disagreement one for
   both rejections), then each input's ``r`` as the mean posterior that the teacher is
   right over its neighbours. ``r`` starts at ``a``.

The fit set's points (projected on at most ``PROJECTION_DIM`` principal directions) and
their final posteriors are kept: ``r`` of any later input, in training or in an audit, is
their local mean around it.

Everything here is tensors in, tensors out; ``betakd train`` collects the NLLs and
representations (``BetaKDTrainer.fit_reliability``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# NLLs are floored before the log: a teacher that is certain of an answer gives ~0 nats.
NLL_FLOOR = 1e-6
# A component's spread in log-NLL never falls below this (a degenerate EM solution).
MIN_LOG_STD = 0.05
# Where the fit starts the coincidence probability q.
COINCIDENCE_START = 0.05
# q is at most this: a wrong label that agrees with the wrong teacher more often than
# not is no longer chance (labels made by a model like the teacher), which this model
# does not cover; without a blind region q is not identified and went to 1 unbounded.
MAX_COINCIDENCE = 0.5
# h(x) is compared in at most this many principal directions, so that the fit set kept
# for r(h) stays small whatever the teacher's width.
PROJECTION_DIM = 64
# The L2 penalty of the logistic regression that scales h's directions by relevance.
RELEVANCE_L2 = 1e-3
# A neighbourhood is at most this share of the fit set, so that it stays local on a
# small data set.
MAX_NEIGHBOURHOOD_SHARE = 1 / 8
# r stays inside [R_FLOOR, 1 - R_FLOOR]: no region is certain.
R_FLOOR = 1e-3
# The alternating fit of step 4 stops when no input's r moves more than this.
FIT_TOLERANCE = 1e-4
FIT_ITERATIONS = 300
# L-BFGS evaluations per alternation: from the last one's values, improving is enough.
INNER_ITERATIONS = 25
# Query rows per block of the distance matrix (memory: block x fit points).
DISTANCE_BLOCK = 1024


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


def neighbours_of(queries: Tensor, points: Tensor, k: int, exclude_self: bool = False) -> Tensor:
    """The ``[Q, k]`` indices of each query's ``k`` nearest points. ``exclude_self``: the
    queries are the points themselves, and none is its own neighbour."""
    indices = []
    for start in range(0, queries.shape[0], DISTANCE_BLOCK):
        block = torch.cdist(queries[start : start + DISTANCE_BLOCK], points)
        if exclude_self:
            rows = torch.arange(block.shape[0])
            block[rows, rows + start] = math.inf
        indices.append(block.topk(k, dim=1, largest=False).indices)
    return torch.cat(indices)


def neighbourhood_size(neighbours: int, points: int) -> int:
    """``neighbours``, at most ``MAX_NEIGHBOURHOOD_SHARE`` of the fit set's ``points``
    (and at least one)."""
    return max(1, min(neighbours, int(points * MAX_NEIGHBOURHOOD_SHARE)))


def local_mean(values: Tensor, neighbours: Tensor) -> Tensor:
    """``[Q, T]``: the mean of ``values [N, T]`` over each query's ``neighbours``."""
    return values[neighbours].mean(dim=1)


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


class TeacherReliability(nn.Module):
    """The fitted reliability of ``teachers`` teachers over a representation of width
    ``input_dim``; ``neighbours`` is the number of fit samples whose posteriors give
    ``r`` at an input (at most an eighth of the fit set), ``anchor_share`` the share of inputs, most agreeing first, assumed
    to have a right teacher.

    Its state (NLL distributions, ``eps``, ``q``, the standardisation and projection of
    h, the fit set's points and posteriors) lives in buffers, so checkpoints and
    ``init_from`` carry it and a resumed run does not refit.
    """

    # Buffers with one row per sample of the fit (a loaded state sets their size).
    FIT_SET_BUFFERS = ("points", "point_teacher_right")

    def __init__(
        self,
        input_dim: int,
        teachers: int = 1,
        *,
        neighbours: int = 32,
        anchor_share: float = 0.25,
    ) -> None:
        super().__init__()
        if input_dim < 1 or teachers < 1:
            raise ValueError(f"input_dim and teachers must be >= 1, got {input_dim}, {teachers}")
        if neighbours < 1:
            raise ValueError(f"reliability neighbours must be >= 1, got {neighbours}")
        if not 0 < anchor_share <= 1:
            raise ValueError(f"reliability anchor_share must be in (0, 1], got {anchor_share}")
        self.input_dim = input_dim
        self.teachers = teachers
        self.neighbours = neighbours
        self.anchor_share = anchor_share
        nan, f64 = math.nan, torch.float64
        width = min(input_dim, PROJECTION_DIM)
        # Per teacher and case: mean and std of log NLL.
        self.register_buffer("components", torch.full((teachers, 3, 2), nan, dtype=f64))
        self.register_buffer("label_noise", torch.full((teachers,), nan, dtype=f64))
        self.register_buffer("coincidence", torch.zeros(teachers, dtype=f64))
        self.register_buffer("input_mean", torch.zeros(input_dim, dtype=f64))
        self.register_buffer("input_scale", torch.ones(input_dim, dtype=f64))
        self.register_buffer("projection", torch.eye(input_dim, width, dtype=f64))
        # The fit set: projected points and each teacher's posterior that it is right
        # there (their row count is the fit's; a loaded state resizes them).
        self.register_buffer("points", torch.zeros(0, width, dtype=f64))
        self.register_buffer("point_teacher_right", torch.zeros(0, teachers, dtype=f64))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.label_noise).all())

    # ----------------------------------------------------------------- fit

    def fit(self, nll: Tensor, representation: Tensor) -> dict[str, float]:
        """Fit every teacher's NLL distributions, ``eps``, ``q`` and ``r`` on ``nll [N]``
        or ``[N, T]`` and ``representation [N, D]``; returns a summary per teacher."""
        nll = _columns(nll, self.teachers)
        h = representation.detach().double().cpu()
        if h.shape != (nll.shape[0], self.input_dim):
            raise ValueError(
                f"representation must have shape [{nll.shape[0]}, {self.input_dim}], "
                f"got {tuple(h.shape)}"
            )
        if h.shape[0] < 2:
            raise ValueError(f"the reliability needs at least 2 samples, got {h.shape[0]}")
        columns = [nll[:, t].double().cpu() for t in range(self.teachers)]
        # Step 1, once per teacher: the metric and the rest of the fit both start from it.
        mixtures = [fit_nll_mixture(column) for column in columns]
        agree = [m.agree_posterior(c) for m, c in zip(mixtures, columns)]
        points = self._set_metric(h, agree)
        k = neighbourhood_size(self.neighbours, points.shape[0])
        neighbours = neighbours_of(points, points, k, exclude_self=True)
        teacher_right = torch.empty(nll.shape, dtype=torch.float64)
        summary = {}
        for t, column in enumerate(columns):
            fitted = _fit_teacher(column, mixtures[t], neighbours, self.anchor_share)
            components, eps, q, right, iterations = fitted
            self.components[t] = components
            self.label_noise[t] = eps
            self.coincidence[t] = q
            teacher_right[:, t] = right
            prefix = f"teacher{t}/" if self.teachers > 1 else ""
            for level in (0.1, 0.5, 0.9):
                summary[f"{prefix}nll_q{int(level * 100)}"] = float(torch.quantile(column, level))
            for name, (log_median, _) in zip(COMPONENTS, components.tolist()):
                summary[f"{prefix}{name}_nll_median"] = math.exp(log_median)
            summary[f"{prefix}label_noise"] = eps
            summary[f"{prefix}coincidence"] = q
            summary[f"{prefix}teacher_right_mean"] = float(right.mean())
            summary[f"{prefix}iterations"] = iterations
        self.points = points.to(self.points.device)
        self.point_teacher_right = teacher_right.to(self.points.device)
        return summary

    def _set_metric(self, h: Tensor, agree: Sequence[Tensor]) -> Tensor:
        """The space where neighbours are found: ``h`` standardised, each direction
        scaled by how much it predicts agreement (the weights of a logistic regression
        of every teacher's agreement posterior ``agree`` on it, root mean square over
        teachers), and
        projected on its principal directions (at most ``PROJECTION_DIM``). Keeps the
        transform, returns the fit points in that space."""
        mean, std = h.mean(dim=0), h.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z = (h - mean) / std
        zeros = torch.zeros(z.shape[1], dtype=torch.float64)
        squared = torch.zeros_like(zeros)
        for posterior_of_agreement in agree:
            weight, _ = _logistic_regression(
                z, posterior_of_agreement, RELEVANCE_L2, zeros, zeros.sum()
            )
            squared += weight**2 / len(agree)
        relevance = squared.sqrt()
        relevance = relevance / relevance.max().clamp_min(1e-12)
        scale = std / relevance.clamp_min(1e-6)
        z = (h - mean) / scale
        if self.input_dim > PROJECTION_DIM:
            directions = torch.linalg.svd(z, full_matrices=False).Vh[:PROJECTION_DIM].T
            # Fewer fit samples than directions: the missing ones are zero columns (every
            # point's coordinate there is 0, so distances are those of the fit's span).
            projection = torch.zeros(self.input_dim, PROJECTION_DIM, dtype=torch.float64)
            projection[:, : directions.shape[1]] = directions
        else:
            projection = torch.eye(self.input_dim, dtype=torch.float64)
        self.input_mean.copy_(mean)
        self.input_scale.copy_(scale)
        self.projection.copy_(projection)
        return z @ projection

    # ----------------------------------------------------------------- apply

    def teacher_right_prior(self, representation: Tensor) -> Tensor:
        """``r(h) [B, T]``: the probability that each teacher is right at each input,
        the mean posterior over its nearest samples of the fit set."""
        if not self.fitted:
            raise RuntimeError(
                "the teacher reliability is not fitted: call fit() first (betakd train fits "
                "it on the training data before the first step)"
            )
        z = (representation.detach().double() - self.input_mean) / self.input_scale
        queries = z @ self.projection
        k = neighbourhood_size(self.neighbours, self.points.shape[0])
        neighbours = neighbours_of(queries, self.points, k)
        r = local_mean(self.point_teacher_right, neighbours)
        return r.clamp(R_FLOOR, 1 - R_FLOOR)

    def posteriors(self, nll: Tensor, representation: Tensor) -> list[ReliabilityPosterior]:
        """One posterior per teacher for ``nll [B]`` or ``[B, T]``."""
        nll = _columns(nll.detach(), self.teachers)
        prior = self.teacher_right_prior(representation)
        result = []
        for t in range(self.teachers):
            densities = component_log_densities(nll[:, t], self.components[t])
            eps, q = float(self.label_noise[t]), float(self.coincidence[t])
            result.append(posterior(densities, prior[:, t], eps, q))
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The fit set's size is the fit's: take the saved shape before copying.
        for name in self.FIT_SET_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, teachers={self.teachers}, "
            f"neighbours={self.neighbours}, anchor_share={self.anchor_share}"
        )


def _fit_teacher(
    nll: Tensor, mixture: NllMixture, neighbours: Tensor, anchor_share: float
) -> tuple[Tensor, float, float, Tensor, int]:
    """Steps 2-4 of the module docstring for one teacher's NLLs over the fit set, from
    step 1's ``mixture``: ``(components [3, 2], eps, q, P(teacher right) per point,
    iterations)``."""
    agree = mixture.agree_posterior(nll)
    local_agree = local_mean(agree[:, None], neighbours)[:, 0]
    anchors = local_agree >= torch.quantile(local_agree, 1 - anchor_share)
    eps = min(max(1 - float(agree[anchors].mean()), 1e-4), 0.5)
    components = torch.tensor(
        [
            [mixture.agree_mean, mixture.agree_std],
            [mixture.disagree_mean, mixture.disagree_std],
            [mixture.disagree_mean, mixture.disagree_std],
        ],
        dtype=torch.float64,
    )
    r, q = local_agree.clamp(R_FLOOR, 1 - R_FLOOR), COINCIDENCE_START
    iterations = 0
    while iterations < FIT_ITERATIONS:
        iterations += 1
        start = min(max(q, 1e-9), MAX_COINCIDENCE * (1 - 1e-9))
        components, q = fit_components(nll, r, eps, components, start, INNER_ITERATIONS)
        right = posterior(component_log_densities(nll, components), r, eps, q).teacher_right
        updated = local_mean(right[:, None], neighbours)[:, 0].clamp(R_FLOOR, 1 - R_FLOOR)
        change, r = float((updated - r).abs().max()), updated
        if change < FIT_TOLERANCE:
            break
    right = posterior(component_log_densities(nll, components), r, eps, q).teacher_right
    return components, eps, q, right, iterations


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


def _columns(nll: Tensor, teachers: int) -> Tensor:
    if nll.dim() == 1:
        nll = nll[:, None]
    if nll.dim() != 2 or nll.shape[1] != teachers:
        raise ValueError(
            f"expected teacher NLLs of shape [N] or [N, {teachers}], got {tuple(nll.shape)}"
        )
    return nll
