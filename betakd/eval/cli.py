"""`betakd eval`: generate predictions for benchmarks, score them, print a table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from betakd.eval.mme import PERCEPTION
from betakd.eval.records import EvalDataError, load_predictions, read_json
from betakd.eval.registry import BENCHMARKS, PAPER_SIX, get_benchmark, six_benchmark_average
from betakd.files import folder_sha256

logger = logging.getLogger(__name__)

# Folder names of LLaVA's `playground/data/eval`, used when several
# benchmarks share one --data folder.
DATA_FOLDERS = {"mme": "MME"}
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"


@click.command("eval")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), help="Saved model folder (save_pretrained).")  # fmt: skip
@click.option("--benchmark", "benchmarks", multiple=True, required=True, type=click.Choice(list(BENCHMARKS)), help="Benchmark to run; repeat for several.")  # fmt: skip
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The benchmark's folder; with several benchmarks, the folder holding one subfolder each (gqa, scienceqa, textvqa, pope, MME, mmbench, easyvqa).")  # fmt: skip
@click.option("--output", "output_dir", default="eval-results", show_default=True, type=click.Path(file_okay=False), help="Writes <output>/<benchmark>/predictions.jsonl and metrics.json.")  # fmt: skip
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples (a quick check; not comparable to published numbers).")  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Override the benchmark's default.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Delete the benchmark's predictions under --output first (by default a run resumes them, and refuses those of another model or other settings).")  # fmt: skip
@click.option("--score-only", is_flag=True, help="Score an existing predictions file; loads no model.")  # fmt: skip
@click.option("--predictions", "predictions_path", type=click.Path(exists=True, dir_okay=False), help="With --score-only and one benchmark: the predictions file (default: the one under --output).")  # fmt: skip
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)  # fmt: skip
def eval_command(
    model_path: str | None,
    benchmarks: tuple[str, ...],
    data_dir: str,
    output_dir: str,
    batch_size: int,
    limit: int | None,
    max_new_tokens: int | None,
    overwrite: bool,
    score_only: bool,
    predictions_path: str | None,
    device: str | None,
    dtype: str,
) -> None:
    """Evaluate a model on benchmarks with the paper's protocol (docs/eval.md)."""
    if not score_only and model_path is None:
        raise click.UsageError("--model is required unless --score-only is given")
    if predictions_path is not None and (not score_only or len(benchmarks) != 1):
        raise click.UsageError("--predictions needs --score-only and exactly one --benchmark")
    if overwrite and score_only:
        raise click.UsageError("--overwrite deletes predictions; it cannot go with --score-only")
    output = Path(output_dir)
    loaded = None if score_only else _load_model(model_path, device, dtype)
    weights = None if score_only else folder_sha256(model_path)
    several = len(set(benchmarks)) > 1
    try:
        for name in dict.fromkeys(benchmarks):  # repeated names run once
            predictions = (
                Path(predictions_path) if predictions_path else output / name / PREDICTIONS_FILE
            )
            run = {
                "data": str(_benchmark_folder(Path(data_dir), name, several)),
                "predictions": str(predictions),
                "limit": limit,
            }
            if loaded is not None:
                run.update(model=model_path, dtype=dtype, batch_size=batch_size)
                run["max_new_tokens"] = max_new_tokens or get_benchmark(name).max_new_tokens
                run["producer"] = {
                    "model_sha256": weights,
                    "dtype": dtype,
                    "max_new_tokens": run["max_new_tokens"],
                }
                if overwrite:
                    predictions.unlink(missing_ok=True)
            metrics = _evaluate(name, run, loaded)
            _write_json(output / name / METRICS_FILE, {"benchmark": name, "metrics": metrics, "run": run})  # fmt: skip
            _warn_partial(name, metrics)
    except EvalDataError as err:
        raise click.ClickException(str(err)) from err
    click.echo(summary_table(collect_metrics(output)))


def _evaluate(name: str, run: dict[str, Any], loaded: tuple[Any, Any] | None) -> dict[str, Any]:
    """Generate the missing predictions (unless scoring only), then score the file."""
    benchmark = get_benchmark(name)
    data = benchmark.load(run["data"]).limited(run["limit"])
    if loaded is not None:
        from betakd.eval.runner import generate

        model, processor = loaded
        generate(
            model,
            processor,
            data.samples,
            run["batch_size"],
            run["max_new_tokens"],
            run["predictions"],
            model_id=run["model"],
            producer=run["producer"],
        )
    return benchmark.score(load_predictions(run["predictions"]), data.annotations)


def collect_metrics(output: Path) -> dict[str, dict[str, Any]]:
    """Metrics of every benchmark evaluated under `output` (also earlier runs); writes the summary."""
    metrics = {}
    for name in BENCHMARKS:
        path = output / name / METRICS_FILE
        if path.is_file():
            metrics[name] = read_json(path)["metrics"]
    summary = {
        "headline": {n: BENCHMARKS[n].headline(m) for n, m in metrics.items()},
        "six_benchmark_average": six_benchmark_average(metrics),
    }
    _write_json(output / SUMMARY_FILE, summary)
    return metrics


def summary_table(metrics: dict[str, dict[str, Any]]) -> str:
    """One row per benchmark (headline metric, coverage); the paper's six-benchmark mean
    when one of the six was evaluated."""
    rows = [("benchmark", "metric", "value", "scored")]
    for name, m in metrics.items():
        bench = BENCHMARKS[name]
        rows.append(
            (
                name,
                bench.headline_key,
                f"{bench.headline(m):.2f}",
                f"{m['num_scored']}/{m['num_annotated']}",
            )
        )
    average = six_benchmark_average(metrics)
    if average is not None:
        rows.append(("average (6, MME/20)", "", f"{average:.2f}", ""))
    elif any(name in metrics for name in PAPER_SIX):
        missing = [n for n in PAPER_SIX if n not in metrics]
        rows.append(("average (6, MME/20)", "", "-", f"missing: {', '.join(missing)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _benchmark_folder(data_dir: Path, name: str, several: bool) -> Path:
    if not several:
        return data_dir
    folder = data_dir / DATA_FOLDERS.get(name, name)
    if not folder.is_dir():
        raise click.ClickException(f"{folder}: no folder for benchmark {name!r} under --data")
    return folder


def _load_model(model_path: str, device: str | None, dtype: str) -> tuple[Any, Any]:
    # Imported here so that `betakd --help` does not pay for torch and transformers.
    from betakd import models

    try:
        loaded = models.load(model_path, dtype=dtype, frozen=True, key="--model")
    except (FileNotFoundError, models.ModelError) as err:
        raise click.ClickException(str(err)) from err
    loaded.model.to(models.default_device(device))
    return loaded.model, loaded.processor


def _warn_partial(name: str, metrics: dict[str, Any]) -> None:
    if metrics["num_scored"] < metrics["num_annotated"]:
        click.echo(
            f"warning: {name}: scored {metrics['num_scored']} of {metrics['num_annotated']} "
            "questions; not comparable to published numbers",
            err=True,
        )
    # MME-P is a sum over subtasks, so a missing subtask folder lowers it.
    if name == "mme" and metrics["num_perception_subtasks"] < len(PERCEPTION):
        click.echo(
            f"warning: mme: {metrics['num_perception_subtasks']} of {len(PERCEPTION)} perception "
            "subtasks found; MME-P is their sum",
            err=True,
        )


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
