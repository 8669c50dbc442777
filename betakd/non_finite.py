"""What a step with a NaN or infinite loss does: stop the run, naming the step and the
samples, or skip the step and count it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN or infinite loss and the policy is to stop."""


class NonFiniteLosses:
    def __init__(self, action: str = "stop") -> None:
        if action not in ACTIONS:
            raise ValueError(f"non_finite action must be one of {ACTIONS}, got {action!r}")
        self.action = action
        self.skipped = 0

    def handle(
        self, loss: Tensor, step: int, sample_ids: Sequence, parameters: Iterable[nn.Parameter]
    ) -> Tensor:
        """``loss`` unchanged when finite. Otherwise raise, or (skip) return a zero that
        still reaches every trainable one of ``parameters``, so optimizers and DDP see a
        complete, all-zero gradient."""
        if torch.isfinite(loss):
            return loss
        where = f"step {step}, samples {list(sample_ids)}"
        if self.action == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss)}) at {where}; set non_finite.action: skip "
                "to skip such steps instead"
            )
        self.skipped += 1
        logger.warning("skipping non-finite loss at %s (%d skipped)", where, self.skipped)
        params = [p for p in parameters if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=loss.device))
