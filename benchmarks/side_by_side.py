"""Two or more training configs measured side by side: alternating steps on the same
batches for time (a busy machine slows every variant alike), and one variant per fresh
process for memory (``common.run_worker``).

One step = collation of every model's batch from the raw conversations, the teachers'
forward passes, ``BetaKDTrainer.compute_loss``, backward and the optimizer step
(``teacher_cache.step``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

from teacher_cache import step

from betakd.profiling import peak_rss_bytes, peak_tensor_bytes


def batches(trainer, batch_size: int, count: int) -> list[list]:
    """``count`` batches of raw conversations, cycling through the data set."""
    dataset = trainer.train_dataset
    return [
        [dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]
        for i in range(count)
    ]


def stepper(trainer) -> Callable[[list], float]:
    """One training step of ``trainer`` on a batch of conversations -> its seconds."""
    optimizer = trainer.create_optimizer()
    return lambda conversations: step(trainer, optimizer, trainer.data_collator, conversations)


def alternating_times(
    trainers: Mapping[str, object], work: list[list], warmup: int
) -> dict[str, list[float]]:
    """Each batch stepped by every trainer in turn; the seconds of the steps after
    ``warmup``, per variant."""
    steps = {name: stepper(trainer) for name, trainer in trainers.items()}
    result: dict[str, list[float]] = {name: [] for name in trainers}
    for i, conversations in enumerate(work):
        for name, run in steps.items():
            seconds = run(conversations)
            if i >= warmup:
                result[name].append(seconds)
    return result


def medians(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def step_memory(trainer, work: list[list]) -> dict:
    """This process's peak RSS after stepping through ``work``, and the peak of live
    tensor bytes during the last step above those live before it."""
    run = stepper(trainer)
    for conversations in work[:-1]:
        run(conversations)
    live = peak_tensor_bytes(lambda: run(work[-1]))
    return {"rss_bytes": peak_rss_bytes(), "step_live_bytes": live}
