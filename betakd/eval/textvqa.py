"""TextVQA (val, OCR-token prompts): VQA soft accuracy with EvalAI normalisation.

Files (LLaVA layout, `DIR` = `playground/data/eval/textvqa`):
  DIR/llava_textvqa_val_v051_ocr.jsonl  question_id (= the image id), image, text
  DIR/train_images/<image>
  DIR/TextVQA_0.5.1_val.json            {"data": [{"question_id", "image_id", "question", "answers"}]}

LLaVA's question file uses the image id as `question_id`, which is not unique;
like LLaVA's scorer, questions are matched to annotations by (image id,
lower-cased question), the question being the prompt's first line. Samples
and predictions then carry TextVQA's own unique `question_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from betakd.eval.matching import coverage, pair_up
from betakd.eval.normalize import normalize_answer
from betakd.eval.questions import read_question_file
from betakd.eval.records import EvalDataError, read_json, require
from betakd.eval.samples import BenchmarkData, Sample

NAME = "textvqa"
PROMPT_SUFFIX = "Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 128
QUESTION_FILE = "llava_textvqa_val_v051_ocr.jsonl"
IMAGE_DIR = "train_images"
ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
_OCR_PREFIX = "Reference OCR token:"


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction against the human answers (10 in VQA / TextVQA).

    Prediction and answers are normalised with `normalize_answer`; the score is
    the mean, over the subsets that leave one human answer out, of
    min(1, matches in the subset / 3).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    total = sum(matches)
    # Leaving answer i out removes one match exactly when answer i matched.
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(answers)


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Mean soft accuracy (%); annotations hold the human `answers`."""
    total = sum(
        vqa_accuracy(text, require(ann, "answers", f"textvqa annotation {qid}"))
        for qid, text, ann in pair_up(predictions, annotations, NAME)
    )
    return {"accuracy": 100.0 * total / len(predictions), **coverage(predictions, annotations)}


def question_from_prompt(prompt: str) -> str:
    """The question line of a LLaVA TextVQA prompt (question, OCR tokens, suffix)."""
    lines = [line for line in prompt.split("\n") if line.strip()]
    questions = [line for line in lines if not line.startswith(_OCR_PREFIX)]
    if not questions:
        raise EvalDataError(f"no question line in TextVQA prompt {prompt!r}")
    return questions[0].strip()


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    raw = read_json(data_dir / ANNOTATION_FILE)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise EvalDataError(f"{data_dir / ANNOTATION_FILE}: expected an object with a 'data' list")
    by_question: dict[tuple[str, str], dict] = {}
    annotations: dict[str, dict] = {}
    for i, ann in enumerate(raw["data"]):
        where = f"{data_dir / ANNOTATION_FILE}: data[{i}]"
        key = (str(require(ann, "image_id", where)), require(ann, "question", where).lower())
        by_question[key] = ann
        annotations[str(require(ann, "question_id", where))] = ann
    questions = read_question_file(
        data_dir / QUESTION_FILE, data_dir / IMAGE_DIR, PROMPT_SUFFIX, unique_ids=False
    )
    samples = [_with_textvqa_id(s, by_question) for s in questions]
    return BenchmarkData(samples, annotations)


def _with_textvqa_id(sample: Sample, by_question: Mapping[tuple[str, str], dict]) -> Sample:
    key = (sample.question_id, question_from_prompt(sample.text).lower())
    if key not in by_question:
        raise EvalDataError(
            f"{QUESTION_FILE}: image {key[0]!r} question {key[1]!r} is not in {ANNOTATION_FILE}"
        )
    extra = {**sample.extra, "image_id": sample.question_id}
    return Sample(str(by_question[key]["question_id"]), sample.text, sample.image, extra)
