"""The demo's per-slice gradient diagnostics (`betakd demo --diagnose`)."""

from __future__ import annotations

from kd_configs import kd_config

from betakd.demo.diagnostics import SliceGradients
from betakd.runs import run_training


def test_slice_gradients_measure_from_the_first_step_of_a_calibrated_weighting(
    llava_pair, vqa_data, tmp_path
):
    """The callback runs the loss in on_train_begin: the head's reliability and energy
    scales are ready by then (it once failed there, for every calibrated weighting)."""
    data, images = vqa_data
    options = {"hidden": 4, "prior_shape": 3.0, "prior_rate_scale": 0.5, "reliability": {}}
    config = kd_config(llava_pair, data, images, tmp_path / "out", "instance", options)
    probe = SliceGradients({"even": [0, 2], "odd": [1, 3]}, every=2)
    run_training(config, callbacks=[probe])
    assert [h["step"] for h in probe.history] == [0, 2, 4]
    first = probe.history[0]
    for group in ("even", "odd"):
        for channel in ("ce", "cosine_probs", "visual"):
            assert first[f"{group}/{channel}/grad_norm"] > 0
