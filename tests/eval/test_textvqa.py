"""TextVQA soft accuracy and the TextVQA loader."""

import json

import pytest

from betakd.eval import load_benchmark, score, vqa_accuracy
from betakd.eval.records import EvalDataError

TEN = ["2"] * 3 + ["sign"] * 7


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # 3 matches: leaving a match out leaves 2 (2/3), leaving another out leaves 3 (1).
        ("Two", TEN, (3 * (2 / 3) + 7 * 1) / 10),
        ("sign", TEN, 1.0),  # 7 matches: every subset has >= 3
        ("stop", TEN, 0.0),
        # 1 match: 9 subsets keep it (1/3), the one without it scores 0.
        ("the stop sign.", ["stop sign"] + ["x"] * 9, 9 * (1 / 3) / 10),
        # 2 matches: 8 subsets keep both (2/3), 2 keep one (1/3).
        ("Stop", ["stop", "STOP"] + ["x"] * 8, (8 * (2 / 3) + 2 * (1 / 3)) / 10),
    ],
)
def test_vqa_accuracy_hand_computed(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_score_is_mean_percent():
    annotations = {"1": {"answers": TEN}, "2": {"answers": TEN}}
    metrics = score("textvqa", {"1": "sign", "2": "stop"}, annotations)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert (metrics["num_scored"], metrics["num_annotated"]) == (2, 2)


def test_unknown_question_is_an_error():
    with pytest.raises(EvalDataError, match="'9'"):
        score("textvqa", {"9": "x"}, {"1": {"answers": TEN}})


def test_load_maps_image_ids_to_question_ids(tmp_path, write_images):
    write_images(tmp_path / "train_images", ["img1.jpg"])
    data = [
        {"question_id": 34602, "image_id": "img1", "question": "What brand?", "answers": TEN},
        {"question_id": 34603, "image_id": "img1", "question": "What number?", "answers": TEN},
    ]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    # LLaVA's file: question_id is the image id, shared by both questions.
    lines = [
        {"question_id": "img1", "image": "img1.jpg", "text": "What number?\nReference OCR token: 7, up\nAnswer the question using a single word or phrase."},
        {"question_id": "img1", "image": "img1.jpg", "text": "What brand?\nReference OCR token: coke"},
    ]  # fmt: skip
    (tmp_path / "llava_textvqa_val_v051_ocr.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines)
    )
    bench = load_benchmark("textvqa", tmp_path)
    assert [s.question_id for s in bench.samples] == ["34603", "34602"]
    # The suffix is appended only where missing.
    assert all(
        s.text.endswith("\nAnswer the question using a single word or phrase.")
        and s.text.count("Answer the question") == 1
        for s in bench.samples
    )
    assert bench.samples[0].extra["image_id"] == "img1"
    assert set(bench.annotations) == {"34602", "34603"}


@pytest.mark.parametrize("k", range(11))
def test_vqa_accuracy_equals_explicit_leave_one_out(k):
    answers = ["yes"] * k + ["no"] * (10 - k)
    subsets = [answers[:i] + answers[i + 1 :] for i in range(10)]
    expected = sum(min(1.0, s.count("yes") / 3) for s in subsets) / 10
    assert vqa_accuracy("Yes.", answers) == pytest.approx(expected)
