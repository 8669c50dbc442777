"""StepMetrics: the logged values are the means of what was added since the last log."""

import pytest
import torch

from betakd.step_metrics import StepMetrics


def test_means_per_key_group_and_policy_then_a_fresh_window():
    metrics = StepMetrics(["ce", "kd"])
    metrics.add({"loss": 9.0, "kd/energy": 1.0})
    metrics.add({"loss": 7.0, "kd/energy": 3.0})
    energies = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    betas = torch.tensor([[1.0, 0.5], [1.0, 1.5], [1.0, 9.0]])
    valid = torch.tensor([True, True, False])
    metrics.add_groups(energies, betas, valid, ["a", "a", "a"])
    metrics.add_policy(torch.tensor([True, False, True]), torch.tensor([3, 5]), torch.tensor([True, False]))  # fmt: skip
    logs = metrics.means()
    assert "loss" not in logs and logs["kd/energy"] == 2.0
    # Group means over the valid rows only (row 2 is not valid).
    assert logs["group/a/kd/energy"] == 3.0
    assert logs["group/a/kd/beta_mean"] == 1.0
    assert logs["group/a/kd/weighted"] == pytest.approx((0.5 * 2 + 1.5 * 4) / 2)
    assert logs["on_policy/share"] == pytest.approx(2 / 3)
    assert logs["on_policy/mean_generated_tokens"] == 4.0
    assert logs["on_policy/ended_share"] == 0.5
    assert metrics.drain() == logs
    assert not metrics and metrics.means() == {}
