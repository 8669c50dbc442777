"""Weightings against hand-computed formulas, finite differences and closed-form optima."""

import math

import pytest
import torch

from betakd import weighting as W

CHANNELS = ["ce", "fkl", "feat"]


def losses(batch=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, len(CHANNELS), generator=g, dtype=dtype) + 0.1


def test_equal_is_the_plain_sum():
    x = losses()
    out = W.build("equal", CHANNELS)(x)
    torch.testing.assert_close(out.per_sample_loss, x.sum(1))


def test_fixed_uses_given_weights_and_ce_defaults_to_one():
    x = losses()
    out = W.build("fixed", CHANNELS, weights={"fkl": 2.0, "feat": 0.5})(x)
    torch.testing.assert_close(out.per_sample_loss, x[:, 0] + 2 * x[:, 1] + 0.5 * x[:, 2])
    with pytest.raises(ValueError, match=r"weight for channel\(s\) \['feat'\]"):
        W.build("fixed", CHANNELS, weights={"fkl": 2.0})


def test_task_formula_leaves_ce_unweighted_by_default():
    x = losses()
    wt = W.build("task", CHANNELS, d={"fkl": 3.0})
    with torch.no_grad():
        wt.raw.copy_(torch.tensor([math.log(2.0), math.log(0.25)]))
    out = wt(x)
    want = x[:, 0] + (2.0 * x[:, 1] - 1.5 * math.log(2.0)) + (0.25 * x[:, 2] - 0.5 * math.log(0.25))
    torch.testing.assert_close(out.per_sample_loss, want)
    assert out.betas[:, 0].eq(1).all()


def test_task_can_weight_ce():
    wt = W.build("task", CHANNELS, weight_ce=True)
    assert wt.weighted_channels == CHANNELS and wt.raw.shape == (3,)


@pytest.mark.parametrize("parameterization", ["exp", "softplus"])
@pytest.mark.parametrize("bounds", [None, (1e-2, 1e2)])
def test_positive_map_inverse_roundtrip(parameterization, bounds):
    pos = W.PositiveMap(parameterization, bounds)
    for beta in (0.05, 1.0, 7.0):
        raw = torch.tensor(pos.inverse(beta), dtype=torch.float64)
        assert math.isclose(float(pos.log_beta(raw).exp()), beta, rel_tol=1e-9)


def test_bounds_never_create_a_dead_zone():
    pos = W.PositiveMap("exp", (1e-3, 1e3))
    raw = torch.tensor([-30.0, 0.0, 30.0], dtype=torch.float64, requires_grad=True)
    log_beta = pos.log_beta(raw)
    (grad,) = torch.autograd.grad(log_beta.sum(), raw)
    assert (grad > 0).all()
    assert pos.at_bound(log_beta.detach()).tolist() == [True, False, True]


@pytest.mark.parametrize(
    "name,opts",
    [
        ("task", {}),
        ("task", {"parameterization": "softplus", "bounds": (0.01, 100.0), "weight_ce": True}),
        ("instance", {"input_dim": 4, "hidden": 5}),
        ("reference", {"level": "task"}),
        ("reference", {"level": "instance", "input_dim": 4, "hidden": 5}),
    ],
)
def test_gradients_match_finite_differences(name, opts):
    torch.manual_seed(0)
    wt = W.build(name, CHANNELS, **opts).double()
    for p in wt.parameters():  # move away from the zero-initialised last layer
        p.data.add_(0.3 * torch.randn_like(p))
    x = losses().requires_grad_(True)
    h = torch.randn(6, 4, dtype=torch.float64)

    def f(x, *params):
        with torch.no_grad():
            for p, v in zip(wt.parameters(), params):
                p.copy_(v)
        return wt(x, h).per_sample_loss.sum()

    params = [p.detach().clone() for p in wt.parameters()]
    inputs = [x] + [p.requires_grad_(True) for p in params]
    # gradcheck needs a pure function: rebuild with functional_call.
    names = [n for n, _ in wt.named_parameters()]

    def pure(x, *ps):
        return torch.func.functional_call(wt, dict(zip(names, ps)), (x, h)).per_sample_loss

    assert torch.autograd.gradcheck(pure, inputs, eps=1e-6, atol=1e-5)


def test_closed_form_is_d_over_two_l():
    x = losses()
    out = W.build("closed_form", CHANNELS, d=2.0)(x)
    torch.testing.assert_close(out.betas[:, 1:], 2.0 / (2 * x[:, 1:]))
    per_channel = W.build("closed_form", CHANNELS, per="channel")(x)
    torch.testing.assert_close(per_channel.betas[:, 1:], (1 / (2 * x[:, 1:].mean(0))).expand(6, 2))


def test_closed_form_passes_gradient_only_through_the_energy():
    x = losses().requires_grad_(True)
    out = W.build("closed_form", CHANNELS)(x)
    (grad,) = torch.autograd.grad(out.per_sample_loss.sum(), x)
    torch.testing.assert_close(grad[:, 1:], 1 / (2 * x.detach()[:, 1:]))
    assert grad[:, 0].eq(1).all()


@pytest.mark.parametrize("opts", [{}, {"parameterization": "softplus"}, {"bounds": (1e-3, 1e3)}])
def test_learned_task_beta_converges_to_closed_form(opts):
    energy = torch.tensor([[0.0, 0.2, 5.0]]).expand(8, 3)
    wt = W.build("task", CHANNELS, d={"fkl": 1.0, "feat": 4.0}, **opts)
    opt = torch.optim.Adam(wt.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        wt(energy).per_sample_loss.mean().backward()
        opt.step()
    beta = wt(energy).betas[0, 1:]
    torch.testing.assert_close(
        beta, torch.tensor([1 / (2 * 0.2), 4 / (2 * 5.0)]), rtol=0.01, atol=0
    )


def test_instance_betas_track_per_sample_energy():
    """Samples whose energy is 10x larger get ~10x smaller betas (optimum d / 2l)."""
    torch.manual_seed(0)
    big = torch.arange(16) % 2 == 0
    energy = torch.where(big, 2.0, 0.2)
    x = torch.stack([torch.ones(16), energy], dim=1)
    h = torch.stack([big.float(), (~big).float()], dim=1)
    wt = W.build("instance", ["ce", "fkl"], input_dim=2, hidden=16)
    opt = torch.optim.Adam(wt.parameters(), lr=0.02)
    for _ in range(1500):
        opt.zero_grad()
        wt(x, h).per_sample_loss.mean().backward()
        opt.step()
    beta = wt(x, h).betas[:, 1]
    ratio = beta[~big].mean() / beta[big].mean()
    assert 8.0 <= float(ratio) <= 12.0
    torch.testing.assert_close(beta[big], torch.full((8,), 0.25), rtol=0.05, atol=0)


def test_instance_detaches_the_representation_by_default():
    h = torch.randn(6, 4, requires_grad=True)
    wt = W.build("instance", CHANNELS, input_dim=4)
    wt(losses(dtype=torch.float32), h).per_sample_loss.sum().backward()
    assert h.grad is None
    wt = W.build("instance", CHANNELS, input_dim=4, detach_representation=False)
    for p in wt.parameters():
        p.data.add_(0.1)
    wt(losses(dtype=torch.float32), h).per_sample_loss.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_instance_requires_a_representation_of_the_right_shape():
    wt = W.build("instance", CHANNELS, input_dim=4)
    with pytest.raises(ValueError, match="needs a representation"):
        wt(losses())
    with pytest.raises(ValueError, match=r"shape \[6, 4\]"):
        wt(losses(), torch.randn(6, 3))


def test_reference_task_matches_authors_formula():
    x = losses(dtype=torch.float32)
    wt = W.build("reference", CHANNELS, level="task")
    s = torch.tensor([-7.0, 0.3, 2.0])  # -7 sits in the clamp's dead zone
    with torch.no_grad():
        wt.s.copy_(s)
    total = wt(x).per_sample_loss.mean()
    batch_mean = x.mean(0)
    want = sum(
        0.5 * (math.exp(-max(-5.0, min(5.0, float(s[k])))) * batch_mean[k] + s[k]) for k in range(3)
    )
    torch.testing.assert_close(total, torch.as_tensor(want, dtype=torch.float32))


def test_reference_instance_matches_authors_formula():
    torch.manual_seed(0)
    x = losses(dtype=torch.float32)
    h = torch.randn(6, 4)
    wt = W.build("reference", CHANNELS, level="instance", input_dim=4)
    total = wt(x, h).per_sample_loss.mean()
    s = wt.net(h)
    beta = torch.exp(-s.clamp(-5, 5))
    want = (beta * x.mean(0, keepdim=True) + s).sum(1).mean()
    torch.testing.assert_close(total, want)


def test_half_precision_losses_are_weighted_in_float32():
    x = losses(dtype=torch.bfloat16)
    out = W.build("task", CHANNELS)(x)
    assert out.per_sample_loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = W.build("instance", CHANNELS, input_dim=4)(x, torch.randn(6, 4))
    assert out.per_sample_loss.dtype == torch.float32


def test_unknown_weighting_and_option():
    with pytest.raises(KeyError, match="unknown weighting 'betakd'.*closed_form"):
        W.build("betakd", CHANNELS)
    with pytest.raises(TypeError, match=r"weighting 'task'.*init_bta.*its options: .*init_beta"):
        W.build("task", CHANNELS, init_bta=1.0)
    with pytest.raises(ValueError, match="unknown channel"):
        W.build("task", CHANNELS, d={"kl": 2.0})


# ----------------------------------------------------------------------------- options models


# The constructors' keyword arguments and defaults before the options became typed models
# (kinds.py), written out: the models must accept the same keys with the same defaults.
REQUIRED = object()
BETA_KD = {
    "weight_ce": False,
    "d": 1.0,
    "prior_shape": 1.0,
    "prior_rate": 0.0,
    "prior_rate_scale": None,
    "trust": None,
    "reliability": None,
    "channel_teachers": None,
    "scale_momentum": None,
}
LEARNED = {"parameterization": "exp", "bounds": None, "init_beta": 1.0}
OLD_DEFAULTS = {
    "equal": {},
    "fixed": {"weights": REQUIRED, "scale_relative": False, "trust": None, "reliability": None,
              "channel_teachers": None, "scale_momentum": None},
    "task": {**BETA_KD, **LEARNED},
    "instance": {**BETA_KD, **LEARNED, "input_dim": None, "hidden": 128,
                 "detach_representation": True, "normalize_input": False},
    "closed_form": {**BETA_KD, "per": "sample", "min_energy": 1e-6},
    "reference": {"level": "task", "input_dim": None, "hidden": 128},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OLD_DEFAULTS))
def test_typed_defaults_equal_the_old_defaults(name):
    fields = W.options_model(name).model_fields
    assert set(fields) == set(OLD_DEFAULTS[name]) == set(W.options_of(name))
    for key, old in OLD_DEFAULTS[name].items():
        if old is REQUIRED:
            assert fields[key].is_required(), (name, key)
            continue
        assert fields[key].default == old and type(fields[key].default) is type(old), (name, key)


def test_trust_defaults_are_the_shared_trusts():
    import dataclasses

    fields = W.TrustOptions.model_fields
    for f in dataclasses.fields(W.SharedTrust):
        assert fields[f.name].default == f.default, f.name
    assert W.TrustOptions(reference="data").build() == W.SharedTrust(reference="data")


def test_prior_and_trust_are_declared_once_and_shared():
    """The Beta-KD kinds inherit the prior's keys; every kind with a trust shares one model."""
    for name in ("task", "instance", "closed_form"):
        assert issubclass(W.options_model(name), W.PriorOptions)
    for name in ("fixed", "task", "instance", "closed_form"):
        model = W.options_model(name)
        assert issubclass(model, W.RobustOptions)
        assert model.model_fields["trust"].annotation == (W.TrustOptions | None)
    assert not issubclass(W.options_model("fixed"), W.PriorOptions)
    assert W.options_of("equal") == [] and W.options_of("reference")[0] == "level"


def test_plain_and_typed_options_build_the_same_weighting():
    plain = {"prior_rate_scale": 0.5, "trust": {"channels": "fkl", "kind": "gamma", "rho": 2}}
    typed = {
        "prior_rate_scale": 0.5,
        "trust": W.TrustOptions(channels=["fkl"], kind="gamma", rho=2.0),
    }
    a, b = W.build("task", CHANNELS, **plain), W.build("task", CHANNELS, **typed)
    assert a.trust == b.trust == W.SharedTrust(("fkl",), kind="gamma", rho=2.0)
    assert a.prior == b.prior == W.GammaPrior(1.0, 0.0, 0.5)
    c = W.build("task", CHANNELS, **W.parse_options("task", plain).given())
    for wt in (a, b, c):
        wt.set_energy_scale(torch.tensor([0.5, 0.2]))
    x = losses(dtype=torch.float32)
    for wt in (b, c):
        assert a.state_dict().keys() == wt.state_dict().keys()
        torch.testing.assert_close(wt(x).per_sample_loss, a(x).per_sample_loss, rtol=0, atol=0)


def test_a_shared_trust_object_is_still_accepted():
    trust = W.SharedTrust(("fkl",), kind="superloss", lam=0.5)
    assert W.build("task", CHANNELS, trust=trust).trust == trust


def test_option_errors_name_the_key_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        W.build("task", CHANNELS, trust={"channels": ["fkl"], "rho": -1.0})
    assert str(err.value).startswith("weighting 'task': trust.rho: ")
    with pytest.raises(ValueError) as err:
        W.build("closed_form", CHANNELS, trust={"reference": "data", "kernel": 1})
    assert str(err.value) == (
        "weighting 'closed_form': trust: unknown keys ['kernel']; expected some of "
        "['channels', 'kind', 'lam', 'reference', 'rho', 'threshold']"
    )
    with pytest.raises(TypeError) as err:
        W.build("reference", CHANNELS, levle="task")
    assert str(err.value) == (
        "weighting 'reference': unknown option(s) ['levle']; its options: level, input_dim, hidden"
    )
    with pytest.raises(TypeError, match="weighting 'fixed': weights: missing"):
        W.build("fixed", CHANNELS)
    with pytest.raises(TypeError, match="needs input_dim"):
        W.build("instance", CHANNELS)
    with pytest.raises(ValueError, match="per: Input should be 'sample' or 'channel'"):
        W.build("closed_form", CHANNELS, per="batch")


def test_options_read_back_as_given():
    options = W.parse_options("task", {"prior_shape": 2, "trust": {"reference": "data"}})
    assert options.trust.reference == "data" and options.prior_rate == 0.0
    assert options.prior_shape == 2.0 and isinstance(options.trust, W.TrustOptions)
    assert set(options.given()) == {"prior_shape", "trust"}
    assert options.replace(init_beta=2.0).given().keys() == {"prior_shape", "trust", "init_beta"}
