"""The head's calibration units against direct computations."""

import torch

from betakd import weighting
from betakd.calibration import RunningEnergyScale
from betakd.labels import IGNORE_INDEX
from betakd.objective import DistillationObjective, items_in_batch


def objective_with_momentum(momentum: float) -> DistillationObjective:
    built = weighting.build("task", ["ce", "kl", "mse"], scale_momentum=momentum)
    return DistillationObjective(built)


def test_the_running_scale_folds_each_steps_mean_over_its_micro_batches():
    objective = objective_with_momentum(0.9)
    scale = objective.weighting
    scale.set_energy_scale(torch.tensor([2.0, 4.0]))
    running = RunningEnergyScale(objective)
    first = torch.tensor([[9.0, 1.0, 3.0], [9.0, 3.0, 5.0], [9.0, 100.0, 100.0]])
    second = torch.tensor([[9.0, 5.0, 7.0]])
    running.add(first, torch.tensor([True, True, False]))  # the last row has no answer
    running.add(second, torch.tensor([True]))
    # Nothing changes before the optimizer step.
    torch.testing.assert_close(scale.energy_scale, torch.tensor([2.0, 4.0]))
    running.commit()
    step_mean = torch.tensor([(1.0 + 3.0 + 5.0) / 3, (3.0 + 5.0 + 7.0) / 3])
    expected = 0.9 * torch.tensor([2.0, 4.0]) + 0.1 * step_mean
    torch.testing.assert_close(scale.energy_scale, expected)
    running.commit()  # a step without micro-batches leaves the scale alone
    torch.testing.assert_close(scale.energy_scale, expected)


def test_the_running_scale_sums_over_processes_before_dividing():
    objective = objective_with_momentum(0.5)
    objective.weighting.set_energy_scale(torch.tensor([1.0, 1.0]))
    # Another process saw one sample with energies (7, 9): the sum reaches both.
    other = {"sums": torch.tensor([7.0, 9.0]), "count": torch.tensor(1.0)}
    seen = []

    def reduce_sum(t):
        seen.append(t.clone())
        return t + (other["sums"] if t.dim() else other["count"])

    running = RunningEnergyScale(objective, reduce_sum)
    running.add(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([True]))
    running.commit()
    torch.testing.assert_close(
        objective.weighting.energy_scale, 0.5 * torch.ones(2) + 0.5 * torch.tensor([4.0, 6.0])
    )
    assert len(seen) == 2


def test_without_momentum_nothing_is_accumulated():
    objective = DistillationObjective(weighting.build("task", ["ce", "kl"]))
    running = RunningEnergyScale(objective)
    running.add(torch.ones(2, 2), torch.ones(2, dtype=torch.bool))
    running.commit()
    assert not objective.weighting.needs_energy_scale


def test_items_in_batch_counts_samples_or_answer_tokens():
    ignore = IGNORE_INDEX
    a = torch.tensor([[5, 6, 7, ignore], [5, ignore, ignore, ignore]])  # 2 tokens after shift, 0
    b = torch.tensor([[ignore, 4, ignore, 8]])  # 2 tokens
    assert int(items_in_batch([a, b], "sample")) == 2
    assert int(items_in_batch([a, b], "token")) == 4
