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
    NllMixture,
    TeacherReliability,
    _logistic_regression,
    component_log_densities,
    fit_cases,
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


def test_posterior_is_bayes_rule_over_the_four_cases():
    components = torch.tensor([[-4.0, 1.0], [1.2, 0.4], [2.2, 0.4]], dtype=torch.float64)
    nll = torch.tensor([0.02, 3.0, 9.0, 3.0])
    r = torch.tensor([0.95, 0.95, 0.05, 0.05])
    eps = 0.2
    post = posterior(component_log_densities(nll, components), r, eps)

    def density(x, mean, std):
        return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))

    for i in range(4):
        x = math.log(float(nll[i]))
        f_agree, f_rejected, f_wrong = (density(x, *row) for row in components.tolist())
        ri = float(r[i])
        joint = [
            ri * (1 - eps) * f_agree,
            ri * eps * f_rejected,
            (1 - ri) * (1 - eps) * f_wrong,
            (1 - ri) * eps * f_rejected,
        ]
        total = sum(joint)
        for value, want in zip(
            (post.both_right, post.label_wrong, post.teacher_wrong, post.both_wrong), joint
        ):
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


def test_logistic_regression_minimises_the_penalised_cross_entropy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 3, generator=g, dtype=torch.float64)
    target = torch.sigmoid(z @ torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64) + 0.5)
    target = (target + 0.1 * torch.rand(400, generator=g, dtype=torch.float64)).clamp(0, 1)
    l2 = 0.01
    weight, bias = _logistic_regression(
        z, target, l2, torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    )

    def objective(theta):
        logits = z.numpy() @ theta[:3] + theta[3]
        ce = np.logaddexp(0, logits) - target.numpy() * logits
        return ce.mean() + 0.5 * l2 * (theta[:3] ** 2).sum()

    direct = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(weight.numpy(), direct.x[:3], atol=1e-5)
    assert float(bias) == pytest.approx(direct.x[3], abs=1e-5)


def test_the_cases_fit_is_a_maximum_of_the_penalised_likelihood():
    nll, h, _, _ = blind_and_noisy(n=1500)
    z = h[:, :2].double()
    eps, l2 = 0.2, 0.01
    start = torch.tensor([[-4.0, 1.0], [1.5, 0.6], [1.5, 0.6]], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    weight, bias, components = fit_cases(z, nll, eps, l2, zeros, zeros.sum(), start)
    assert components[1, 1] == components[2, 1]  # the rejections share their spread

    def objective(theta):
        t = torch.from_numpy(np.asarray(theta, dtype=np.float64))
        r = torch.sigmoid(z @ t[:2] + t[2])
        cases = torch.stack([t[3:6], torch.stack([t[6], t[7], t[7]])], dim=1)
        value = mixture_log_likelihood(component_log_densities(nll, cases), r, eps).mean()
        return float(-value + 0.5 * l2 * (t[:2] ** 2).sum())

    found = [*weight.tolist(), float(bias), *components[:, 0].tolist(),
             float(components[0, 1]), float(components[1, 1])]  # fmt: skip
    direct = minimize(objective, found, method="Nelder-Mead",
                      options={"maxiter": 40000, "xatol": 1e-10, "fatol": 1e-15})  # fmt: skip
    # Nelder-Mead from the fit finds nothing better: a (local) maximum.
    assert objective(found) <= direct.fun + 1e-9
    np.testing.assert_allclose(direct.x, found, atol=2e-3)
    # The likelihood by hand: the four cases summed.
    r = torch.sigmoid(z @ weight + bias)
    f = component_log_densities(nll, components).exp()
    by_hand = torch.log(
        r * (1 - eps) * f[:, 0] + r * eps * f[:, 1] + (1 - r) * (1 - eps) * f[:, 2]
        + (1 - r) * eps * f[:, 1]
    )  # fmt: skip
    densities = component_log_densities(nll, components)
    torch.testing.assert_close(mixture_log_likelihood(densities, r, eps), by_hand)


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
    assert {"reliability.components", "reliability.weight", "reliability.label_noise"} <= set(state)
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
