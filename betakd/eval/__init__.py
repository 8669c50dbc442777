"""Evaluation harness: batched greedy generation, benchmark scorers, the paper's protocol.

Typical in-process use (the model may already be loaded):

    data = load_benchmark("easyvqa", "data/easyvqa")
    records = generate(model, processor, data.samples, batch_size=8,
                       max_new_tokens=16, output_jsonl="preds.jsonl")
    metrics = score("easyvqa", records, data.annotations)
"""

from betakd.eval.normalize import normalize_answer
from betakd.eval.records import EvalDataError, PredictionsMismatch, load_predictions
from betakd.eval.registry import (
    BENCHMARKS,
    PAPER_SIX,
    get_benchmark,
    load_benchmark,
    score,
    six_benchmark_average,
)
from betakd.eval.samples import BenchmarkData, Sample
from betakd.eval.textvqa import vqa_accuracy

__all__ = [
    "BENCHMARKS",
    "PAPER_SIX",
    "BenchmarkData",
    "EvalDataError",
    "PredictionsMismatch",
    "Sample",
    "check_images",
    "generate",
    "generate_batch",
    "get_benchmark",
    "load_benchmark",
    "load_predictions",
    "normalize_answer",
    "score",
    "six_benchmark_average",
    "vqa_accuracy",
]


def __getattr__(name: str):
    # The runner imports torch and transformers (seconds); loading it on first
    # use keeps `betakd --help` and scoring without a model fast.
    if name in ("check_images", "generate", "generate_batch"):
        from betakd.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'betakd.eval' has no attribute {name!r}")
