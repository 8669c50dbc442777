"""easy-VQA: exact match on the normalised answer, overall and per question type.

Files (`DIR`, written by the demo or by hand):
  DIR/questions.jsonl  question_id, image (relative to DIR), text, answer, type (optional)

`from_package` reads the `easy_vqa` package's own split instead. Without a
`type`, the type follows from the answer: easy-VQA has three kinds of
answers (a shape, a colour, yes/no).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from betakd.eval import custom
from betakd.eval.questions import read_question_file
from betakd.eval.records import EvalDataError
from betakd.eval.samples import BenchmarkData, Sample, with_suffix

NAME = "easyvqa"
PROMPT_SUFFIX = "Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 16
QUESTION_FILE = "questions.jsonl"
SHAPES = frozenset({"circle", "rectangle", "triangle"})
COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
YES_NO = frozenset({"yes", "no"})


def question_type(answer: str, where: str = "") -> str:
    """ "shape", "color" or "yes_no", from an easy-VQA answer."""
    for name, answers in (("shape", SHAPES), ("color", COLORS), ("yes_no", YES_NO)):
        if answer in answers:
            return name
    prefix = f"{where}: " if where else ""
    raise EvalDataError(
        f"{prefix}{answer!r} is not an easy-VQA answer; give the question's 'type', or "
        "evaluate your own questions with --benchmark custom (docs/eval.md)"
    )


def is_correct(prediction: str, answer: str) -> bool:
    return custom.is_correct(prediction, [answer])


def score(predictions: Mapping[str, str], annotations: Mapping[str, Mapping[str, Any]]) -> dict:
    """Accuracy (%) overall and per type; annotations hold `answer` and `type`."""
    accepted = {q: {"answers": [a["answer"]], "type": a["type"]} for q, a in annotations.items()}
    return custom.score(predictions, accepted, NAME)


def load(data_dir: str | Path) -> BenchmarkData:
    data_dir = Path(data_dir)
    path = data_dir / QUESTION_FILE
    samples = read_question_file(path, data_dir, PROMPT_SUFFIX)
    annotations = {}
    for sample in samples:
        where = sample.describe()
        if "answer" not in sample.extra:
            raise EvalDataError(f"{where}: missing field 'answer'")
        answer = str(sample.extra["answer"])
        annotations[sample.question_id] = {
            "answer": answer,
            "type": sample.extra.get("type") or question_type(answer, where),
        }
    # The answer stays out of the prediction records.
    samples = [Sample(s.question_id, s.text, s.image, source=s.source) for s in samples]
    return BenchmarkData(samples, annotations)


def import_easy_vqa():
    """The `easy_vqa` package (the data set ships inside it), which the ``demo`` extra
    installs; a one-line error naming the install command when it is missing."""
    try:
        import easy_vqa
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the easy-VQA data set comes with the easy-vqa package, which is not installed: "
            "pip install 'betakd[demo]'"
        ) from err
    return easy_vqa


def from_package(split: str = "test") -> BenchmarkData:
    """The `easy_vqa` package's train or test questions, images from the package."""
    easy_vqa = import_easy_vqa()
    readers = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in readers:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    get_questions, get_images = readers[split]
    questions, answers, image_ids = get_questions()
    images = get_images()
    samples, annotations = [], {}
    for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        qid = f"{split}-{i}"
        samples.append(Sample(qid, with_suffix(question, PROMPT_SUFFIX), images[image_id]))
        annotations[qid] = {"answer": answer, "type": question_type(answer)}
    return BenchmarkData(samples, annotations)
