"""MME perception (and cognition): yes/no answers, `100*acc + 100*acc+` per subtask.

Files (`DIR` = `playground/data/eval/MME`), the MME release as distributed:
  DIR/MME_Benchmark_release_version/<subtask>/<name>.txt + <name>.<jpg|png>
  or  .../<subtask>/images/<name>.<ext> + .../<subtask>/questions_answer*/<name>.txt
Each txt line is "question<TAB>Yes|No"; an image has two questions.

acc is over the subtask's questions, acc+ over its images (an image counts
only if all of its questions are answered correctly).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval.matching import coverage, pair_up, percent
from betakd.eval.records import EvalDataError
from betakd.eval.samples import BenchmarkData, Sample, with_suffix

NAME = "mme"
PROMPT_SUFFIX = "Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 128
RELEASE_DIR = "MME_Benchmark_release_version"
PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def parse_yes_no(text: str) -> str:
    """ "yes", "no" or "other" from the answer's first four characters (lower-cased).

    This is LLaVA's conversion (starts with yes / no) followed by MME's own
    rule (first four characters contain "yes", else "no"), which together
    reduce to the check below.
    """
    prefix = text.strip().lower()[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def subtask_score(items: list[tuple[str, str, bool]], num_questions: dict[str, int]) -> dict:
    """`items` are (image, prediction, is_correct); `num_questions` per annotated image."""
    right_per_image: dict[str, int] = {}
    for image, _, right in items:
        right_per_image[image] = right_per_image.get(image, 0) + right
    acc = percent(sum(right for _, _, right in items), len(items))
    acc_plus = percent(
        sum(right_per_image[i] == num_questions[i] for i in right_per_image), len(right_per_image)
    )
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "num": len(items)}


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Per-subtask scores and the perception / cognition sums over the subtasks present.

    Annotations hold `answer` ("Yes"/"No"), `subtask` and `image`.
    """
    num_questions: dict[str, int] = {}
    for ann in annotations.values():
        key = f"{ann['subtask']}/{ann['image']}"
        num_questions[key] = num_questions.get(key, 0) + 1
    per_subtask: dict[str, list[tuple[str, str, bool]]] = {}
    for qid, text, ann in pair_up(predictions, annotations, NAME):
        answer = str(ann["answer"]).lower()
        if answer not in ("yes", "no"):
            raise EvalDataError(
                f"mme annotation {qid}: answer must be Yes or No, got {ann['answer']!r}"
            )
        parsed = parse_yes_no(text)
        per_subtask.setdefault(ann["subtask"], []).append(
            (f"{ann['subtask']}/{ann['image']}", parsed, parsed == answer)
        )
    subtasks = {
        name: subtask_score(items, num_questions) for name, items in sorted(per_subtask.items())
    }
    return {
        "perception": sum(subtasks[s]["score"] for s in PERCEPTION if s in subtasks),
        "cognition": sum(subtasks[s]["score"] for s in COGNITION if s in subtasks),
        "num_perception_subtasks": sum(s in subtasks for s in PERCEPTION),
        "subtasks": subtasks,
        **coverage(predictions, annotations),
    }


def load(data_dir: str | Path) -> BenchmarkData:
    root = Path(data_dir) / RELEASE_DIR
    if not root.is_dir():
        raise EvalDataError(f"{root}: MME release folder not found")
    samples: list[Sample] = []
    annotations: dict[str, dict] = {}
    for subtask in PERCEPTION + COGNITION:
        folder = root / subtask
        if not folder.is_dir():
            continue  # a partial download scores the subtasks it has; the sum says how many
        image_dir, text_dirs = _subtask_layout(folder)
        for text_dir in text_dirs:
            for txt in sorted(text_dir.glob("*.txt")):
                image = _image_for(image_dir, txt)
                for k, (question, answer) in enumerate(_read_pairs(txt)):
                    qid = f"{subtask}/{image.name}/{k}"
                    samples.append(
                        Sample(
                            qid, with_suffix(question, PROMPT_SUFFIX), image, {"category": subtask}
                        )
                    )
                    annotations[qid] = {"answer": answer, "subtask": subtask, "image": image.name}
    if not samples:
        raise EvalDataError(f"{root}: no MME subtask folders with question files")
    return BenchmarkData(samples, annotations)


def _subtask_layout(folder: Path) -> tuple[Path, list[Path]]:
    if (folder / "images").is_dir():
        text_dirs = [
            d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.startswith("questions_")
        ]
        if not text_dirs:
            raise EvalDataError(f"{folder}: has images/ but no questions_* folder")
        return folder / "images", text_dirs
    return folder, [folder]


def _image_for(image_dir: Path, txt: Path) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        candidate = image_dir / (txt.stem + suffix)
        if candidate.is_file():
            return candidate
    raise EvalDataError(f"{txt}: no image {txt.stem}{{{','.join(_IMAGE_SUFFIXES)}}} in {image_dir}")


def _read_pairs(txt: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2:
            raise EvalDataError(f"{txt}:{number}: expected 'question<TAB>answer'")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs
