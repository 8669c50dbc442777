"""The benchmarks by name, their headline numbers, and the paper's six-benchmark mean."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from betakd.eval import custom, easyvqa, gqa, mmbench, mme, pope, scienceqa, textvqa
from betakd.eval.records import load_predictions
from betakd.eval.samples import BenchmarkData


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how to read it, how to score it, and its number for the tables."""

    name: str
    module: ModuleType
    headline_key: str  # the metric the paper's tables report
    headline_scale: float = 1.0  # MME enters the six-benchmark mean divided by 20

    @property
    def max_new_tokens(self) -> int:
        return self.module.MAX_NEW_TOKENS

    def load(self, data_dir: str | Path) -> BenchmarkData:
        return self.module.load(data_dir)

    def score(self, predictions: Mapping[str, str], annotations: Mapping[str, Any]) -> dict:
        return self.module.score(predictions, annotations)

    def headline(self, metrics: Mapping[str, Any]) -> float:
        return metrics[self.headline_key]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gqa", gqa, "accuracy"),
        Benchmark("scienceqa", scienceqa, "img_accuracy"),
        Benchmark("textvqa", textvqa, "accuracy"),
        Benchmark("pope", pope, "f1"),
        Benchmark("mme", mme, "perception", headline_scale=1 / 20),
        Benchmark("mmbench", mmbench, "accuracy"),
        Benchmark("easyvqa", easyvqa, "accuracy"),
        Benchmark("custom", custom, "accuracy"),
    )
}

# The paper's average: GQA, ScienceQA-IMG, TextVQA, POPE F1, MME-P / 20, MMBench-dev.
PAPER_SIX = ("gqa", "scienceqa", "textvqa", "pope", "mme", "mmbench")


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, data_dir: str | Path) -> BenchmarkData:
    """Samples and annotations of a benchmark from its folder (layouts in docs/eval.md)."""
    return get_benchmark(name).load(data_dir)


def score(
    benchmark: str,
    predictions: str | Path | Mapping[str, str] | Iterable[Mapping[str, Any]],
    annotations: Mapping[str, Any],
) -> dict[str, Any]:
    """Metrics of one benchmark.

    `predictions`: a predictions JSONL path, records with `question_id` and
    `text` (what `generate` returns), or `{question_id: text}`.
    `annotations`: `{question_id: annotation}` as `load_benchmark(...).annotations`.
    """
    return get_benchmark(benchmark).score(load_predictions(predictions), annotations)


def six_benchmark_average(metrics: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The paper's mean over the six benchmarks, or None unless all six are in `metrics`."""
    if not all(name in metrics for name in PAPER_SIX):
        return None
    values = [BENCHMARKS[n].headline(metrics[n]) * BENCHMARKS[n].headline_scale for n in PAPER_SIX]
    return sum(values) / len(values)
