"""Feature energies and the adapter channel against direct computations."""

import pytest
import torch

from betakd import features


def test_feature_mse_and_cosine_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    mse = features.feature_mse(s, t, mask)
    cos = features.feature_cosine(s, t, mask)
    for i in range(2):
        rows = [j for j in range(3) if mask[i, j]]
        want_mse = sum(float(((s[i, j] - t[i, j]) ** 2).mean()) for j in rows) / len(rows)
        want_cos = sum(
            1 - float(torch.dot(s[i, j], t[i, j]) / (s[i, j].norm() * t[i, j].norm())) for j in rows
        ) / len(rows)
        assert float(mse[i]) == pytest.approx(want_mse, rel=1e-5)
        assert float(cos[i]) == pytest.approx(want_cos, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_zero_at_equality(name):
    x = torch.randn(2, 5, 3)
    assert torch.equal(features.get(name)(x, x.clone()), torch.zeros(2))


def test_channel_adapts_teacher_width_and_trains_only_the_adapter():
    channel = features.FeatureChannel(teacher_dim=8, student_dim=4, energy="cosine")
    student = torch.randn(3, 6, 4, requires_grad=True)
    teacher = torch.randn(3, 6, 8, requires_grad=True)
    out = channel(student, teacher)
    assert out.shape == (3,)
    out.sum().backward()
    assert teacher.grad is None and student.grad is not None
    assert channel.adapter.weight.grad is not None


def test_shape_mismatch_and_unknown_name():
    with pytest.raises(ValueError, match="differ in shape"):
        features.feature_mse(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(KeyError, match="unknown feature energy 'l1'"):
        features.get("l1")


def test_channel_adapter_sides_and_widths():
    student = torch.randn(3, 6, 4, requires_grad=True)
    teacher = torch.randn(3, 6, 8, requires_grad=True)
    for side, weight_shape in (("student", (8, 4)), ("teacher", (4, 8))):
        channel = features.FeatureChannel(8, 4, "mse", adapter=side)
        assert tuple(channel.adapter.weight.shape) == weight_shape
        channel(student, teacher).sum().backward()
        assert teacher.grad is None
    with pytest.raises(ValueError, match="adapter must be one of"):
        features.FeatureChannel(8, 4, adapter="both")


def test_student_side_adapter_matches_a_direct_computation():
    channel = features.FeatureChannel(8, 4, "mse", adapter="student", normalize=True)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 8)
    mapped = student @ channel.adapter.weight.T + channel.adapter.bias

    def standardize(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + 1e-5
        )

    want = (standardize(mapped) - standardize(teacher)).pow(2).mean(-1).mean(-1)
    torch.testing.assert_close(channel(student, teacher), want, rtol=1e-5, atol=1e-6)


def _fit_adapter(channel, student, teacher, steps=400):
    opt = torch.optim.Adam(channel.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        channel(student, teacher).mean().backward()
        opt.step()
    return float(channel(student, teacher).mean())


@pytest.mark.parametrize("normalize", [False, True])
def test_a_fixed_target_cannot_be_matched_by_the_adapter_alone(normalize):
    """A student whose visual tokens are all one constant carries nothing of the
    teacher's features. With the adapter on the student side (a fixed target) the
    energy stays at the variance of the teacher's features however the adapter trains;
    with the adapter on the teacher side (the reference code) the adapter alone drives
    the energy to ~0 by mapping every teacher token onto the student's constant."""
    torch.manual_seed(0)
    teacher = torch.randn(16, 9, 8) * 2 + 0.5
    student = torch.ones(16, 9, 4) * 0.3
    target = features.standardize(teacher) if normalize else teacher
    floor = float(target.var(dim=(0, 1), unbiased=False).mean())  # best constant predictor
    fixed = features.FeatureChannel(8, 4, "mse", adapter="student", normalize=normalize)
    assert _fit_adapter(fixed, student, teacher) >= 0.99 * floor
    moving = features.FeatureChannel(8, 4, "mse", adapter="teacher")
    assert _fit_adapter(moving, student, teacher) < 0.02 * floor
