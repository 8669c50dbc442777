"""``betakd demo --scenario feature-channel``: the default scenario plus a visual feature
channel on every KD strategy (defaults.yaml's ``feature_channel`` section).

A feature channel transfers the teacher's visual function, and with it the teacher's
blind spot (docs/weighting.md, section 2.5); this scenario measures what each weighting,
and an annealed channel, do about it. It runs through the default scenario's driver."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from betakd.demo.config import load_demo_config
from betakd.demo.run import run_demo


def run_feature_channel(
    output_dir: str | Path = "betakd-demo-feature-channel",
    *,
    quick: bool = False,
    seeds=None,
    overrides: Sequence[str] = (),
    jobs: int | None = None,
) -> dict:
    """The default scenario's runs with the section's feature channel and strategies
    (``--set`` overrides apply after it, so they can change the channel too)."""
    scenario = load_demo_config(overrides=overrides).feature_channel
    feature = f"channels.feature={json.dumps(dict(scenario.feature))}"
    return run_demo(
        output_dir,
        quick=quick,
        seeds=seeds if seeds is not None else scenario.seeds,
        strategies=list(scenario.run),
        overrides=[feature, *overrides],
        jobs=jobs,
    )
