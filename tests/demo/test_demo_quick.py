"""`betakd demo --quick` end to end: the README's first command, at smoke size."""

import json

from click.testing import CliRunner

from betakd.cli import main


def test_quick_demo_writes_report_results_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("BETAKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--output", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    strategies = {r["strategy"] for r in results["runs"]}
    assert strategies == {"ce_only", "equal", "fixed", "task", "instance", "closed_form"}
    for run in results["runs"]:
        assert set(run["accuracy"]) >= {"all", "outside_blind", "blind", "colour"}
    task = next(r for r in results["runs"] if r["strategy"] == "task")
    assert set(task["beta_history"]) == {"cosine_probs", "visual"}
    instance = next(r for r in results["runs"] if r["strategy"] == "instance")
    assert 0.0 <= instance["separation"]["cosine_probs"]["auc_blind_lower"] <= 1.0
    fixed = next(r for r in results["runs"] if r["strategy"] == "fixed")
    assert set(fixed["weights"]) == {"cosine_probs", "visual"}
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "Quick smoke run" in report
    for plot in ("accuracy.png", "betas.png", "instance_betas.png"):
        assert (out / plot).stat().st_size > 1000
