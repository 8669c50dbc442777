"""A learning-rate schedule that restarts at a step: extending a finished run.

`transformers` builds one schedule over `max_steps`. A resumed run with a larger
`max_steps` follows the schedule planned for the new length from the step it resumes
at, so a finished linear decay jumps from about zero back up (to 45% of the peak at
step 11 of 20). `schedule.restart_at: N` instead runs the configured schedule (warmup
and decay, any `lr_scheduler_type` built on `LambdaLR`) afresh over steps N+1 ..
max_steps: what one wants when adding steps to a finished run. Either way, the first
step after resuming uses the new schedule's rate (`transformers` would use the
checkpoint's last one for that step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler


def restarted_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    restart_at: int,
    total_steps: int,
    warmup_steps: Callable[[int], int],
    kwargs: dict[str, Any] | None = None,
) -> LambdaLR:
    """The ``name`` schedule over ``total_steps - restart_at`` steps, starting after
    step ``restart_at``; before it, the schedule's first value. ``warmup_steps(n)``
    gives the warmup of an n-step schedule (``TrainingArguments.get_warmup_steps``)."""
    remaining = total_steps - restart_at
    if remaining < 1:
        raise ValueError(
            f"schedule.restart_at={restart_at} leaves no step before max_steps={total_steps}"
        )
    inner = get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(remaining),
        num_training_steps=remaining,
        scheduler_specific_kwargs=kwargs or {},
    )
    if not isinstance(inner, LambdaLR):
        raise ValueError(
            f"schedule.restart_at needs a schedule given by a function of the step; "
            f"lr_scheduler_type {name!r} is not one"
        )
    # Closures, not objects: LambdaLR's state_dict then leaves them out, so a resumed run
    # takes this run's restart_at, not a checkpoint's.
    shifted = [_shifted(fn, restart_at) for fn in inner.lr_lambdas]
    for group, initial in zip(optimizer.param_groups, inner.base_lrs):
        group["lr"] = initial
    return LambdaLR(optimizer, shifted)


def _shifted(fn: Callable[[int], float], start: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return fn(max(step - start, 0))

    return factor


def apply_current_lr(scheduler: object) -> None:
    """Set each parameter group's learning rate to the schedule's value at its current
    step (schedules given by a function of the step; others are left alone). A resumed
    run loads the optimizer's last learning rate, which belongs to the old schedule when
    the run's length changed or its schedule restarts; its first step must use the new
    one. For an unchanged schedule the value is the one loaded."""
    if not isinstance(scheduler, LambdaLR):
        return
    # One step back and forward: step() recomputes every group's rate at the same step,
    # and the rate it reports (what the logs show). torch warns about a step() before the
    # optimizer's first step(), which matters only for the schedule's first value, and
    # that is the value this recomputes.
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
