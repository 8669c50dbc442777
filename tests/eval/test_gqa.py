"""GQA: rstrip('.') + lower-case exact match, and the LLaVA file layout."""

import json

import pytest

from betakd.eval import load_benchmark, score
from betakd.eval.gqa import is_correct


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes", "yes", True),
        ("yes.", "yes", True),
        ("Yes...", "yes", True),  # every trailing period
        ("Yes, it is", "yes", False),  # no other normalisation
        ("the table", "table", False),  # articles are not removed in GQA
        (" yes", "yes", False),
        ("Left", "left", True),
    ],
)
def test_is_correct(prediction, answer, expected):
    assert is_correct(prediction, answer) is expected


def test_score_and_load(tmp_path, write_images):
    write_images(tmp_path / "data" / "images", ["n1.jpg", "n2.jpg"])
    questions = [
        {"question_id": "201", "image": "n1.jpg", "text": "Is it red?\nAnswer the question using a single word or phrase."},
        {"question_id": "202", "image": "n2.jpg", "text": "Which side?"},
        {"question_id": "203", "image": "n2.jpg", "text": "What is it?"},
    ]  # fmt: skip
    (tmp_path / "llava_gqa_testdev_balanced.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in questions)
    )
    answers = {"201": {"answer": "yes"}, "202": {"answer": "left"}, "203": {"answer": "cup"}}
    (tmp_path / "data" / "testdev_balanced_questions.json").write_text(json.dumps(answers))
    bench = load_benchmark("gqa", tmp_path)
    assert (
        bench.samples[1].text == "Which side?\nAnswer the question using a single word or phrase."
    )
    assert bench.samples[0].image == tmp_path / "data" / "images" / "n1.jpg"
    metrics = score("gqa", {"201": "Yes.", "202": "right", "203": "Cup"}, bench.annotations)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
