"""Your own questions: exact match after the VQA answer normalisation.

Files (`DIR`):
  DIR/questions.jsonl  one JSON object per line:
    question_id  a string or integer, unique in the file
    text         the prompt, sent as written (no instruction is appended)
    answer       the reference answer (a string), or a list of accepted answers
    image        optional; a path relative to DIR. A line without one is text-only
    type         optional; accuracy is then also reported per type

Other fields are copied into the prediction records. A prediction is right
when it equals one accepted answer after both pass `normalize_answer`
(lower case, punctuation, articles, number words), as in the VQA protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.normalize import normalize_answer
from betakd.eval.questions import read_question_file
from betakd.eval.records import EvalDataError
from betakd.eval.samples import BenchmarkData, Sample

NAME = "custom"
MAX_NEW_TOKENS = 32
QUESTION_FILE = "questions.jsonl"
NO_TYPE = "all"


def is_correct(prediction: str, answers: list[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}


def score(
    predictions: Mapping[str, str],
    annotations: Mapping[str, Mapping[str, Any]],
    benchmark: str = NAME,
) -> dict:
    """Accuracy (%) overall and per type; annotations hold `answers` and `type`."""
    per_type: dict[str, list[bool]] = {}
    for _, text, ann in pair_up(predictions, annotations, benchmark):
        per_type.setdefault(ann["type"], []).append(is_correct(text, ann["answers"]))
    results = [r for rs in per_type.values() for r in rs]
    metrics: dict[str, Any] = {"accuracy": percent(sum(results), len(results))}
    if set(per_type) != {NO_TYPE}:
        metrics["types"] = {t: percent(sum(rs), len(rs)) for t, rs in sorted(per_type.items())}
    return {**metrics, **coverage(predictions, annotations)}


def accepted_answers(value: Any, where: str) -> list[str]:
    """The `answer` field as a non-empty list of strings (numbers are read as text)."""
    values = value if isinstance(value, list) else [value]
    answers = []
    for answer in values:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise EvalDataError(
                f"{where}: 'answer' must be a string or a list of strings, got {answer!r}"
            )
        answers.append(str(answer))
    if not answers or not any(a.strip() for a in answers):
        raise EvalDataError(f"{where}: 'answer' is empty")
    return answers


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    samples = read_question_file(data_dir / QUESTION_FILE, data_dir, suffix=None)
    annotations = {}
    for sample in samples:
        where = sample.describe()
        if "answer" not in sample.extra:
            raise EvalDataError(f"{where}: missing field 'answer'")
        annotations[sample.question_id] = {
            "answers": accepted_answers(sample.extra["answer"], where),
            "type": str(sample.extra.get("type") or NO_TYPE),
        }
    # The answers stay out of the prediction records.
    samples = [
        Sample(
            s.question_id,
            s.text,
            s.image,
            {k: v for k, v in s.extra.items() if k != "answer"},
            s.source,
        )
        for s in samples
    ]
    return BenchmarkData(samples, annotations)
