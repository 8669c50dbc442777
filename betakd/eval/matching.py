"""Pairing predictions with a benchmark's annotations, and the coverage counts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from betakd.eval.records import EvalDataError


def pair_up(
    predictions: Mapping[str, str], annotations: Mapping[str, Any], benchmark: str
) -> Iterator[tuple[str, str, Any]]:
    """`(question_id, prediction, annotation)` for every prediction, in prediction order.

    A prediction without an annotation means the predictions and the data do
    not belong together, so it is an error rather than skipped.
    """
    if not predictions:
        raise EvalDataError(f"{benchmark}: no predictions to score")
    for qid, text in predictions.items():
        if qid not in annotations:
            raise EvalDataError(f"{benchmark}: question_id {qid!r} has no annotation")
        yield qid, text, annotations[qid]


def coverage(predictions: Mapping[str, str], annotations: Mapping[str, Any]) -> dict[str, int]:
    """How many questions were scored out of all annotated ones (a --limit run scores fewer)."""
    return {"num_scored": len(predictions), "num_annotated": len(annotations)}


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0
