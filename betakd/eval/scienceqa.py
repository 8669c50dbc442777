"""ScienceQA-IMG: option-letter accuracy over all questions and over image questions.

Files (LLaVA layout, `DIR` = `playground/data/eval/scienceqa`):
  DIR/llava_test_CQM-A.json   [{"id", "image"?, "conversations": [{"value": prompt}, ...]}]
  DIR/images/test/<image>
  DIR/problems.json           {id: {"answer": int, "choices": [...], "image": str | null}}

The prompt is the first conversation turn without "<image>", plus the
suffix below (LLaVA's `--single-pred-prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.choices import option_letters, parse_letter
from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.records import EvalDataError, read_json, require
from betakd.eval.samples import BenchmarkData, Sample, with_suffix

NAME = "scienceqa"
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
MAX_NEW_TOKENS = 1024  # LLaVA's ScienceQA runner; greedy answers stop long before
QUESTION_FILE = "llava_test_CQM-A.json"
IMAGE_DIR = "images/test"
ANNOTATION_FILE = "problems.json"


def is_correct(prediction: str, problem: Mapping[str, Any], where: str = "scienceqa") -> bool:
    choices = require(problem, "choices", where)
    answer = require(problem, "answer", where)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EvalDataError(f"{where}: answer index {answer!r} outside the {len(choices)} choices")
    return parse_letter(prediction, len(choices)) == option_letters(len(choices))[answer]


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Accuracy (%) over all predicted questions and over those with an image (IMG)."""
    correct = total = img_correct = img_total = 0
    for qid, text, problem in pair_up(predictions, annotations, NAME):
        right = is_correct(text, problem, f"scienceqa problem {qid}")
        has_image = bool(problem.get("image"))
        correct += right
        total += 1
        img_correct += right and has_image
        img_total += has_image
    return {
        "accuracy": percent(correct, total),
        "img_accuracy": percent(img_correct, img_total),
        "num_img": img_total,
        **coverage(predictions, annotations),
    }


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    path = data_dir / QUESTION_FILE
    items = read_json(path)
    if not isinstance(items, list):
        raise EvalDataError(f"{path}: expected a JSON list of questions")
    samples = [_sample(item, data_dir / IMAGE_DIR, f"{path}[{i}]") for i, item in enumerate(items)]
    problems = read_json(data_dir / ANNOTATION_FILE)
    if not isinstance(problems, dict):
        raise EvalDataError(f"{data_dir / ANNOTATION_FILE}: expected an object keyed by problem id")
    # problems.json holds every split; the question file is the test split.
    missing = [s.question_id for s in samples if s.question_id not in problems]
    if missing:
        raise EvalDataError(f"{data_dir / ANNOTATION_FILE}: no problem for ids {missing[:5]}")
    return BenchmarkData(samples, {s.question_id: problems[s.question_id] for s in samples})


def _sample(item: Any, image_dir: Path, where: str) -> Sample:
    if not isinstance(item, dict):
        raise EvalDataError(f"{where}: expected an object")
    qid = str(require(item, "id", where))
    turns = require(item, "conversations", where)
    if not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
        raise EvalDataError(f"{where}: 'conversations' must start with a turn holding 'value'")
    question = turns[0]["value"].replace("<image>", "").strip()
    image = item.get("image")
    return Sample(qid, with_suffix(question, PROMPT_SUFFIX), image_dir / image if image else None)
