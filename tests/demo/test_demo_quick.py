"""`betakd demo --quick` end to end: the README's first command, at smoke size."""

import json

from click.testing import CliRunner

from betakd.cli import main
from betakd.demo.config import load_demo_config
from betakd.demo.strategies import select


def test_quick_demo_writes_report_results_and_plots(tmp_path, monkeypatch, demo_cache_dir):
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--output", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    strategies = {r["strategy"] for r in results["runs"]}
    assert strategies == {s.name for s in select(load_demo_config(), None)}
    for run in results["runs"]:
        assert set(run["accuracy"]) >= {"all", "outside_blind", "blind", "colour"}
        assert all(0.0 <= v <= 100.0 for v in run["accuracy"].values())
    task = next(r for r in results["runs"] if r["strategy"] == "task")
    assert set(task["beta_history"]) == {"cosine_probs"}  # CE keeps beta 1
    assert set(task["slice_history"]["cosine_probs"]) == {"clean", "noisy", "blind"}
    # Even a 40-step teacher explains the labels of its blind slice worse than the rest:
    # the teacher reliability must give those samples lower betas, while the paper's
    # task-level betas cannot tell samples apart.
    for name in ("reliable_instance", "robust_instance"):
        run = next(r for r in results["runs"] if r["strategy"] == name)
        separation = run["separation"]["cosine_probs"]
        assert separation["auc_blind_lower"] >= 0.75, separation
        assert separation["mean"]["blind"] < 0.6 * separation["mean"]["clean"], separation
    assert task["separation"]["cosine_probs"]["auc_blind_lower"] == 0.5
    report = (out / "report.md").read_text()
    assert "## Best mean accuracy" in report and "Quick smoke run" in report
    # The recommended strategy against the best fixed weight: numbers, no pass/fail.
    assert "## The recommended strategy against the best fixed weight" in report
    assert "- On the blind slice, vs " in report and "points (mean " in report
    assert "**met**" not in report and "**missed**" not in report
    # The audit ran on the training data, without the ground-truth fields; it is linked.
    audit = results["audit"]
    assert audit["samples"] == 384 and (out / "audit" / "report.md").is_file()
    assert "## Audit of the training data" in report and "(audit/report.md)" in report
    audit_json = json.loads((out / "audit" / "audit.json").read_text())
    assert not any(f.startswith(("meta.noisy", "meta.blind", "meta.original")) for f in audit_json["teachers"]["teacher"]["slices"])  # fmt: skip
    assert audit["label_errors"]["planted"] > 0
    for plot in ("accuracy.png", "betas_by_slice.png"):
        assert (out / plot).stat().st_size > 1000


def test_bad_overrides_and_strategies_are_named_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main, ["demo", "--quick", "--strategies", "bogus", "--output", str(tmp_path)]
    )
    assert result.exit_code != 0 and "unknown strategy 'bogus'" in result.output
    result = runner.invoke(
        main, ["demo", "--quick", "--set", "data.noise_rate=2", "--output", str(tmp_path)]
    )
    assert result.exit_code != 0 and "noise_rate" in result.output
    result = runner.invoke(
        main, ["demo", "--quick", "--set", "student_training.stepz=3", "--output", str(tmp_path)]
    )
    assert result.exit_code != 0 and "stepz" in result.output


def test_a_failing_run_loses_no_other_run(tmp_path, monkeypatch, demo_cache_dir):
    """One strategy's run fails (its weighting option is invalid, which only `betakd
    train` checks, inside the run): the other runs are reported, the failure is named in
    one line, results.json and report.md list it, and the exit code says it."""
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--strategies", "ce_only,task", "--output", str(out)]
    args += ["--set", "strategies.task.weighting.options.bogus=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: 1 of 2 runs failed (task-seed0)") and "bogus" in last, last
    results = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == ["ce_only"]
    assert [f["run"] for f in results["failed"]] == ["task-seed0"]
    assert "## Failed runs (1" in (out / "report.md").read_text()


def test_a_demo_without_a_blind_slice_reports_every_run(tmp_path, monkeypatch, demo_cache_dir):
    """`--set data.blind_value=null`: no blind slice, so the report compares the whole
    test set (it crashed in its plot before)."""
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--strategies", "ce_only,fixed,reliable_instance"]
    args += ["--set", "data.blind_value=null", "--set", "channels.feature=null"]
    result = CliRunner().invoke(main, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {r["strategy"] for r in results["runs"]} == {"ce_only", "fixed", "reliable_instance"}
    assert all(r["accuracy"]["blind"] is None for r in results["runs"])
    report = (out / "report.md").read_text()
    assert "The data has no blind slice" in report and "| teacher |" in report
    assert "On the blind slice" not in report
    assert (out / "accuracy.png").stat().st_size > 1000
