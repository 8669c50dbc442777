"""MMBench: rotations, option parsing, CircularEval."""

import base64
import csv
import io

import pytest
from PIL import Image

from betakd.eval import load_benchmark, score
from betakd.eval.mmbench import parse_option, rotate

OPTIONS = ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B. dog", "B"),
        ("The answer is C.", "C"),
        ("(B)", "B"),
        ("B)", "B"),
        ("B.", "B"),
        ("(A) cat", "A"),
        ("Dog.", "B"),  # the option's text
        ("D", None),  # not an option
        ("a dog or a cat", None),
        ("", None),
    ],
)
def test_parse_option(text, expected):
    assert parse_option(text, OPTIONS) == expected


def test_rotate():
    assert rotate(OPTIONS, answer=1, shift=0) == (["cat", "dog", "bird"], 1)
    assert rotate(OPTIONS, answer=1, shift=1) == (["dog", "bird", "cat"], 0)
    assert rotate(OPTIONS, answer=1, shift=2) == (["bird", "cat", "dog"], 2)


def _png_base64():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path, rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def mmbench_dir(tmp_path):
    image = _png_base64()
    rows = [
        {"index": 7, "question": "Which animal?", "hint": "A farm.", "A": "cat", "B": "dog", "C": "bird", "D": "", "answer": "B", "category": "animals", "image": image},
        {"index": 8, "question": "Which colour?", "hint": "nan", "A": "red", "B": "blue", "C": "", "D": "", "answer": "A", "category": "colours", "image": image},
    ]  # fmt: skip
    _write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    return tmp_path


def test_load_rotations(mmbench_dir):
    bench = load_benchmark("mmbench", mmbench_dir)
    assert [s.question_id for s in bench.samples] == ["7/0", "7/1", "7/2", "8/0", "8/1"]
    assert bench.samples[1].text == (
        "A farm.\nWhich animal?\nA. dog\nB. bird\nC. cat\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert bench.samples[3].text.startswith("Which colour?\nA. red\nB. blue\n")  # no "nan" hint
    assert [bench.annotations[f"7/{r}"]["answer"] for r in range(3)] == ["B", "A", "C"]
    assert bench.samples[0].image[:4] == b"\x89PNG"


def test_circular_eval(mmbench_dir):
    annotations = load_benchmark("mmbench", mmbench_dir).annotations
    # Question 7 right in every rotation; question 8 right only in the first.
    predictions = {"7/0": "B", "7/1": "A. dog", "7/2": "dog", "8/0": "A", "8/1": "A"}
    metrics = score("mmbench", predictions, annotations)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert metrics["first_round_accuracy"] == pytest.approx(100.0)
    assert metrics["categories"] == {"animals": 100.0, "colours": 0.0}
    # A question with a rotation missing does not count as right.
    partial = score("mmbench", {"7/0": "B", "7/1": "A"}, annotations)
    assert partial["accuracy"] == 0.0


def test_generate_and_score_with_embedded_images(tiny_llava, mmbench_dir, tmp_path):
    from betakd.eval import generate

    model, processor = tiny_llava
    bench = load_benchmark("mmbench", mmbench_dir)
    out = tmp_path / "preds.jsonl"
    records = generate(model, processor, bench.samples, 4, 3, out, progress=False)
    assert [r["round_id"] for r in records] == [0, 1, 2, 0, 1]
    metrics = score("mmbench", out, bench.annotations)
    assert metrics["num_scored"] == 5 and metrics["num_questions"] == 2
