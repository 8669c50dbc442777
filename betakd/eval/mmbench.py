"""MMBench-dev: option letters with CircularEval over rotated copies.

File (`DIR` = `playground/data/eval/mmbench`):
  DIR/mmbench_dev_20230712.tsv  index, question, hint, A, B, C, D, answer, category, image (base64)

Each question with n options is asked n times, the options rotated by one
place each time (as LLaVA's `--all-rounds`): round r shows option
(i + r) mod n under letter i. A question counts as right only if every
rotation is answered right (CircularEval). Sample ids are "<index>/<round>".
"""

from __future__ import annotations

import base64
import binascii
import csv
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.choices import LETTERS, option_letters, parse_letter
from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.records import EvalDataError
from betakd.eval.samples import BenchmarkData, Sample, with_suffix

NAME = "mmbench"
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
MAX_NEW_TOKENS = 1024  # LLaVA's MMBench runner
QUESTION_FILE = "mmbench_dev_20230712.tsv"
_OPTION_COLUMNS = "ABCD"
_BARE_LETTER = re.compile(r"^\(?([A-Z])[.):]?$")
_LETTER_PAREN = re.compile(r"^\(?([A-Z])\)\s")


def parse_option(text: str, options: list[str]) -> str | None:
    """The chosen option letter, or None when unparsable.

    First the ScienceQA rules (`choices.parse_letter`), then "(B)", "B)", "B.",
    "B:" alone or "B) ..." / "(B) ..." at the start, then an answer that is
    exactly one option's text (case-insensitive, final period ignored).
    MMBench's own evaluator falls back to an LLM judge; that is left out.
    """
    valid = option_letters(len(options))
    letter = parse_letter(text, len(options))
    if letter is not None:
        return letter
    stripped = text.strip()
    match = _BARE_LETTER.match(stripped) or _LETTER_PAREN.match(stripped)
    if match and match.group(1) in valid:
        return match.group(1)
    wanted = stripped.rstrip(".").strip().lower()
    same = [valid[i] for i, option in enumerate(options) if option.strip().lower() == wanted]
    return same[0] if len(same) == 1 else None


def rotate(options: list[str], answer: int, shift: int) -> tuple[list[str], int]:
    """Options moved `shift` places towards the front, and the answer's new index."""
    n = len(options)
    return options[shift:] + options[:shift], (answer - shift) % n


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """CircularEval accuracy (%), first-round accuracy, per-category circular accuracy.

    Annotations hold `index`, `round`, `options` (as shown), `answer` (letter),
    `category`. A question whose rotations are not all predicted counts as wrong.
    """
    rounds_per_question: dict[str, int] = {}
    for ann in annotations.values():
        rounds_per_question[str(ann["index"])] = rounds_per_question.get(str(ann["index"]), 0) + 1
    right_rounds: dict[str, int] = {}
    category: dict[str, str] = {}
    first_right = first_total = 0
    for _, text, ann in pair_up(predictions, annotations, NAME):
        index = str(ann["index"])
        right = parse_option(text, ann["options"]) == ann["answer"]
        right_rounds[index] = right_rounds.get(index, 0) + right
        category[index] = ann.get("category", "")
        if ann["round"] == 0:
            first_right += right
            first_total += 1
    circular = {i: right_rounds[i] == rounds_per_question[i] for i in right_rounds}
    per_category: dict[str, list[bool]] = {}
    for index, ok in circular.items():
        per_category.setdefault(category[index], []).append(ok)
    return {
        "accuracy": percent(sum(circular.values()), len(circular)),
        "first_round_accuracy": percent(first_right, first_total),
        "categories": {c: percent(sum(v), len(v)) for c, v in sorted(per_category.items())},
        "num_questions": len(circular),
        **coverage(predictions, annotations),
    }


def load(data_dir: str | Path) -> BenchmarkData:
    path = Path(data_dir) / QUESTION_FILE
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    # Base64 images make single fields far larger than csv's default limit.
    csv.field_size_limit(sys.maxsize)
    samples: list[Sample] = []
    annotations: dict[str, dict] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        for number, row in enumerate(reader, start=2):
            for sample, ann in _rotations(row, f"{path}:{number}"):
                samples.append(sample)
                annotations[sample.question_id] = ann
    return BenchmarkData(samples, annotations)


def _rotations(row: dict[str, str], where: str):
    for column in ("index", "question", "answer", "image"):
        if not row.get(column):
            raise EvalDataError(f"{where}: missing field {column!r}")
    options = _options(row)
    answer = row["answer"].strip()
    if answer not in LETTERS[: len(options)]:
        raise EvalDataError(f"{where}: answer {answer!r} is not one of the {len(options)} options")
    try:
        image = base64.b64decode(row["image"], validate=True)
    except binascii.Error as err:
        raise EvalDataError(f"{where}: field 'image' is not base64: {err}") from err
    question = row["question"]
    if not _is_none(row.get("hint")):
        question = f"{row['hint']}\n{question}"
    for shift in range(len(options)):
        shown, correct = rotate(options, LETTERS.index(answer), shift)
        lines = [question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, shown)]
        qid = f"{row['index']}/{shift}"
        extra = {"index": row["index"], "round_id": shift, "category": row.get("category", "")}
        yield (
            Sample(qid, with_suffix("\n".join(lines), PROMPT_SUFFIX), image, extra),
            {**extra, "round": shift, "options": shown, "answer": LETTERS[correct]},
        )


def _options(row: Mapping[str, str]) -> list[str]:
    # Like LLaVA: options are read in order up to the first empty one.
    options = []
    for column in _OPTION_COLUMNS:
        if _is_none(row.get(column)):
            break
        options.append(row[column])
    return options


def _is_none(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("", "nan", "none")
