"""The scenario driver every `betakd demo` scenario runs through, and the comparisons the
reports state (no pass/fail thresholds: the numbers, side by side)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from betakd.demo import report, two_teachers
from betakd.demo.scenario import DemoRunError, Prepared, Scenario, run_scenario

# ----------------------------------------------------------------------------- the reports


def _strategy(name, weighting=None, recommended=False):
    return {"name": name, "label": f"label {name}", "recommended": recommended,
            "weighting": weighting}  # fmt: skip


def _run(strategy, seed, all_, outside, blind):
    accuracy = {"all": all_, "outside_blind": outside, "blind": blind}
    return {"strategy": strategy, "seed": seed, "accuracy": accuracy}


def default_results(blind=True):
    """Two seeds; ``fixed`` is the best fixed weight overall and on the blind slice,
    ``fixed_x3`` outside it; ``fixed_trust`` is best overall but is no plain fixed
    weight (a trust re-weights it)."""
    rows = {
        "ce_only": [(80, 80, 80), (80, 80, 80)],
        "fixed": [(90, 95, 10), (92, 95, 20)],
        "fixed_x3": [(88, 97, 0), (88, 99, 0)],
        "fixed_trust": [(99, 99, 99), (99, 99, 99)],
        "rec": [(96, 98, 90), (98, 98, 94)],
    }
    runs = [
        _run(name, seed, a, o, b if blind else None)
        for name, seeds in rows.items()
        for seed, (a, o, b) in enumerate(seeds)
    ]
    strategies = [
        _strategy("ce_only"),
        _strategy("fixed", {"name": "fixed"}),
        _strategy("fixed_x3", {"name": "fixed", "options": {"weights": {"x": 3}}}),
        _strategy("fixed_trust", {"name": "fixed", "options": {"trust": {}}}),
        _strategy("rec", {"name": "instance"}, recommended=True),
    ]
    return {"strategies": strategies, "runs": runs}


def test_versus_states_the_difference_the_means_and_the_worst_seeds():
    summary = report.summarize(default_results()["runs"])
    assert report.versus(summary["rec"], summary["fixed"]) == (
        "+6.0 points (mean 97.0 vs 91.0), worst seed 96.0 vs 90.0"
    )
    assert report.best_of(["fixed", "fixed_x3", "missing"], summary) == "fixed"
    assert report.best_of(["missing"], summary) is None


def test_the_recommended_strategy_is_compared_with_the_best_fixed_weight():
    lines = report.comparisons(default_results())
    assert lines == [
        "- label rec vs the best fixed weight (label fixed), whole test set: +6.0 points "
        "(mean 97.0 vs 91.0), worst seed 96.0 vs 90.0.",
        # Outside the blind slice, the best fixed weight there is another one.
        "- Outside the blind slice, vs the best fixed weight there (label fixed_x3): +0.0 "
        "points (mean 98.0 vs 98.0), worst seed 98.0 vs 97.0.",
        "- On the blind slice, vs label fixed: +77.0 points (mean 92.0 vs 15.0), worst seed "
        "90.0 vs 10.0.",
        "- Seeds of label rec: worst 96.0, mean 97.0 (-1.0), over 2 seed(s).",
    ]
    no_blind = report.comparisons(default_results(blind=False))
    assert len(no_blind) == 3 and "has no blind slice" in no_blind[1]
    assert not any("On the blind slice" in line for line in no_blind)
    results = default_results()
    for strategy in results["strategies"]:
        strategy["recommended"] = False
    assert report.comparisons(results) == []


def test_the_ranking_names_the_best_the_runner_up_and_their_spreads():
    text = report.ranking(default_results())
    assert text.startswith("Best mean accuracy: **label fixed_trust** (99.00%).")
    assert "Runner-up: label rec (97.00%), 2.00 points behind" in text
    assert "seed spread (std over 2 seeds) 0.00 and 1.41 points" in text
    one_seed = default_results()
    one_seed["runs"] = [r for r in one_seed["runs"] if r["seed"] == 0]
    assert "one seed only" in report.ranking(one_seed)
    assert report.ranking({"strategies": [], "runs": []}) == "No runs."


def two_teacher_results():
    catalogue = [
        {"name": "a_only", "label": "A alone", "family": "single"},
        {"name": "b_only", "label": "B alone", "family": "single"},
        {"name": "fixed_x1", "label": "fixed x1", "family": "fixed"},
        {"name": "fixed_reliability", "label": "fixed + rel", "family": "ablation"},
        {"name": "instance", "label": "instance", "family": "beta_kd"},
    ]
    accuracy = {  # run -> per seed (all, blind_a, blind_b, rest)
        "a_only": [(95, 0, 99, 98), (97, 0, 97, 98)],
        "b_only": [(93, 94, 0, 97), (93, 96, 0, 97)],
        "fixed_x1": [(80, 20, 60, 97), (84, 30, 70, 97)],
        "fixed_reliability": [(99, 99, 99, 99), (99, 99, 99, 99)],
        "instance": [(96, 90, 98, 97), (98, 92, 96, 97)],
    }
    runs = []
    for name, seeds in accuracy.items():
        for seed, values in enumerate(seeds):
            separation = {}
            if name == "instance":
                separation = {
                    "a/cosine_probs": {"auc_blind_a_lower": 0.95 + seed / 100},
                    "b/cosine_probs": {"auc_blind_b_lower": 0.9},
                }
            runs.append({"run": name, "seed": seed, "separation": separation,
                         "accuracy": dict(zip(two_teachers.ACCURACY_KEYS, values))})  # fmt: skip
    return {"runs_catalogue": catalogue, "blind": {"a": "blue", "b": "green"}, "runs": runs}


def test_two_teacher_report_compares_each_student_with_the_other_teachers_one():
    results = two_teacher_results()
    stats = two_teachers.summaries(results)
    # Only the constant weights per teacher are checked (not the ablation, not instance).
    assert two_teachers.design_check(results, stats) == [
        "- fixed x1: blind slice of a (blue) vs teacher b alone: -70.0 points (mean 25.0 vs "
        "95.0), worst seed 20.0 vs 94.0; blind slice of b (green) vs teacher a alone: -33.0 "
        "points (mean 65.0 vs 98.0), worst seed 60.0 vs 97.0."
    ]
    lines = two_teachers.instance_comparisons(results, stats)
    assert lines[:2] == [
        "- vs the best single-teacher student (A alone), whole test set: +1.0 points (mean "
        "97.0 vs 96.0), worst seed 96.0 vs 95.0.",
        # The ablation is no fixed family: the best fixed weight is fixed x1.
        "- vs the best fixed weight (fixed x1), whole test set: +15.0 points (mean 97.0 vs "
        "82.0), worst seed 96.0 vs 80.0.",
    ]
    assert lines[2].startswith("- On the blind slice of a (blue), vs teacher b alone: -4.0")
    assert lines[3].startswith("- On the blind slice of b (green), vs teacher a alone: -1.0")
    assert "per seed 0.950, 0.960 " in lines[4] and "per seed 0.900, 0.900 " in lines[5]


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class FakeJob:
    run: str
    seed: int


@dataclass
class FakeRecord:
    run: str
    seed: int
    accuracy: dict


def fake_run_job(job: FakeJob) -> FakeRecord:
    """Module-level, so a spawned worker finds it; run "bad" fails."""
    if job.run == "bad":
        raise ValueError(f"bad run, seed {job.seed}")
    return FakeRecord(job.run, job.seed, {"all": 10.0 * (job.seed + 1)})


def fake_job_name(job: FakeJob) -> str:
    return f"{job.run}-seed{job.seed}"


def fake_report(results: dict, out: Path) -> Path:
    path = out / "report.md"
    path.write_text(f"{len(results['runs'])} runs, {len(results['failed'])} failed")
    return path


def test_the_driver_runs_any_scenario_and_writes_its_results(tmp_path, monkeypatch, demo_cache_dir):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("BETAKD_CACHE", str(demo_cache_dir))
    seen = {}

    def prepare(context):
        seen["context"] = context
        jobs = [FakeJob(run, seed) for seed in context.settings.seeds for run in context.runs]
        entries = {"design": {"runs": list(context.runs)}, "teachers": sorted(context.teachers)}
        return Prepared(jobs, entries, {"examples": len(context.tests)})

    scenario = Scenario(
        name="fake",
        output_dir=str(tmp_path / "unused"),
        seeds=lambda config: (5, 6, 7),
        runs=lambda config: ["good", "bad"],
        prepare=prepare,
        run_job=fake_run_job,
        job_name=fake_job_name,
        write_report=fake_report,
        settings={"eval_batch_size": 7},
    )
    out = tmp_path / "fake"
    with pytest.raises(DemoRunError, match=r"2 of 4 runs failed \(bad-seed0, bad-seed1\)"):
        run_scenario(scenario, out, quick=True, seeds=[0, 1], jobs=1)
    context = seen["context"]
    # Quick settings with the seeds given and the scenario's own settings.
    assert context.settings.seeds == (0, 1) and context.settings.eval_batch_size == 7
    assert context.settings.jobs == 1 and context.settings.train_limit == 384
    assert set(context.inits) == {0, 1}
    assert all((path / "config.json").is_file() for path in context.inits.values())
    assert set(context.teachers) == {"teacher"} and context.designs["teacher"] == context.config
    assert context.teachers["teacher"].is_dir()
    assert len(context.tests) == context.settings.test_questions

    # results.json: the common entries, the scenario's around "data", then the runs.
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [
        "scenario", "settings", "quick", "overrides", "design", "teachers", "data",
        "examples", "runs", "failed", "wall_seconds", "machine",
    ]  # fmt: skip
    assert results["scenario"] == "fake" and results["quick"] is True
    assert results["design"] == {"runs": ["good", "bad"]} and results["teachers"] == ["teacher"]
    assert results["examples"] == context.settings.test_questions
    assert results["runs"] == [
        {"run": "good", "seed": 0, "accuracy": {"all": 10.0}},
        {"run": "good", "seed": 1, "accuracy": {"all": 20.0}},
    ]
    assert sorted(f["run"] for f in results["failed"]) == ["bad-seed0", "bad-seed1"]
    assert "bad run" in results["failed"][0]["error"]
    # The report was written before the error.
    assert (out / "report.md").read_text() == "2 runs, 2 failed"


def test_a_bad_scenario_design_fails_before_any_work(tmp_path):
    def no_runs(config):
        raise ValueError("no such run")

    scenario = Scenario(
        name="broken", output_dir=str(tmp_path / "never"), seeds=lambda config: (0,),
        runs=no_runs, prepare=None, run_job=fake_run_job, job_name=fake_job_name,
        write_report=fake_report,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no such run"):
        run_scenario(scenario)
    assert not (tmp_path / "never").exists()
