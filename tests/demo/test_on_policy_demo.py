"""``betakd demo --scenario on-policy``: sentence answers, its runs, its scoring, its report."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from betakd.cli import main
from betakd.demo.config import load_demo_config
from betakd.demo.easyvqa_data import (
    LARGE_FROM,
    PALETTE,
    DemoDataConfig,
    build_demo_data,
    pixel_layout,
    read_jsonl,
)
from betakd.demo.on_policy import accuracy, policy_block, scenario_config, scenario_runs


def drawn(path, box, colour="blue"):
    """A 64x64 easy-VQA-like image (off-white background) with a filled box."""
    rgb = np.full((64, 64, 3), 240, dtype=np.uint8)
    (x0, y0), (x1, y1) = box
    rgb[y0:y1, x0:x1] = PALETTE[colour]
    Image.fromarray(rgb).save(path)
    return path


def test_size_and_side_are_read_from_the_pixels(tmp_path):
    cases = {
        ((2, 2), (2 + LARGE_FROM, 10)): ("large", "left"),
        ((2, 2), (1 + LARGE_FROM, 10)): ("small", "left"),
        ((40, 30), (50, 60)): ("large", "right"),
        ((50, 30), (60, 35)): ("small", "right"),
    }
    for i, (box, expected) in enumerate(cases.items()):
        assert pixel_layout(drawn(tmp_path / f"{i}.png", box)) == expected, box


def test_sentence_answers_describe_each_image_and_keep_the_splits_clean(tmp_path):
    pytest.importorskip("easy_vqa")
    config = DemoDataConfig(answer_format="sentence", noise_rate=0.0, blind_value=None,
                            max_train=300, max_test=100)  # fmt: skip
    assert config.key() != DemoDataConfig(noise_rate=0.0, blind_value=None).key()
    built = build_demo_data(tmp_path, config)
    records = read_jsonl(built.train_student)
    sizes = Counter()
    for record in records:
        meta = record["meta"]
        question, answer = (turn["value"] for turn in record["conversations"])
        assert answer == f"{meta['size']} {meta['colour']} shape on the {meta['side']}"
        assert question.endswith("Describe its size, colour and side.")
        assert (meta["size"], meta["side"]) == pixel_layout(built.image_folder / record["image"])
        assert not meta["noisy"]
        sizes[meta["size"]] += 1
    assert 0.3 < sizes["large"] / len(records) < 0.7  # the threshold is the median
    with pytest.raises(ValueError, match="one-word answers only"):
        DemoDataConfig(answer_format="sentence", noise_rate=0.2)


def test_runs_compare_the_modes_under_one_weighting():
    config = scenario_config(load_demo_config())
    assert config.data.answer_format == "sentence" and config.data.noise_rate == 0.0
    runs = scenario_runs(config)
    names = ["ce_only", "off_policy", "mixed", "on_policy", "on_policy_warm"]
    assert [r.name for r in runs] == names
    assert len({r.strategy.name for r in runs[1:]}) == 1
    assert runs[1].strategy.name == config.on_policy.strategy  # its documented weighting
    mixed = policy_block(config, runs[2])
    assert mixed["student_fraction"] == 0.5 and mixed["ce"] == "data"
    assert "student_fraction" not in policy_block(config, runs[3])
    assert policy_block(config, runs[4]) | {"start_step": 0} == policy_block(config, runs[3])
    assert policy_block(config, runs[4])["start_step"] == 125


def test_answers_are_scored_whole_and_per_word():
    tests = [
        {"id": str(i), "conversations": [{}, {"value": "large blue shape on the left"}],
         "meta": {"size": "large", "colour": "blue", "side": "left"}}
        for i in range(4)
    ]  # fmt: skip
    predictions = {
        "0": "Large blue shape on the left.",  # normalised like every VQA answer
        "1": "small blue shape on the left",
        "2": "large red shape on the right",
        "3": "large blue",
    }
    assert accuracy(predictions, tests) == {
        "all": 25.0, "size": 50.0, "colour": 50.0, "side": 50.0, "well_formed": 75.0,
    }  # fmt: skip


def test_quick_on_policy_scenario_writes_its_report(tmp_path, monkeypatch, demo_cache_dir):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "op"
    result = CliRunner().invoke(main, ["demo", "--scenario", "on-policy", "--quick",
                                       "--output", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"ce_only", "off_policy", "mixed", "on_policy", "on_policy_warm"}
    assert runs["on_policy"]["on_policy_share"] == 1.0
    assert runs["off_policy"]["on_policy_share"] is None
    assert 1 <= runs["on_policy"]["mean_generated_tokens"] <= 24
    report = (out / "report.md").read_text()
    assert "## On-policy and mixed against off-policy" in report and "Quick smoke run" in report
    assert (out / "accuracy.png").stat().st_size > 1000
