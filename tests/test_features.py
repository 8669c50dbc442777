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
