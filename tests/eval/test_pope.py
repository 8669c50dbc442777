"""POPE: first-sentence no/not rule and per-split metrics computed by hand."""

import json

import pytest

from betakd.eval import load_benchmark, score
from betakd.eval.pope import parse_yes_no


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("Yes. No dog though", "yes"),  # only the first sentence counts
        ("No.", "no"),
        ("no, none", "no"),  # the comma is removed before splitting
        ("Not really", "yes"),  # official rule: capitalised "Not" is not matched
        ("NO", "yes"),  # nor upper case
        ("nothing", "yes"),  # whole words only
        ("", "yes"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "yes"]
    preds = ["Yes", "Yes", "No", "Yes", "No", "Yes"]
    annotations = {str(i): {"label": lab, "split": "random"} for i, lab in enumerate(labels)}
    annotations["p"] = {"label": "no", "split": "popular"}
    predictions = {str(i): p for i, p in enumerate(preds)} | {"p": "No"}
    metrics = score("pope", predictions, annotations)
    random = metrics["splits"]["random"]
    # TP=3 FP=1 TN=1 FN=1
    assert random["accuracy"] == pytest.approx(400 / 6)
    assert random["precision"] == pytest.approx(75.0)
    assert random["recall"] == pytest.approx(75.0)
    assert random["f1"] == pytest.approx(75.0)
    assert random["yes_ratio"] == pytest.approx(400 / 6)
    # popular: TN only -> precision and recall have nothing to count, F1 0
    assert metrics["splits"]["popular"]["f1"] == 0.0
    assert metrics["f1"] == pytest.approx(37.5)


def test_load_splits(tmp_path, write_images):
    write_images(tmp_path / "val2014", ["a.jpg"])
    (tmp_path / "coco").mkdir()
    for split in ("random", "popular", "adversarial"):
        line = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "no"}  # fmt: skip
        (tmp_path / "coco" / f"coco_pope_{split}.json").write_text(json.dumps(line) + "\n")
    bench = load_benchmark("pope", tmp_path)
    assert [s.question_id for s in bench.samples] == ["random/1", "popular/1", "adversarial/1"]
    assert bench.samples[0].text.endswith("\nAnswer the question using a single word or phrase.")
    assert bench.annotations["popular/1"] == {"label": "no", "split": "popular"}
