"""MME: yes/no parsing, acc + acc+ per subtask, perception sum."""

import pytest

from betakd.eval import load_benchmark, score
from betakd.eval.mme import parse_yes_no


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, it is", "yes"),
        (" No", "no"),
        ("no.", "no"),
        ("Not at all", "no"),  # "no" inside the first four characters
        ("Nope", "no"),
        ("A yes", "other"),  # "yes" must start within the first four characters
        ("I think yes", "other"),
        ("Maybe", "other"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def _ann(subtask, image, answer):
    return {"answer": answer, "subtask": subtask, "image": image}


def test_score_by_hand():
    annotations = {
        "e1a": _ann("existence", "1.jpg", "Yes"),
        "e1b": _ann("existence", "1.jpg", "No"),
        "e2a": _ann("existence", "2.jpg", "Yes"),
        "e2b": _ann("existence", "2.jpg", "No"),
        "c1a": _ann("commonsense_reasoning", "1.png", "Yes"),
        "c1b": _ann("commonsense_reasoning", "1.png", "No"),
    }
    predictions = {
        "e1a": "Yes",
        "e1b": "No.",  # image 1 fully right
        "e2a": "Yes",
        "e2b": "Maybe",  # image 2: one right, one "other"
        "c1a": "no",
        "c1b": "no",
    }
    metrics = score("mme", predictions, annotations)
    existence = metrics["subtasks"]["existence"]
    assert existence["acc"] == pytest.approx(75.0)
    assert existence["acc_plus"] == pytest.approx(50.0)
    assert existence["score"] == pytest.approx(125.0)
    assert metrics["perception"] == pytest.approx(125.0)
    assert metrics["cognition"] == pytest.approx(50.0)  # acc 50 + acc+ 0
    assert metrics["num_perception_subtasks"] == 1


def test_image_with_unscored_question_is_not_acc_plus():
    annotations = {"a": _ann("color", "1.jpg", "Yes"), "b": _ann("color", "1.jpg", "No")}
    metrics = score("mme", {"a": "Yes"}, annotations)
    assert metrics["subtasks"]["color"]["acc"] == 100.0
    assert metrics["subtasks"]["color"]["acc_plus"] == 0.0


def test_load_both_layouts(tmp_path, write_images):
    root = tmp_path / "MME_Benchmark_release_version"
    write_images(root / "existence", ["1.jpg"])
    (root / "existence" / "1.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n"
    )
    write_images(root / "artwork" / "images", ["9.png"])
    (root / "artwork" / "questions_answer_YES_NO").mkdir()
    (root / "artwork" / "questions_answer_YES_NO" / "9.txt").write_text("Is it Monet?\tNo\n")
    bench = load_benchmark("mme", tmp_path)
    ids = [s.question_id for s in bench.samples]
    assert ids == ["existence/1.jpg/0", "existence/1.jpg/1", "artwork/9.png/0"]
    assert bench.samples[2].image == root / "artwork" / "images" / "9.png"
    assert bench.samples[0].text.endswith(
        "Please answer yes or no.\nAnswer the question using a single word or phrase."
    )
    assert bench.annotations["existence/1.jpg/1"]["answer"] == "No"
