"""GQA (testdev-balanced): exact match after `rstrip('.')` and lower-casing.

Files (LLaVA layout, `DIR` = `playground/data/eval/gqa`):
  DIR/llava_gqa_testdev_balanced.jsonl      question_id, image, text
  DIR/data/images/<image>
  DIR/data/testdev_balanced_questions.json  {question_id: {"answer": ..., ...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.questions import read_question_file
from betakd.eval.records import EvalDataError, read_json, require
from betakd.eval.samples import BenchmarkData

NAME = "gqa"
PROMPT_SUFFIX = "Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 128
QUESTION_FILE = "llava_gqa_testdev_balanced.jsonl"
IMAGE_DIR = "data/images"
ANNOTATION_FILE = "data/testdev_balanced_questions.json"


def normalize_prediction(text: str) -> str:
    """The LLaVA conversion rule: trailing periods off, lower case; nothing else."""
    return text.rstrip(".").lower()


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_prediction(prediction) == answer


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Accuracy (%) over the predicted questions; annotations hold `answer`."""
    correct = sum(
        is_correct(text, require(ann, "answer", f"gqa annotation {qid}"))
        for qid, text, ann in pair_up(predictions, annotations, NAME)
    )
    return {"accuracy": percent(correct, len(predictions)), **coverage(predictions, annotations)}


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    samples = read_question_file(data_dir / QUESTION_FILE, data_dir / IMAGE_DIR, PROMPT_SUFFIX)
    raw = read_json(data_dir / ANNOTATION_FILE)
    if not isinstance(raw, dict):
        raise EvalDataError(
            f"{data_dir / ANNOTATION_FILE}: expected an object keyed by question id"
        )
    annotations = {str(qid): ann for qid, ann in raw.items()}
    return BenchmarkData(samples, annotations)
