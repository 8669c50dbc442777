"""``betakd demo --scenario cross-tokenizer``: its design, its gain arithmetic, a quick run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from betakd.cli import main
from betakd.demo.cross_tokenizer import kept_gain, other_tokenizer_config, scenario_runs
from betakd.demo.scenario import demo_config


def test_runs_pair_each_teacher_with_its_tokenizer_setting():
    config = demo_config(False, [])
    runs = {r.name: r for r in scenario_runs(config)}
    assert set(runs) == {"ce_only", "same_tokenizer", "cross_prefix", "cross_hybrid", "cross_uld"}
    assert runs["same_tokenizer"].teacher == "a" and runs["same_tokenizer"].cross_tokenizer is None
    assert runs["cross_uld"].teacher == "b" and runs["cross_uld"].cross_tokenizer == {"loss": "uld"}
    other = other_tokenizer_config(config)
    # Teacher b differs from teacher a in its tokenizer only, so it is cached apart.
    assert other.vocab_size == config.cross_tokenizer.teacher_vocab_size != config.vocab_size
    assert other.teacher == config.teacher and other.teacher_key() != config.teacher_key()


def test_kept_gain_is_the_share_of_the_reference_gain_per_seed():
    def record(run, seed, value):
        return {"run": run, "seed": seed, "accuracy": {"all": value}}

    results = {
        "runs": [
            record("ce_only", 0, 10.0), record("same_tokenizer", 0, 50.0), record("x", 0, 30.0),
            record("ce_only", 1, 20.0), record("same_tokenizer", 1, 40.0), record("x", 1, 35.0),
        ]
    }  # fmt: skip
    assert kept_gain(results, "x") == {"per_seed": [0.5, 0.75], "mean": 0.625, "worst": 0.5}


def test_quick_cross_tokenizer_scenario_writes_its_report(tmp_path, monkeypatch, demo_cache_dir):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "xt"
    result = CliRunner().invoke(
        main, ["demo", "--scenario", "cross-tokenizer", "--quick", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {r["run"] for r in results["runs"]} == {
        "ce_only", "same_tokenizer", "cross_prefix", "cross_hybrid", "cross_uld"
    }  # fmt: skip
    assert results["teachers"]["b"]["vocab_size"] == 360
    report = (out / "report.md").read_text()
    assert "## What teacher b keeps of teacher a's gain" in report
    assert (out / "accuracy.png").stat().st_size > 1000
