"""easy-VQA: normalised exact match per question type."""

import json
import sys

import pytest

from betakd.eval import load_benchmark, score
from betakd.eval.easyvqa import from_package, question_type
from betakd.eval.records import EvalDataError


def test_score_per_type():
    annotations = {
        "1": {"answer": "circle", "type": "shape"},
        "2": {"answer": "red", "type": "color"},
        "3": {"answer": "yes", "type": "yes_no"},
        "4": {"answer": "no", "type": "yes_no"},
    }
    predictions = {"1": "A circle.", "2": "Red", "3": "Yes, it is", "4": "no"}
    metrics = score("easyvqa", predictions, annotations)
    # "A circle." -> "circle" right; "Yes, it is" -> "yes it is" wrong
    assert metrics["types"] == {"color": 100.0, "shape": 100.0, "yes_no": 50.0}
    assert metrics["accuracy"] == pytest.approx(75.0)


def test_question_type():
    assert question_type("teal") == "color"
    assert question_type("triangle") == "shape"
    with pytest.raises(EvalDataError):
        question_type("purple")


def test_load(tmp_path, write_images):
    write_images(tmp_path / "images", ["0.png"])
    lines = [
        {"question_id": 0, "image": "images/0.png", "text": "what shape is it?", "answer": "circle"},
        {"question_id": 1, "image": "images/0.png", "text": "is it red?", "answer": "no", "type": "custom"},
    ]  # fmt: skip
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    bench = load_benchmark("easyvqa", tmp_path)
    assert bench.annotations == {
        "0": {"answer": "circle", "type": "shape"},
        "1": {"answer": "no", "type": "custom"},
    }
    assert bench.samples[0].extra == {}  # the answer is not copied to predictions


def test_from_package():
    bench = from_package("test")
    assert len(bench.samples) == 9673
    first = bench.samples[0]
    assert first.text.endswith("\nAnswer the question using a single word or phrase.")
    assert bench.annotations[first.question_id]["type"] in {"shape", "color", "yes_no"}


def test_without_the_demo_extra_the_demo_says_what_to_install(monkeypatch):
    """easy-vqa is the `demo` extra: without it, `betakd demo` stops with one line naming
    the install command (and the library imports without it)."""
    from click.testing import CliRunner

    from betakd.cli import main

    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # as if not installed
    result = CliRunner().invoke(main, ["demo", "--quick"])
    assert result.exit_code == 1
    assert "pip install 'betakd[demo]'" in result.output
    with pytest.raises(ModuleNotFoundError, match="betakd\\[demo\\]"):
        from_package("test")
