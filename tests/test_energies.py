"""Energies against independent float64 NumPy computations, and their invariants."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from betakd import energies

DIVERGENCES = [n for n in energies.names() if energies.is_divergence(n)]
PROB_ENERGIES = [n for n in energies.names() if "temperature" in energies.options(n)]


# ----------------------------------------------------------------- independent references


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def np_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def np_standardize(z):
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean()) / z.std()


def np_cos_dist(a, b):
    return 1 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_akl(p_t, p_s, head=0.5):
    order = np.argsort(-p_t, kind="stable")
    cum = 0.0
    head_gap = tail_gap = 0.0
    for i in order:
        gap = abs(p_t[i] - p_s[i])
        if cum < head:
            head_gap += gap
        else:
            tail_gap += gap
        cum += p_t[i]
    w = head_gap / (head_gap + tail_gap)
    return w * np_kl(p_t, p_s) + (1 - w) * np_kl(p_s, p_t)


def reference(name, s, t, temperature=1.0):
    """Direct per-row computation of each energy from its textbook definition."""
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    if name == "fkl":
        return np_kl(p_t, p_s)
    if name == "rkl":
        return np_kl(p_s, p_t)
    if name == "jsd":
        m = 0.5 * p_t + 0.5 * p_s
        return 0.5 * np_kl(p_t, m) + 0.5 * np_kl(p_s, m)
    if name == "tvd":
        return 0.5 * np.abs(p_t - p_s).sum()
    if name == "skew_fkl":
        return np_kl(p_t, 0.1 * p_t + 0.9 * p_s)
    if name == "skew_rkl":
        return np_kl(p_s, 0.1 * p_s + 0.9 * p_t)
    if name == "akl":
        return np_akl(p_t, p_s)
    if name == "cosine_probs":
        return np_cos_dist(p_s, p_t)
    if name == "cosine_logits":
        return np_cos_dist(np_standardize(s), np_standardize(t))
    if name == "mse_probs":
        return float(((p_s - p_t) ** 2).mean())
    if name == "mse_logits":
        return float(((np_standardize(s) - np_standardize(t)) ** 2).mean())
    if name == "ce_teacher":
        return -float((p_t * np.log(p_s)).sum())
    raise AssertionError(name)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3


@pytest.mark.parametrize("name", energies.names())
def test_energy_matches_direct_computation(name, logits):
    s, t = logits
    got = energies.get(name)(s, t)
    want = [reference(name, s[i].numpy(), t[i].numpy()) for i in range(len(s))]
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PROB_ENERGIES)
def test_temperature_is_applied(name, logits):
    s, t = logits
    got = energies.get(name, temperature=2.5)(s, t)
    want = [reference(name, s[i].numpy(), t[i].numpy(), 2.5) for i in range(len(s))]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_fkl_matches_torch_kl_div(logits):
    s, t = logits
    want = F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(energies.get("fkl", temperature=2.0)(s, t), want)


def test_generalised_jsd_mixture_weight(logits):
    s, t = logits
    p_s, p_t = F.softmax(s.double(), -1), F.softmax(t.double(), -1)
    b = 0.3
    m = b * p_t + (1 - b) * p_s
    want = b * (p_t * (p_t / m).log()).sum(-1) + (1 - b) * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(
        energies.get("jsd", beta=b)(s, t).double(), want, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_is_exactly_zero_at_equality(name, logits):
    _, t = logits
    assert torch.equal(energies.get(name)(t.clone(), t), torch.zeros(len(t)))


def test_ce_teacher_is_not_zero_at_equality(logits):
    _, t = logits
    entropy = -(F.softmax(t, -1) * F.log_softmax(t, -1)).sum(-1)
    torch.testing.assert_close(energies.get("ce_teacher")(t, t), entropy)
    assert not energies.is_divergence("ce_teacher")


@pytest.mark.parametrize("name", energies.names())
def test_half_precision_inputs_give_float32(name, logits):
    s, t = logits
    got = energies.get(name)(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32


def test_unknown_name_and_option_raise():
    with pytest.raises(KeyError, match="unknown energy 'kl'.*fkl"):
        energies.get("kl")
    with pytest.raises(TypeError, match="unknown option.*'temp'"):
        energies.get("fkl", temp=2.0)
    with pytest.raises(TypeError, match="cosine_logits.*temperature"):
        energies.get("cosine_logits", temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        energies.get("fkl", temperature=0.0)
    with pytest.raises(ValueError, match="mixture weight"):
        energies.get("jsd", beta=1.0)


# ----------------------------------------------------------------- properties

VOCAB = 8
row = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
    min_size=VOCAB,
    max_size=VOCAB,
)
masks = st.lists(st.booleans(), min_size=VOCAB, max_size=VOCAB).filter(lambda m: not all(m))


@pytest.mark.parametrize("name", DIVERGENCES)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(s=row, t=row, mask=masks)
def test_non_negative_and_finite_with_masked_vocabulary(name, s, t, mask):
    """Shared masked entries (``-inf`` in both models) must not produce NaN or inf."""
    masked = torch.tensor(mask)
    s = torch.tensor([s]).masked_fill(masked, float("-inf")).requires_grad_(True)
    t = torch.tensor([t]).masked_fill(masked, float("-inf")).requires_grad_(True)
    value = energies.get(name)(s, t)
    (grad_s, grad_t) = torch.autograd.grad(value.sum(), (s, t))
    assert torch.isfinite(value).all() and (value >= 0).all()
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("scale", [1e6, 1e30, 3e38])
def test_finite_with_huge_magnitudes(name, scale):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 9, generator=g) * scale).clamp(-3e38, 3e38).requires_grad_(True)
    t = (torch.randn(4, 9, generator=g) * scale).clamp(-3e38, 3e38)
    value = energies.get(name)(s, t)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert torch.isfinite(value).all() and (value >= 0).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "name", ["fkl", "rkl", "jsd", "skew_fkl", "tvd", "cosine_probs", "cosine_logits"]
)
def test_gradient_matches_finite_differences(name):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    s.requires_grad_(True)
    fn = energies.get(name)
    (grad,) = torch.autograd.grad(fn(s, t).sum(), s)
    eps = 1e-3
    numeric = torch.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            plus, minus = s.detach().clone(), s.detach().clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (fn(plus, t).sum() - fn(minus, t).sum()).double() / (2 * eps)
    torch.testing.assert_close(grad.double(), numeric, rtol=2e-2, atol=2e-4)


def test_cosine_logits_gradients_match_autograd_through_the_formula(logits):
    """Both inputs' gradients of the fused centring + cosine against autograd through
    1 - cos(s - mean s, t - mean t) in float64, with an upstream gradient per row."""
    s, t = (x.clone().requires_grad_(True) for x in logits)
    upstream = torch.linspace(0.5, 2.0, s.shape[0])
    got = torch.autograd.grad(energies.get("cosine_logits")(s, t), (s, t), upstream)
    s64, t64 = (x.detach().double().requires_grad_(True) for x in logits)
    centred = [x - x.mean(dim=-1, keepdim=True) for x in (s64, t64)]
    direct = 1 - F.cosine_similarity(*centred, dim=-1)
    want = torch.autograd.grad(direct, (s64, t64), upstream.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
