"""`betakd demo --scenario two-teachers`: the runs it builds, its slices, and a quick run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from betakd.cli import main
from betakd.demo.config import load_demo_config
from betakd.demo.two_teachers import accuracy, scenario_runs, second_teacher_config, slice_of


def test_the_runs_compare_one_teacher_both_with_fixed_weights_and_beta_kd():
    config = load_demo_config()
    runs = {r.name: r for r in scenario_runs(config)}
    sweep = [f"fixed_x{w:g}" for w in config.two_teachers.fixed_sweep]
    assert list(runs) == [
        "ce_only", "a_only", "b_only", *sweep, "fixed_reliability", "task", "instance"
    ]  # fmt: skip
    ablation = runs["fixed_reliability"].weighting["options"]
    assert ablation["reliability"] == {} and ablation["scale_relative"]
    assert runs["ce_only"].teachers == () and runs["a_only"].teachers == ("a",)
    assert runs["instance"].teachers == ("a", "b")
    assert runs["instance"].weighting["representation_from"] == ["a"]
    # Equal weights per teacher channel, named after the teachers.
    weights = runs[sweep[0]].weighting["options"]["weights"]
    logit = config.channels.logit_name
    assert weights == {f"a/{logit}": 0.3, f"b/{logit}": 0.3}


def test_slices_and_accuracy_follow_each_teachers_blind_colour():
    def record(i, colour, noisy=False, answer="yes"):
        return {
            "id": f"q{i}",
            "meta": {"colour": colour, "noisy": noisy},
            "conversations": [{"value": "?"}, {"value": answer}],
        }

    blind = {"a": "blue", "b": "green"}
    records = [
        record(0, "blue"),
        record(1, "green"),
        record(2, "red", noisy=True),
        record(3, "red"),
        record(4, "teal"),
    ]
    assert [slice_of(r, blind) for r in records] == [
        "blind_a",
        "blind_b",
        "noisy",
        "clean",
        "clean",
    ]
    predictions = {"q0": "no", "q1": "yes", "q2": "yes", "q3": "no", "q4": "yes"}
    assert accuracy(predictions, records, blind) == {
        "all": 60.0,
        "blind_a": 0.0,
        "blind_b": 100.0,
        "rest": pytest.approx(200 / 3, abs=0.01),
    }


def test_the_second_teacher_must_be_blind_elsewhere():
    config = load_demo_config()
    assert second_teacher_config(config).data.blind_value == "green"
    same = replace(config, two_teachers=replace(config.two_teachers, second_blind_value="blue"))
    with pytest.raises(ValueError, match="must differ from data.blind_value"):
        second_teacher_config(same)


def test_quick_two_teacher_scenario_writes_its_report(tmp_path, monkeypatch, demo_cache_dir):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "two"
    result = CliRunner().invoke(
        main, ["demo", "--scenario", "two-teachers", "--quick", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {r["run"] for r in results["runs"]} == {
        r.name for r in scenario_runs(load_demo_config())
    }
    instance = next(r for r in results["runs"] if r["run"] == "instance")
    logit = load_demo_config().channels.logit_name
    assert set(instance["separation"]) == {f"a/{logit}", f"b/{logit}"}
    assert set(instance["slice_history"][f"a/{logit}"]) == {"blind_a", "blind_b", "noisy", "clean"}
    # Even 40-step teachers explain their own blind slice's answers worse than the rest:
    # each teacher's channel gets the lower betas there.
    means = instance["separation"][f"a/{logit}"]["mean"]
    assert means["blind_a"] < means["blind_b"], means
    means = instance["separation"][f"b/{logit}"]["mean"]
    assert means["blind_b"] < means["blind_a"], means
    report = (out / "report.md").read_text()
    assert "## Design check" in report and "Quick smoke run" in report
    assert "- both, fixed x1: blind slice of a (blue) vs teacher b alone: " in report
    instance = report.split("## The instance student")[1].split("##")[0]
    assert "vs the best single-teacher student" in instance and "ROC AUC" in instance
    assert (out / "accuracy.png").stat().st_size > 1000
    # The two-teacher audit of the student's data: each teacher scored, linked.
    audit = results["audit"]
    assert set(audit["teachers"]) == {"a", "b"} and "disagreement" in audit
    assert "## Audit of the training data" in report and (out / "audit" / "report.md").is_file()
    usage = CliRunner().invoke(
        main, ["demo", "--scenario", "two-teachers", "--strategies", "task", "--output", str(out)]
    )
    assert usage.exit_code != 0 and "apply to the default scenario" in usage.output
