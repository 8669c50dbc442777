"""POPE (random / popular / adversarial): yes/no object hallucination, F1 per split.

Files (`DIR` = `playground/data/eval/pope`):
  DIR/coco/coco_pope_{random,popular,adversarial}.json  JSONL: question_id, image, text, label
  DIR/val2014/<image>

The POPE files are both question file and annotations (LLaVA's question file
is these lines plus a category). Question ids restart in every split, so a
sample's id is "<split>/<question_id>".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.questions import read_question_file
from betakd.eval.records import EvalDataError
from betakd.eval.samples import BenchmarkData, Sample

NAME = "pope"
PROMPT_SUFFIX = "Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 128
SPLITS = ("random", "popular", "adversarial")
IMAGE_DIR = "val2014"
_NEGATIVE_WORDS = frozenset({"No", "no", "not"})


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE rule: "no" if the first sentence has the word No / no / not, else "yes".

    Words are split on single spaces after commas are removed, exactly as the
    official script does, so "NO" or "Not" at the start count as "yes".
    """
    first_sentence = text.split(".")[0].replace(",", "")
    return "no" if _NEGATIVE_WORDS.intersection(first_sentence.split(" ")) else "yes"


def split_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio, in %."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = percent(tp, tp + fp)
    recall = percent(tp, tp + fn)
    return {
        "accuracy": percent(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": percent(tp + fp, len(pairs)),
        "num": len(pairs),
    }


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Per-split metrics and the mean F1 over the splits present; annotations: label, split."""
    by_split: dict[str, list[tuple[str, str]]] = {}
    for qid, text, ann in pair_up(predictions, annotations, NAME):
        label = ann.get("label")
        if label not in ("yes", "no"):
            raise EvalDataError(
                f"pope annotation {qid}: label must be 'yes' or 'no', got {label!r}"
            )
        by_split.setdefault(ann["split"], []).append((parse_yes_no(text), label))
    splits = {name: split_metrics(pairs) for name, pairs in sorted(by_split.items())}
    mean_f1 = sum(m["f1"] for m in splits.values()) / len(splits)
    return {"f1": mean_f1, "splits": splits, **coverage(predictions, annotations)}


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    samples: list[Sample] = []
    annotations: dict[str, dict] = {}
    for split in SPLITS:
        path = data_dir / "coco" / f"coco_pope_{split}.json"
        for sample in read_question_file(path, data_dir / IMAGE_DIR, PROMPT_SUFFIX):
            qid = f"{split}/{sample.question_id}"
            label = sample.extra.get("label")
            if label not in ("yes", "no"):
                raise EvalDataError(f"{path}: question {sample.question_id}: bad label {label!r}")
            samples.append(Sample(qid, sample.text, sample.image, {"category": split}))
            annotations[qid] = {"label": label, "split": split}
    return BenchmarkData(samples, annotations)
