"""The teacher reliability inside `betakd train`: fitted on the training data before the
first step, from what the weighting sees per sample, saved with the head, never refitted
on resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from kd_configs import StopAfter, assert_same_final_state, kd_config
from transformers import TrainerCallback

from betakd.build import build_trainer, training_arguments
from betakd.reliability import TeacherReliability
from betakd.runs import run_training

OPTIONS = {"hidden": 4, "prior_shape": 3.0, "prior_rate_scale": 0.5,
           "reliability": {}}  # fmt: skip


def reliable_config(llava_pair, vqa_data, out: Path, **training):
    data, images = vqa_data
    return kd_config(llava_pair, data, images, out, "instance", OPTIONS, **training)


def test_the_fit_reads_every_training_sample_whatever_the_batch_size(
    llava_pair, vqa_data, tmp_path
):
    fitted = []
    for batch in (2, 4):
        config = reliable_config(
            llava_pair, vqa_data, tmp_path / f"b{batch}", per_device_train_batch_size=batch
        )
        trainer = build_trainer(config, training_arguments(config))
        trainer.calibration.fit_reliability()
        fitted.append(trainer.head.objective.weighting.reliability.state_dict())
    for key, value in fitted[0].items():
        torch.testing.assert_close(fitted[1][key], value, rtol=1e-6, atol=1e-8, msg=key)
    # Direct: every sample's teacher NLL and h(x) in one batch, fitted by hand.
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        inputs = trainer.loss_inputs(trainer.data_collator(rows))
        nll, representation = trainer.distillation_module.reliability_inputs(*inputs)
    direct = TeacherReliability(representation.shape[1])
    direct.fit(nll, representation)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(fitted[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_training_fits_it_first_and_a_resumed_run_keeps_it(llava_pair, vqa_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="betakd.calibration")
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 5}
    fresh = FittedAtStart()
    straight = run_training(
        reliable_config(llava_pair, vqa_data, tmp_path / "a", **extra), callbacks=[fresh]
    )
    # Fitted before any other callback's on_train_begin can run the loss.
    assert fresh.fitted == [True]
    assert fits(caplog) == 1
    logged = [h for h in straight.log_history if "ce/beta_mean" in h]
    # The CE's weight is the posterior that the label is right: at most 1.
    assert logged and all(0 < h["ce/beta_mean"] <= 1 for h in logged)

    broken = reliable_config(llava_pair, vqa_data, tmp_path / "b", **extra)
    with pytest.raises(KeyboardInterrupt):
        run_training(broken, callbacks=[StopAfter(3)])
    assert fits(caplog) == 2
    run_training(broken, resume=True)
    # The checkpoint brought the fitted reliability: nothing was refitted.
    assert fits(caplog) == 2
    assert_same_final_state(tmp_path / "a", tmp_path / "b")


def fits(caplog) -> int:
    return sum("teacher reliability from" in r.getMessage() for r in caplog.records)


class FittedAtStart(TrainerCallback):
    """Whether the reliability was fitted when this callback's on_train_begin ran."""

    def __init__(self):
        self.fitted = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.fitted.append(model.head.objective.weighting.reliability.fitted)


def test_the_start_report_reads_the_fits_measurements(llava_pair, vqa_data, tmp_path, caplog, monkeypatch):  # fmt: skip
    """One teacher pass before the first step: the teacher-weight report reads what the
    reliability was fitted on (the models have not changed in between)."""
    from betakd.calibration import HeadCalibration

    caplog.set_level(logging.INFO, logger="betakd.calibration")
    passes = []
    real = HeadCalibration.measure_teacher
    monkeypatch.setattr(
        HeadCalibration, "measure_teacher", lambda self, *a: passes.append(a) or real(self, *a)
    )
    run_training(reliable_config(llava_pair, vqa_data, tmp_path / "a", max_steps=1))
    assert len(passes) == 1
    assert fits(caplog) == 1 and "teacher weights at the start, on 6 samples" in caplog.text
