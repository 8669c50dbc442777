"""The bounded options of the Beta-KD weightings against direct computations.

Gamma hyperprior (closed form, task, instance), the shared trust (Gamma and SuperLoss
forms), scale-relative fixed weights, and the energy-scale buffer.
"""

import math

import pytest
import torch

from betakd import weighting as W

CHANNELS = ["ce", "fkl", "feat"]
SCALE = torch.tensor([0.8, 0.05], dtype=torch.float64)  # fkl, feat


def losses(batch=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, len(CHANNELS), generator=g, dtype=dtype) * 2


def calibrated(name, **options):
    wt = W.build(name, CHANNELS, **options).double()
    if wt.needs_energy_scale:
        wt.set_energy_scale(SCALE)
    return wt


# ----------------------------------------------------------------------------- Gamma prior


@pytest.mark.parametrize("shape,d", [(1.0, 1.0), (2.5, 1.0), (1.0, 4.0), (0.75, 2.0)])
def test_gamma_closed_form_beta_bound_and_profile(shape, d):
    x = losses()
    x[0, 1:] = 0.0  # a sample the student matches exactly: beta reaches its bound, no more
    wt = calibrated("closed_form", d=d, prior_shape=shape, prior_rate_scale=0.5)
    out = wt(x)
    c = d / 2 + shape - 1
    b = 0.5 * SCALE
    beta = c / (x[:, 1:] + b)
    torch.testing.assert_close(out.betas[:, 1:], beta)
    torch.testing.assert_close(out.betas[0, 1:], c / b)  # the bound c / b
    assert bool(out.at_bound[0, 1:].all()) and not bool(out.at_bound[1:, 1:].any())
    # The per-sample loss is the profile c log(l + b) + c - c log c (beta at its optimum).
    profile = c * torch.log(x[:, 1:] + b) + c - c * math.log(c)
    torch.testing.assert_close(out.per_sample_loss, x[:, 0] + profile.sum(1))


def test_gamma_closed_form_gradient_is_the_robust_weight():
    """d loss / d l = c / (l + b): bounded by c / b, fading like 1 / l (Student-t-like)."""
    x = losses().requires_grad_(True)
    wt = calibrated("closed_form", prior_rate=0.3)
    (grad,) = torch.autograd.grad(wt(x).per_sample_loss.sum(), x)
    torch.testing.assert_close(grad[:, 1:], 0.5 / (x.detach()[:, 1:] + 0.3))
    assert bool((grad[:, 1:] <= 0.5 / 0.3).all())


def test_gamma_absolute_rate_needs_no_energy_scale():
    wt = W.build("closed_form", CHANNELS, prior_rate=0.2, prior_shape=2.0)
    assert not wt.needs_energy_scale
    x = losses(dtype=torch.float32)
    torch.testing.assert_close(wt(x).betas[:, 1:], 1.5 / (x[:, 1:] + 0.2))


@pytest.mark.parametrize("name", ["task", "instance"])
def test_gamma_learned_beta_converges_to_the_bounded_optimum(name):
    """Learned betas reach (d/2 + a - 1) / (l + b), also where l = 0 (no blow-up)."""
    torch.manual_seed(0)
    energy = torch.tensor([[1.0, 0.0, 0.4]]).expand(8, 3)
    options = {"prior_shape": 2.0, "prior_rate": 0.25}
    if name == "instance":
        options.update(input_dim=2, hidden=8)
    wt = W.build(name, CHANNELS, **options)
    h = torch.randn(8, 2)
    opt = torch.optim.Adam(wt.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        wt(energy, h).per_sample_loss.mean().backward()
        opt.step()
    beta = wt(energy, h).betas[:, 1:]
    want = torch.tensor([1.5 / 0.25, 1.5 / (0.4 + 0.25)]).expand(8, 2)
    torch.testing.assert_close(beta, want, rtol=0.01, atol=0)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("task", {"prior_shape": 1.5, "prior_rate_scale": 0.5}),
        ("instance", {"input_dim": 4, "hidden": 5, "prior_rate_scale": 0.5, "trust": ["fkl"]}),
        ("task", {"prior_rate": 0.1, "trust": {"channels": ["fkl"], "kind": "superloss"}}),
    ],
)
def test_robust_gradients_match_finite_differences(name, opts):
    torch.manual_seed(0)
    opts = dict(opts)
    if "trust" in opts and isinstance(opts["trust"], list):
        opts["trust"] = {"channels": opts["trust"]}
    wt = calibrated(name, **opts)
    for p in wt.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    x = losses() + 0.05
    h = torch.randn(6, 4, dtype=torch.float64)
    names = [n for n, _ in wt.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in wt.parameters()]

    def pure(x, *ps):
        return torch.func.functional_call(wt, dict(zip(names, ps)), (x, h)).per_sample_loss

    # The trust is a stop-gradient factor, so only parameters are checked when it is on;
    # test_trust_is_a_constant_factor_in_the_gradient covers the energies then.
    inputs = [x.requires_grad_("trust" not in opts), *params]
    assert torch.autograd.gradcheck(pure, inputs, eps=1e-6, atol=1e-5)


def test_gamma_options_are_validated():
    with pytest.raises(ValueError, match="not both"):
        W.build("closed_form", CHANNELS, prior_rate=0.1, prior_rate_scale=0.5)
    with pytest.raises(ValueError, match=r"d/2 \+ prior_shape - 1 must be > 0"):
        W.build("task", CHANNELS, prior_shape=0.5)
    with pytest.raises(ValueError, match="prior_rate_scale must be > 0"):
        W.build("instance", CHANNELS, input_dim=2, prior_rate_scale=0.0)


# ----------------------------------------------------------------------------- shared trust


def test_gamma_trust_formula_and_which_channels_take_it():
    x = losses()
    trust = {"channels": ["fkl"], "kind": "gamma", "rho": 0.5}
    wt = calibrated("closed_form", prior_rate_scale=0.5, trust=trust)
    out = wt(x)
    r = x[:, 1] / SCALE[0]
    tau = 0.5 / (r + 0.5)
    own = 0.5 / (x[:, 1:] + 0.5 * SCALE)
    # fkl keeps its own per-sample beta; feat (no per-sample signal of its own) takes tau.
    torch.testing.assert_close(out.betas[:, 1], own[:, 0])
    torch.testing.assert_close(out.betas[:, 2], own[:, 1] * tau)
    assert out.betas[:, 0].eq(1).all()
    # A task-level weighting has no per-sample beta: every teacher channel takes tau.
    task = calibrated("task", trust=trust)
    torch.testing.assert_close(task(x).betas[:, 1:], tau[:, None].expand(6, 2))


def test_trust_is_a_constant_factor_in_the_gradient():
    """The trust re-weights samples; no gradient flows through it into the energies."""
    x = losses().requires_grad_(True)
    wt = calibrated("task", prior_rate=0.1, trust={"channels": ["fkl"], "kind": "gamma"})
    out = wt(x)
    (grad,) = torch.autograd.grad(out.per_sample_loss.sum(), x)
    torch.testing.assert_close(grad[:, 1:], out.betas[:, 1:])


def test_trust_from_several_channels_averages_relative_energies():
    x = losses()
    wt = calibrated("task", trust={"channels": ["fkl", "feat"], "kind": "gamma", "rho": 2.0})
    r = (x[:, 1] / SCALE[0] + x[:, 2] / SCALE[1]) / 2
    torch.testing.assert_close(wt(x).betas[:, 1], 2.0 / (r + 2.0))


def test_data_trust_comes_from_the_teacher_nll_and_applies_to_every_teacher_channel():
    x = losses()
    nll = torch.tensor([0.0, 0.1, 1.0, 3.0, 9.0, 20.0], dtype=torch.float64)
    trust = {"reference": "data", "kind": "gamma", "rho": 0.5}
    wt = calibrated("closed_form", prior_rate_scale=0.5, trust=trust)
    assert wt.needs_teacher_nll
    out = wt(x, None, nll)
    tau = 0.5 / (nll + 0.5)
    own = 0.5 / (x[:, 1:] + 0.5 * SCALE)
    torch.testing.assert_close(out.betas[:, 1:], own * tau[:, None])
    assert out.betas[:, 0].eq(1).all()
    with pytest.raises(ValueError, match="needs the teacher's per-sample NLL"):
        wt(x)
    # No energy scale is needed for the trust itself (only for the prior's rate here).
    assert not W.build("task", CHANNELS, trust={"reference": "data"}).needs_energy_scale


def test_data_trust_of_several_teachers_takes_each_channels_own_teacher_nll():
    """[B, K] NLLs: each weighted channel's beta is scaled by the trust in its teacher."""
    x = losses()
    g = torch.Generator().manual_seed(5)
    nll = torch.rand(x.shape[0], 2, generator=g, dtype=torch.float64) * 5
    trust = {"reference": "data", "kind": "gamma", "rho": 0.5}
    wt = calibrated("closed_form", prior_rate_scale=0.5, trust=trust)
    out = wt(x, None, nll)
    own = 0.5 / (x[:, 1:] + 0.5 * SCALE)
    torch.testing.assert_close(out.betas[:, 1:], own * 0.5 / (nll + 0.5))
    with pytest.raises(ValueError, match=r"or \[6, 2\] with one teacher per weighted channel"):
        wt(x, None, nll[:, :1].repeat(1, 3))


def test_mixture_trust_is_the_posterior_of_a_two_component_mixture():
    """tau = P(teacher | answer) = pi p_t / (pi p_t + (1 - pi) q), with the threshold
    log(pi / ((1 - pi) q)) folding prior odds and the alternative's likelihood q."""
    pi, q = 0.8, 0.05
    trust = W.SharedTrust(reference="data", threshold=math.log(pi / ((1 - pi) * q)))
    nll = torch.tensor([0.0, 0.01, 0.7, 3.0, 9.0], dtype=torch.float64)
    p_teacher = torch.exp(-nll)
    want = pi * p_teacher / (pi * p_teacher + (1 - pi) * q)
    torch.testing.assert_close(trust.factor(nll), want)


def test_superloss_trust_is_the_minimiser_of_the_superloss_objective():
    """e * tau minimises (r - threshold) sigma + lam log(sigma)^2 (Castells et al. 2020)."""
    lam, threshold = 0.7, 1.2
    trust = W.SharedTrust(("fkl",), kind="superloss", lam=lam, threshold=threshold)
    r = torch.tensor([0.0, 0.3, 1.2, 1.7, 4.0, 30.0], dtype=torch.float64)
    tau = trust.factor(r)
    grid = torch.logspace(-4, 1, 200001, dtype=torch.float64)
    for ri, ti in zip(r, tau):
        objective = (ri - threshold) * grid + lam * torch.log(grid) ** 2
        best = grid[objective.argmin()]
        if float(ri - threshold) / lam >= -2 / math.e:  # inside SuperLoss's clamp
            assert float(ti) * math.e == pytest.approx(float(best), rel=1e-3)
    assert float(tau[2]) * math.e == pytest.approx(1.0)
    assert bool((tau > 0).all()) and bool((tau <= 1 + 1e-9).all())
    assert bool((tau[1:] <= tau[:-1]).all())  # larger disagreement, less trust


def test_lambert_w_solves_its_equation():
    x = torch.tensor([-1 / math.e, -0.3, -0.01, 0.0, 0.5, 2.0, 10.0, 1e4], dtype=torch.float64)
    w = W.lambert_w(x)
    torch.testing.assert_close(w * torch.exp(w), x, atol=1e-9, rtol=1e-9)
    assert bool((w >= -1).all())


def test_trust_options_are_validated():
    with pytest.raises(ValueError, match=r"trust channels \[.ce.\] are not weighted"):
        W.build("task", CHANNELS, trust={"channels": ["ce"]})
    with pytest.raises(ValueError, match="unknown keys"):
        W.build("task", CHANNELS, trust={"channels": ["fkl"], "beta": 1})
    with pytest.raises(ValueError, match="trust kind"):
        W.build("task", CHANNELS, trust={"channels": ["fkl"], "kind": "huber"})
    with pytest.raises(ValueError, match="needs channels"):
        W.build("task", CHANNELS, trust={"reference": "student"})
    with pytest.raises(ValueError, match="no channels"):
        W.build("task", CHANNELS, trust={"reference": "data", "channels": ["fkl"]})


# ----------------------------------------------------------------------------- energy scales


def test_scale_relative_fixed_weights_start_every_channel_at_the_ce_scale():
    wt = W.build("fixed", CHANNELS, weights={"fkl": 1.0, "feat": 3.0}, scale_relative=True)
    wt.set_energy_scale(torch.tensor([6.0, 0.5, 0.02]))
    out = wt(losses(dtype=torch.float32))
    torch.testing.assert_close(out.betas[0], torch.tensor([1.0, 6.0 / 0.5, 3.0 * 6.0 / 0.02]))


def test_energy_scale_must_be_measured_first_and_is_saved():
    wt = W.build("closed_form", CHANNELS, prior_rate_scale=0.5)
    with pytest.raises(RuntimeError, match="set_energy_scale"):
        wt(losses(dtype=torch.float32))
    assert "energy_scale" in wt.state_dict()
    assert "energy_scale" not in W.build("closed_form", CHANNELS).state_dict()
    wt.set_energy_scale(torch.tensor([0.4, 0.0]))
    assert float(wt.energy_scale[1]) > 0  # floored: a zero scale would divide by zero


def test_running_scale_is_an_exponential_mean_of_observed_step_means():
    wt = W.build("task", CHANNELS, prior_rate_scale=1.0, scale_momentum=0.75)
    wt.set_energy_scale(torch.tensor([1.0, 2.0]))
    wt.observe_energy(torch.tensor([0.2, 2.0]))
    wt.observe_energy(torch.tensor([0.6, 6.0]))
    want = 0.75 * (0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([0.2, 2.0]))
    want = want + 0.25 * torch.tensor([0.6, 6.0])
    torch.testing.assert_close(wt.energy_scale, want)
    frozen = W.build("task", CHANNELS, prior_rate_scale=1.0)
    frozen.set_energy_scale(torch.tensor([1.0, 2.0]))
    frozen.observe_energy(torch.tensor([0.2, 2.0]))
    torch.testing.assert_close(frozen.energy_scale, torch.tensor([1.0, 2.0]))
