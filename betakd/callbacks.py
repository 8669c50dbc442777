"""The trainer's callbacks: the head's hooks around training and every step, and the
base of callbacks that need the trainer itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import TrainerCallback

from betakd.schedule import apply_current_lr

if TYPE_CHECKING:
    from betakd.trainer import BetaKDTrainer


class TrainerAwareCallback(TrainerCallback):
    """A callback that needs the trainer itself (set when the trainer is built), e.g.
    to run extra diagnostic forward passes through :meth:`BetaKDTrainer.loss_inputs`."""

    trainer: BetaKDTrainer | None = None


class HeadCallback(TrainerCallback):
    """Before the first step: fits the teacher reliability and measures the energy scales
    (unless a resumed or ``init_from`` head brought them). Before every optimizer step:
    the scheduled channel gains; after it: the running energy scales."""

    def __init__(self, trainer: BetaKDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.calibration.before_training(first_step=state.global_step == 0)
        # After a checkpoint's optimizer state (and its learning rate) loaded: a run
        # resumed with another length or a restarted schedule takes the new schedule's
        # rate from its first step on (unchanged when the schedule is the same).
        apply_current_lr(self.trainer.lr_scheduler)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.head.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.running_energy_scale.commit()
