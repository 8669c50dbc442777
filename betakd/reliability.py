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
representations (``HeadCalibration.fit_reliability``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from betakd.reliability_cases import (
    COMPONENTS,
    MAX_COINCIDENCE,
    NllMixture,
    ReliabilityPosterior,
    component_log_densities,
    fit_components,
    fit_nll_mixture,
    posterior,
)

# Where the fit starts the coincidence probability q.
COINCIDENCE_START = 0.05
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
