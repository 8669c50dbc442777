"""The teacher reliability (betakd.reliability): each rule against an independent
computation (a direct likelihood maximisation, Bayes' rule by hand, a closed form)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from betakd import weighting
from betakd.reliability import (
    TeacherReliability,
    local_mean,
    neighbourhood_size,
    neighbours_of,
)
from betakd.reliability_cases import (
    MAX_COINCIDENCE,
    NllMixture,
    component_log_densities,
    fit_components,
    fit_nll_mixture,
    mixture_log_likelihood,
    posterior,
)


def synthetic_mixture(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    agree = torch.rand(n, generator=g) < 0.7
    log_n = torch.where(
        agree, -4.0 + 0.8 * torch.randn(n, generator=g), 1.5 + 0.6 * torch.randn(n, generator=g)
    )
    return torch.exp(log_n)


def test_em_fit_matches_a_direct_likelihood_maximisation():
    nll = synthetic_mixture()
    fitted = fit_nll_mixture(nll)
    x = np.log(nll.double().numpy())

    def negative_log_likelihood(p):
        w = 1 / (1 + math.exp(-p[0]))
        mixture = NllMixture(w, p[1], math.exp(p[2]), p[3], math.exp(p[4]))
        return -mixture.log_likelihood(torch.from_numpy(np.exp(x)))

    start = [0.0, -3.0, 0.0, 1.0, 0.0]
    direct = minimize(negative_log_likelihood, start, method="Nelder-Mead",
                      options={"maxiter": 20000, "xatol": 1e-8, "fatol": 1e-12})  # fmt: skip
    w = 1 / (1 + math.exp(-direct.x[0]))
    assert fitted.log_likelihood(nll) >= -direct.fun - 1e-6
    assert fitted.agree_weight == pytest.approx(w, abs=2e-3)
    assert fitted.agree_mean == pytest.approx(direct.x[1], abs=5e-3)
    assert fitted.agree_std == pytest.approx(math.exp(direct.x[2]), abs=5e-3)
    assert fitted.disagree_mean == pytest.approx(direct.x[3], abs=5e-3)
    assert fitted.disagree_std == pytest.approx(math.exp(direct.x[4]), abs=5e-3)
    # And it recovers the generating parameters.
    assert fitted.agree_weight == pytest.approx(0.7, abs=0.03)
    assert fitted.agree_mean == pytest.approx(-4.0, abs=0.1)
    assert fitted.disagree_mean == pytest.approx(1.5, abs=0.1)


@pytest.mark.parametrize("q", [0.0, 0.1])
def test_posterior_is_bayes_rule_over_the_five_cases(q):
    components = torch.tensor([[-4.0, 1.0], [1.2, 0.4], [2.2, 0.4]], dtype=torch.float64)
    nll = torch.tensor([0.02, 3.0, 9.0, 3.0, 0.02])
    r = torch.tensor([0.95, 0.95, 0.05, 0.05, 0.02])
    eps = 0.2
    post = posterior(component_log_densities(nll, components), r, eps, q)

    def density(x, mean, std):
        return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))

    for i in range(5):
        x = math.log(float(nll[i]))
        f_agree, f_rejected, f_wrong = (density(x, *row) for row in components.tolist())
        ri = float(r[i])
        joint = [
            ri * (1 - eps) * f_agree,
            ri * eps * f_rejected,
            (1 - ri) * (1 - eps) * f_wrong,
            (1 - ri) * eps * (1 - q) * f_rejected,
            (1 - ri) * eps * q * f_agree,
        ]
        total = sum(joint)
        cases = (post.both_right, post.label_wrong, post.teacher_wrong, post.both_wrong,
                 post.coincidence)  # fmt: skip
        for value, want in zip(cases, joint, strict=True):
            assert float(value[i]) == pytest.approx(want / total, rel=1e-9)
        assert float(post.teacher_right[i]) == pytest.approx((joint[0] + joint[1]) / total)
        assert float(post.label_right[i]) == pytest.approx((joint[0] + joint[2]) / total)
    # Hand-made reading: an agreeing sample keeps both; a rejected label where the teacher
    # is reliable is a wrong label (teacher kept, CE dropped); a confident rejection where
    # it is not is the teacher's error (teacher dropped, CE kept); a mild rejection there
    # is both wrong (both dropped).
    assert post.teacher_right[0] > 0.99 and post.label_right[0] > 0.99
    assert post.teacher_right[1] > 0.9 and post.label_right[1] < 0.1
    assert post.teacher_right[2] < 0.01 and post.label_right[2] > 0.98
    assert post.teacher_right[3] < 0.1 and post.label_right[3] < 0.1
    # An agreement where the teacher is unreliable: without coincidences it can only be
    # both right; with them (q = 0.1 against r = 0.02) it is mostly a wrong label that
    # happens to be the wrong teacher's answer, and both lose their weight.
    if q == 0:
        assert post.teacher_right[4] > 0.99 and post.label_right[4] > 0.99
    else:
        assert post.coincidence[4] > 0.5
        assert post.teacher_right[4] < 0.5 and post.label_right[4] < 0.5


def test_neighbours_are_the_nearest_points_by_brute_force():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(50, 3, generator=g, dtype=torch.float64)
    points[7] = points[3]  # one input seen twice (another question on the same image)
    neighbours = neighbours_of(points, points, 5, exclude_self=True)
    for i in range(50):
        distance = lambda j, i=i: float((points[j] - points[i]).norm())  # noqa: E731
        by_distance = sorted((j for j in range(50) if j != i), key=distance)
        # (3 and 7 tie with everyone: compare distances)
        assert [distance(j) for j in neighbours[i].tolist()] == pytest.approx(
            [distance(j) for j in by_distance[:5]], rel=1e-12
        )
        assert i not in neighbours[i].tolist()
    # The same input's other sample is a neighbour at distance 0.
    assert neighbours[3, 0] == 7 and neighbours[7, 0] == 3
    # A new query: its k nearest points, itself included when it is one of them.
    query = points[[10]].clone()
    near = neighbours_of(query, points, 4)
    assert near[0].tolist() == torch.argsort((points - query).norm(dim=1))[:4].tolist()
    # The local mean by hand.
    values = torch.rand(50, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(local_mean(values, neighbours)[10],
                               values[neighbours[10]].mean(dim=0))  # fmt: skip
    # Neighbourhoods stay local on a small fit set: at most an eighth of it.
    assert [neighbourhood_size(32, n) for n in (4, 48, 256, 8192)] == [1, 6, 32, 32]


def test_the_components_fit_is_a_maximum_of_the_likelihood():
    nll, h, _, _ = blind_and_noisy(n=1500)
    r = torch.sigmoid(3 - 4 * h[:, 0].double())  # a reliability given from outside
    eps = 0.2
    start = torch.tensor([[-4.0, 1.0], [1.5, 0.6], [1.5, 0.6]], dtype=torch.float64)
    components, q = fit_components(nll, r, eps, start, 0.05)
    assert components[1, 1] == components[2, 1]  # the rejections share their spread

    def objective(theta):
        t = torch.from_numpy(np.asarray(theta, dtype=np.float64))
        cases = torch.stack([t[:3], torch.stack([t[3], t[4], t[4]])], dim=1)
        densities = component_log_densities(nll, cases)
        return float(-mixture_log_likelihood(densities, r, eps, torch.sigmoid(t[5])).mean())

    found = [*components[:, 0].tolist(), float(components[0, 1]), float(components[1, 1]),
             math.log(q / (1 - q))]  # fmt: skip
    direct = minimize(objective, found, method="Nelder-Mead",
                      options={"maxiter": 40000, "xatol": 1e-10, "fatol": 1e-15})  # fmt: skip
    # Nelder-Mead from the fit finds nothing better: a (local) maximum.
    assert objective(found) <= direct.fun + 1e-9
    np.testing.assert_allclose(direct.x[:5], found[:5], atol=2e-3)
    # The likelihood by hand: the five cases summed.
    f = component_log_densities(nll, components).exp()
    by_hand = torch.log(
        r * (1 - eps) * f[:, 0] + r * eps * f[:, 1] + (1 - r) * (1 - eps) * f[:, 2]
        + (1 - r) * eps * (1 - q) * f[:, 1] + (1 - r) * eps * q * f[:, 0]
    )  # fmt: skip
    densities = component_log_densities(nll, components)
    torch.testing.assert_close(mixture_log_likelihood(densities, r, eps, q), by_hand)


def test_the_coincidence_stays_at_most_its_bound():
    # A teacher wrong everywhere (r = 0.01) whose labels mostly agree with it: unbounded,
    # q would explain the agreements as coincidences at a rate near 1.
    nll = torch.exp(torch.cat([torch.full((90,), -4.0), torch.full((10,), 1.5)]))
    nll = nll * torch.exp(0.1 * torch.randn(100, generator=torch.Generator().manual_seed(0)))
    r = torch.full((100,), 0.01, dtype=torch.float64)
    start = torch.tensor([[-4.0, 0.3], [1.5, 0.3], [2.5, 0.3]], dtype=torch.float64)
    _, q = fit_components(nll, r, 0.4, start, 0.05)
    assert q == pytest.approx(MAX_COINCIDENCE, rel=1e-3)
    with pytest.raises(ValueError, match="coincidence start"):
        fit_components(nll, r, 0.4, start, MAX_COINCIDENCE)


def test_the_fitted_r_is_the_local_mean_of_the_posteriors():
    nll, h, _, _ = blind_and_noisy(n=1500)
    reliability = TeacherReliability(6, neighbours=16)
    reliability.fit(nll, h)
    # The space of the neighbours: h standardised and scaled by relevance; here only
    # h_0 tells where the teacher is blind, so it dominates.
    relevance = h.double().std(0, unbiased=False) / reliability.input_scale
    assert relevance[0] == 1 and relevance[1:].max() < 0.2
    z = (h.double() - reliability.input_mean) / reliability.input_scale
    torch.testing.assert_close(reliability.points, z)  # 6 <= PROJECTION_DIM: no projection
    # At convergence, r at each fit point is the mean over its 16 nearest other samples
    # of the stored posteriors, and those posteriors are Bayes' rule with that r.
    distance = torch.cdist(z, z)
    stored = reliability.point_teacher_right[:, 0]
    in_training = stored[distance.topk(16, largest=False).indices].mean(dim=1)
    distance.fill_diagonal_(math.inf)
    leave_one_out = stored[distance.topk(16, largest=False).indices].mean(dim=1)
    post = posterior(
        component_log_densities(nll, reliability.components[0]),
        leave_one_out.clamp(1e-3, 1 - 1e-3),
        float(reliability.label_noise[0]), float(reliability.coincidence[0]),
    )  # fmt: skip
    assert (post.teacher_right - stored).abs().max() < 1e-3
    # In training, r(h) of a fit sample's h counts the sample itself among its 16.
    r = reliability.teacher_right_prior(h)[:, 0]
    torch.testing.assert_close(r, in_training.clamp(1e-3, 1 - 1e-3))


def blind_and_noisy(n=4000, seed=0):
    """h(x) in 6 dimensions; the teacher is blind where h_0 > 1 (about 16% of inputs);
    20% of labels are wrong, scattered over every input."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 6, generator=g)
    blind = h[:, 0] > 1.0
    noisy = torch.rand(n, generator=g) < 0.2
    agree = ~blind & ~noisy
    log_n = torch.where(
        agree, -4.5 + 0.7 * torch.randn(n, generator=g), 1.8 + 0.5 * torch.randn(n, generator=g)
    )
    return torch.exp(log_n), h, blind, noisy


def test_reliability_tells_a_blind_region_from_scattered_wrong_labels():
    nll, h, blind, noisy = blind_and_noisy()
    reliability = TeacherReliability(6)
    summary = reliability.fit(nll, h)
    assert summary["label_noise"] == pytest.approx(0.2, abs=0.03)
    teacher, label = reliability.factors(nll, h)
    teacher = teacher[:, 0]
    clean = ~blind & ~noisy
    # Agreeing samples keep teacher and label.
    assert teacher[clean].min() > 0.95 and label[clean].min() > 0.95
    # Wrong labels where the teacher is reliable: the teacher stays on, the CE goes off.
    reliable_noisy = noisy & (h[:, 0] < 0.5)
    assert teacher[reliable_noisy].mean() > 0.8 and label[reliable_noisy].mean() < 0.25
    # The blind region loses the teacher, whatever its labels (a wrong label inside it
    # too: a label-keyed reliability would let the teacher teach there).
    deep_blind = h[:, 0] > 1.5
    assert teacher[deep_blind].max() < 0.1
    assert teacher[deep_blind & noisy].max() < 0.1
    assert label[deep_blind & ~noisy].mean() > 0.7
    # A data trust from the NLL alone (sigmoid(1 - n)) cannot tell the two apart.
    data_trust = torch.sigmoid(1 - nll)
    assert data_trust[reliable_noisy].mean() < 0.3


def blind_with_coincidences(coincidence, n=8000, seed=0):
    """As ``blind_and_noisy``, with a teacher confidently wrong where it is blind (NLL
    ~10 nats) and milder on a wrong label (~3.3), as a trained teacher is; a wrong label
    in the blind region is the teacher's wrong answer with probability ``coincidence``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 6, generator=g)
    blind = h[:, 0] > 1.0
    noisy = torch.rand(n, generator=g) < 0.2
    coincide = blind & noisy & (torch.rand(n, generator=g) < coincidence)
    log_n = torch.where(
        (~blind & ~noisy) | coincide,
        -4.5 + 0.7 * torch.randn(n, generator=g),
        torch.where(
            blind & ~noisy,
            2.3 + 0.3 * torch.randn(n, generator=g),
            1.2 + 0.3 * torch.randn(n, generator=g),
        ),
    )
    return torch.exp(log_n), h, noisy


@pytest.mark.parametrize("seed", [0, 1])
def test_reliability_reads_agreements_in_a_blind_region_as_coincidences(seed):
    nll, h, noisy = blind_with_coincidences(0.6, seed=seed)
    reliability = TeacherReliability(6)
    summary = reliability.fit(nll, h)
    # Without coincidences in the data, q stays at 0.
    assert (
        TeacherReliability(6).fit(*blind_with_coincidences(0.0, seed=seed)[:2])["coincidence"]
        < 1e-3
    )
    # q: the share of the blind region's wrong labels that agree with the teacher (a
    # linear r(h) blurs the region's edge, where some are read as a right teacher).
    assert 0.4 < summary["coincidence"] < 0.7
    posts = reliability.posteriors(nll, h)[0]
    deep_blind = h[:, 0] > 1.5
    agreeing = deep_blind & (nll < 0.1)
    assert agreeing.sum() > 20
    # Those agreements lose the teacher and the CE: a wrong label that is the wrong
    # teacher's answer.
    assert posts.teacher_right[agreeing].mean() < 0.3
    assert posts.label_right[agreeing].mean() < 0.3
    assert posts.teacher_right[deep_blind & noisy].mean() < 0.15
    # A model without the fifth case explains them as a right teacher.
    no_coincidence = posterior(
        component_log_densities(nll[agreeing], reliability.components[0]),
        reliability.teacher_right_prior(h[agreeing])[:, 0],
        float(reliability.label_noise[0]),
    )
    assert no_coincidence.teacher_right.mean() > 0.9


def test_reliability_of_several_teachers_combines_their_evidence_about_the_label():
    nll_a, h, blind_a, noisy = blind_and_noisy()
    g = torch.Generator().manual_seed(5)
    blind_b = h[:, 1] > 1.0
    log_b = torch.where(
        ~blind_b & ~noisy,
        -4.5 + 0.7 * torch.randn(len(h), generator=g),
        1.8 + 0.5 * torch.randn(len(h), generator=g),
    )
    nll = torch.stack([nll_a, torch.exp(log_b)], dim=1)
    reliability = TeacherReliability(6, teachers=2)
    reliability.fit(nll, h)
    teacher, label = reliability.factors(nll, h)
    a_only = (h[:, 0] > 1.5) & (h[:, 1] < 0.5)
    assert teacher[a_only, 0].max() < 0.1 and teacher[a_only, 1].mean() > 0.9
    # Blind a, wrong label: b's evidence that the label is wrong decides.
    assert label[a_only & noisy].mean() < 0.25
    assert label[a_only & ~noisy].mean() > 0.9
    # Each teacher's posterior alone, by hand, combined as independent experts.
    posts = reliability.posteriors(nll, h)
    eps = reliability.label_noise.tolist()
    log_odds = sum(torch.logit(p.label_right, eps=1e-9) for p in posts)
    prior = [math.log((1 - e) / e) for e in eps]
    expected = torch.sigmoid(log_odds - sum(prior) + sum(prior) / 2)
    torch.testing.assert_close(label, expected)


def test_weighting_applies_the_posteriors_to_the_teacher_channels_and_the_ce():
    nll, h, blind, noisy = blind_and_noisy(n=1000)
    built = weighting.build(
        "fixed", ["ce", "kd", "visual"], weights={"kd": 2.0, "visual": 0.5},
        reliability={"input_dim": 6},
    )  # fmt: skip
    assert built.needs_teacher_nll
    built.reliability.fit(nll, h)
    losses = torch.rand(8, 3, dtype=torch.float64, requires_grad=True)
    out = built(losses, h[:8], nll[:8])
    teacher, label = built.reliability.factors(nll[:8], h[:8])
    expected = label * losses[:, 0] + teacher[:, 0] * (2.0 * losses[:, 1] + 0.5 * losses[:, 2])
    torch.testing.assert_close(out.per_sample_loss, expected.to(out.per_sample_loss.dtype))
    # The factors are constants of the gradient (detached posteriors).
    (grad,) = torch.autograd.grad(out.per_sample_loss.sum(), losses)
    direct = torch.stack([label, 2.0 * teacher[:, 0], 0.5 * teacher[:, 0]], dim=1)
    torch.testing.assert_close(grad, direct.to(grad.dtype))


def test_instance_weighting_with_reliability_keeps_its_regulariser_and_gradients():
    nll, h, _, _ = blind_and_noisy(n=500)
    built = weighting.build(
        "instance", ["ce", "kd"], input_dim=6, hidden=4, prior_shape=3.0, prior_rate=0.1,
        reliability={"input_dim": 6},
    )  # fmt: skip
    built.reliability.fit(nll, h)
    losses = torch.rand(5, 2, dtype=torch.float64)
    out = built(losses, h[:5], nll[:5])
    teacher, label = built.reliability.factors(nll[:5], h[:5])
    log_beta = built.log_betas(h[:5])[:, 0].double()
    c = 0.5 + 3.0 - 1
    expected = (
        label * losses[:, 0]
        + teacher[:, 0] * log_beta.exp() * losses[:, 1]
        + 0.1 * log_beta.exp()
        - c * log_beta
    )
    torch.testing.assert_close(out.per_sample_loss.double(), expected, atol=1e-6, rtol=1e-6)


def test_reliability_must_be_fitted_and_its_state_is_saved():
    nll, h, _, _ = blind_and_noisy(n=500)
    built = weighting.build("fixed", ["ce", "kd"], weights={"kd": 1.0},
                            reliability={"input_dim": 6})  # fmt: skip
    with pytest.raises(RuntimeError, match="not fitted"):
        built(torch.rand(2, 2), h[:2], nll[:2])
    built.reliability.fit(nll, h)
    state = built.state_dict()
    assert {"reliability.components", "reliability.points", "reliability.label_noise"} <= set(state)
    assert state["reliability.points"].shape == (500, 6)
    other = weighting.build("fixed", ["ce", "kd"], weights={"kd": 1.0},
                            reliability={"input_dim": 6})  # fmt: skip
    other.load_state_dict(state)
    assert other.reliability.fitted
    torch.testing.assert_close(other(torch.ones(3, 2), h[:3], nll[:3]).per_sample_loss,
                               built(torch.ones(3, 2), h[:3], nll[:3]).per_sample_loss)  # fmt: skip


def test_reliability_options_are_validated():
    with pytest.raises(ValueError, match="not both"):
        weighting.build("fixed", ["ce", "kd"], weights={"kd": 1.0},
                        trust={"reference": "data"}, reliability={"input_dim": 2})  # fmt: skip
    with pytest.raises(ValueError, match="unknown keys"):
        weighting.build("fixed", ["ce", "kd"], weights={"kd": 1.0},
                        reliability={"input_dim": 2, "threshold": 1})  # fmt: skip
    with pytest.raises(ValueError, match="needs a representation"):
        built = weighting.build("fixed", ["ce", "kd"], weights={"kd": 1.0},
                                reliability={"input_dim": 2})  # fmt: skip
        built(torch.rand(2, 2), None, torch.rand(2))


def test_reliability_options_keep_the_models_defaults_and_count_the_teachers():
    import inspect

    signature = inspect.signature(TeacherReliability.__init__).parameters
    fields = weighting.ReliabilityOptions.model_fields
    for key in ("neighbours", "anchor_share"):
        assert fields[key].default == signature[key].default, key
    options = weighting.ReliabilityOptions(input_dim=5)
    assert options.build().teachers == 1 and options.build().neighbours == 32
    channels = ["ce", "a/kd", "b/kd", "b/visual"]
    teachers = {"a/kd": "a", "b/kd": "b", "b/visual": "b"}
    two = weighting.build("task", channels, reliability={"input_dim": 5}, channel_teachers=teachers)
    assert two.reliability.teachers == 2 and two.reliability_teacher == [0, 1, 1]
    typed = weighting.build("task", channels, reliability=options, channel_teachers=teachers)
    assert typed.reliability.teachers == 2
    given = weighting.build("task", channels, reliability={"input_dim": 5, "teachers": 3},
                            channel_teachers=teachers)  # fmt: skip
    assert given.reliability.teachers == 3
    with pytest.raises(ValueError, match=r"reliability.neighbours: Input should be greater"):
        weighting.build("task", ["ce", "kd"], reliability={"input_dim": 2, "neighbours": 0})


def test_fewer_fit_samples_than_projected_directions():
    """h(x) wider than the projection with fewer fit samples than its directions (two
    teachers' visual tokens on a small data set): the missing directions are zero columns,
    and distances are those of the samples' span."""
    nll, h, _, _ = blind_and_noisy(n=40)
    wide = torch.cat([h, torch.randn(40, 100, generator=torch.Generator().manual_seed(1))], 1)
    reliability = TeacherReliability(106, neighbours=4)
    reliability.fit(nll, wide)
    assert reliability.projection.shape == (106, 64)
    assert not reliability.projection[:, 40:].any()
    z = (wide.double() - reliability.input_mean) / reliability.input_scale
    torch.testing.assert_close(
        torch.cdist(reliability.points, reliability.points), torch.cdist(z, z), atol=1e-6, rtol=0
    )
    teacher, label = reliability.factors(nll, wide)
    assert torch.isfinite(teacher).all() and torch.isfinite(label).all()
