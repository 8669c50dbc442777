"""ScienceQA: letter parsing (LLaVA rules), overall and IMG accuracy."""

import json

import pytest

from betakd.eval import load_benchmark, score
from betakd.eval.choices import parse_letter


@pytest.mark.parametrize(
    ("text", "num_options", "expected"),
    [
        ("B", 3, "B"),  # exact letter
        (" B ", 3, "B"),
        ("B. sandstone", 3, "B"),  # "X. " prefix
        ("The answer is C.", 3, "C"),
        ("Because of heat. The answer is A, clearly", 3, "A"),  # any one character after
        ("The answer is A", 3, None),  # the official pattern needs a character after the letter
        ("The answer is A. The answer is B.", 3, None),  # ambiguous
        ("D", 3, None),  # outside the options
        ("B.", 3, None),  # "X." alone is not the "X. " prefix
        ("b", 3, None),  # lower case is not a letter answer
        ("sandstone", 3, None),
        ("", 3, None),
    ],
)
def test_parse_letter(text, num_options, expected):
    assert parse_letter(text, num_options) == expected


def test_score_all_and_img(tmp_path):
    problems = {
        "1": {"answer": 0, "choices": ["x", "y"], "image": "image.png"},
        "2": {"answer": 1, "choices": ["x", "y"], "image": "image.png"},
        "3": {"answer": 2, "choices": ["x", "y", "z"], "image": None},
        "4": {"answer": 0, "choices": ["x", "y"], "image": None},
    }
    # right (img), wrong (img), right (no img), unparsable -> wrong (no img)
    predictions = {"1": "A", "2": "A. x", "3": "The answer is C.", "4": "x"}
    metrics = score("scienceqa", predictions, problems)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert metrics["img_accuracy"] == pytest.approx(50.0)
    assert metrics["num_img"] == 2


def test_load_llava_question_file(tmp_path, write_images):
    write_images(tmp_path / "images" / "test" / "1", ["image.png"])
    items = [
        {"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nContext: x\nQuestion: Which?\nOptions: (A) x (B) y"}, {"from": "gpt", "value": "A"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "Question: Which?\nOptions: (A) x (B) y"}]},
    ]  # fmt: skip
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (tmp_path / "problems.json").write_text(json.dumps({"1": {}, "4": {}, "9": {}}))
    bench = load_benchmark("scienceqa", tmp_path)
    assert set(bench.annotations) == {"1", "4"}  # the other splits' problems are left out
    first, second = bench.samples
    assert first.text.startswith("Context: x") and "<image>" not in first.text
    assert first.text.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert first.image == tmp_path / "images" / "test" / "1" / "image.png"
    assert second.image is None
