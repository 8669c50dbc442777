"""Per-slice training diagnostics for the demo: what each channel does to each group.

Every ``every`` optimizer steps, :class:`SliceGradients` runs a fixed probe of training
samples per group (e.g. the teacher's blind slice, noisy labels, the rest) through the
trained module and records, per group and channel, the mean energy, the mean beta and
the norm of the gradient that the channel's weighted term sends into the student's
parameters. This is what tells whether a channel pulls the student into the teacher's
blind spot (docs/weighting.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from betakd.callbacks import TrainerAwareCallback


class SliceGradients(TrainerAwareCallback):
    """``probes`` maps a group name to rows of the training data set."""

    def __init__(self, probes: Mapping[str, Sequence[int]], every: int = 25) -> None:
        self.probes = {group: list(rows) for group, rows in probes.items() if rows}
        self.every = every
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None and (state.global_step % self.every == 0):
            self.history.append({"step": state.global_step, **self.measure()})

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None and state.global_step == 0:
            self.history.append({"step": 0, **self.measure()})

    def measure(self) -> dict:
        trainer = self.trainer
        module = trainer.accelerator.unwrap_model(trainer.model)
        params = [p for p in module.student.parameters() if p.requires_grad]
        channels = module.head.objective.channels
        result = {}
        for group, rows in self.probes.items():
            batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
            out = trainer.model(*trainer.loss_inputs(batch))
            valid = out.valid
            for k, channel in enumerate(channels):
                term = out.terms[valid, k].mean()
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                result[f"{group}/{channel}/grad_norm"] = float(norm)
                result[f"{group}/{channel}/energy"] = float(out.energies[valid, k].mean())
                result[f"{group}/{channel}/beta"] = float(out.betas[valid, k].mean())
        return result
