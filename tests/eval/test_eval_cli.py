"""`betakd eval` end to end on a tiny model, and the six-benchmark summary."""

import json
import re

import pytest
from click.testing import CliRunner

from betakd.eval import six_benchmark_average
from betakd.eval.cli import eval_command, summary_table


@pytest.fixture
def easyvqa_dir(tmp_path, write_images):
    folder = tmp_path / "easyvqa"
    write_images(folder / "images", ["0.png", "1.png"])
    questions = [
        ("what shape is in the image?", "circle"),
        ("what color is the shape?", "red"),
        ("is there a blue shape?", "no"),
        ("does the image contain a triangle?", "yes"),
        ("what is the blue shape?", "rectangle"),
    ]
    lines = [
        {"question_id": i, "image": f"images/{i % 2}.png", "text": q, "answer": a}
        for i, (q, a) in enumerate(questions)
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def _run(args):
    result = CliRunner().invoke(eval_command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_generate_limit_resume_and_score_only(tiny_llava_path, easyvqa_dir, tmp_path):
    out = tmp_path / "results"
    common = ["--benchmark", "easyvqa", "--data", easyvqa_dir, "--output", out]
    first = _run(["--model", tiny_llava_path, *common, "--batch-size", "2", "--limit", "3"])
    assert "scored 3 of 5" in first.output
    predictions = out / "easyvqa" / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 3

    _run(["--model", tiny_llava_path, *common, "--batch-size", "4"])  # resumes
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["0", "1", "2", "3", "4"]
    report = json.loads((out / "easyvqa" / "metrics.json").read_text())
    assert report["metrics"]["num_scored"] == 5
    assert report["run"]["max_new_tokens"] == 16

    # Score-only with a hand-written predictions file: 3 of 5 right.
    answers = ["Circle.", "red", "Yes", "yes", "a triangle"]
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n" for i, a in enumerate(answers)))  # fmt: skip
    scored = _run(["--score-only", "--predictions", hand, *common])
    assert re.search(r"easyvqa\s+accuracy\s+60\.00\s+5/5", scored.output)
    assert "average (6" not in scored.output  # none of the paper's six was evaluated


def test_bad_predictions_file_is_a_clear_error(easyvqa_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 0, "text": "x"}\nnot json\n')
    result = CliRunner().invoke(
        eval_command,
        [
            "--score-only",
            "--benchmark",
            "easyvqa",
            "--data",
            str(easyvqa_dir),
            "--predictions",
            str(bad),
        ],  # fmt: skip
    )
    assert result.exit_code != 0
    assert "bad.jsonl:2: invalid JSON" in result.output


def test_model_required_without_score_only(easyvqa_dir):
    result = CliRunner().invoke(
        eval_command, ["--benchmark", "easyvqa", "--data", str(easyvqa_dir)]
    )
    assert result.exit_code != 0 and "--model is required" in result.output


def _metrics(value, **extra):
    return {"num_scored": 1, "num_annotated": 1, **extra, "value": value}


def test_six_benchmark_average_uses_mme_over_20():
    metrics = {
        "gqa": _metrics(0, accuracy=60.0),
        "scienceqa": _metrics(0, img_accuracy=66.0),
        "textvqa": _metrics(0, accuracy=50.0),
        "pope": _metrics(0, f1=85.0),
        "mme": _metrics(0, perception=1300.0),  # enters as 65
        "mmbench": _metrics(0, accuracy=58.0),
    }
    assert six_benchmark_average(metrics) == pytest.approx((60 + 66 + 50 + 85 + 65 + 58) / 6)
    assert re.search(r"average \(6, MME/20\)\s+64\.00", summary_table(metrics))
    del metrics["pope"]
    assert six_benchmark_average(metrics) is None
    assert "missing: pope" in summary_table(metrics)


def test_several_benchmarks_share_one_data_folder(easyvqa_dir, tmp_path, write_images):
    gqa = easyvqa_dir.parent / "gqa"
    write_images(gqa / "data" / "images", ["n1.jpg"])
    line = {"question_id": "201", "image": "n1.jpg", "text": "Is it red?"}
    (gqa / "llava_gqa_testdev_balanced.jsonl").write_text(json.dumps(line) + "\n")
    (gqa / "data" / "testdev_balanced_questions.json").write_text('{"201": {"answer": "yes"}}')
    out = tmp_path / "results"
    (out / "gqa").mkdir(parents=True)
    (out / "gqa" / "predictions.jsonl").write_text('{"question_id": "201", "text": "Yes."}\n')
    (out / "easyvqa").mkdir()
    (out / "easyvqa" / "predictions.jsonl").write_text('{"question_id": 0, "text": "circle"}\n')
    args = ["--score-only", "--benchmark", "gqa", "--benchmark", "easyvqa", "--data", easyvqa_dir.parent, "--output", out]  # fmt: skip
    result = _run(args)
    assert re.search(r"gqa\s+accuracy\s+100\.00\s+1/1", result.output)
    assert re.search(r"easyvqa\s+accuracy\s+100\.00\s+1/5", result.output)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"headline": {"gqa": 100.0, "easyvqa": 100.0}, "six_benchmark_average": None}


def test_predictions_of_another_model_are_refused(tiny_llava_path, tiny_model_dir, easyvqa_dir, tmp_path):  # fmt: skip
    other = tiny_model_dir("llava", "teacher", hidden=64, layers=2)
    out = tmp_path / "results"
    common = ["--benchmark", "easyvqa", "--data", easyvqa_dir, "--output", out, "--limit", "2"]
    _run(["--model", tiny_llava_path, *common])
    refused = CliRunner().invoke(eval_command, [str(a) for a in ["--model", other, *common]])
    assert refused.exit_code != 0
    assert "predictions.jsonl:1: this file holds answers of model_sha256=" in refused.output
    assert "--overwrite" in refused.output and "Traceback" not in refused.output
    predictions = out / "easyvqa" / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 2  # nothing was mixed in

    # Other settings are another producer too; --overwrite starts afresh.
    refused = CliRunner().invoke(eval_command, [str(a) for a in ["--model", tiny_llava_path, *common, "--max-new-tokens", "3"]])  # fmt: skip
    assert refused.exit_code != 0 and "max_new_tokens=16" in refused.output
    _run(["--model", other, *common, "--overwrite"])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 2 and len({json.dumps(r["producer"]) for r in records}) == 1
    assert records[0]["model_id"] == str(other)

    # A file that mixes two producers cannot be scored.
    mixed = tmp_path / "mixed.jsonl"
    first = dict(records[0], producer={"model_sha256": "x"})
    mixed.write_text(json.dumps(first) + "\n" + json.dumps(records[1]) + "\n")
    result = CliRunner().invoke(eval_command, ["--score-only", "--benchmark", "easyvqa", "--data", str(easyvqa_dir), "--predictions", str(mixed)])  # fmt: skip
    assert result.exit_code != 0 and "mixed.jsonl:2: answer of another model" in result.output


def test_easyvqa_answer_error_names_file_and_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = [{"question_id": 1, "text": "q?", "answer": "red"}, {"question_id": 2, "text": "q?", "answer": 3}]  # fmt: skip
    (folder / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "p.jsonl").write_text('{"question_id": 1, "text": "red"}\n')
    result = CliRunner().invoke(eval_command, ["--score-only", "--benchmark", "easyvqa", "--data", str(folder), "--predictions", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert result.exit_code != 0
    assert "questions.jsonl:2: question '2': '3' is not an easy-VQA answer" in result.output
    assert "--benchmark custom" in result.output


def test_custom_questions_generate_and_score(tiny_llava_path, tmp_path, write_images):
    folder = tmp_path / "mine"
    write_images(folder / "img", ["a.png"])
    lines = [
        {
            "question_id": "x1",
            "image": "img/a.png",
            "text": "Colour? One word.",
            "answer": ["red", "dark red"],
            "type": "colour",
            "source": "me",
        },  # fmt: skip
        {"question_id": "x2", "text": "How many wheels has a car?", "answer": 4},
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "results"
    result = _run(["--model", tiny_llava_path, "--benchmark", "custom", "--data", folder, "--output", out, "--max-new-tokens", "3"])  # fmt: skip
    assert re.search(r"custom\s+accuracy\s+\d+\.\d\d\s+2/2", result.output)
    assert "average (6" not in result.output
    records = [json.loads(x) for x in (out / "custom" / "predictions.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["prompt"] for r in records] == ["Colour? One word.", "How many wheels has a car?"]
    assert records[0]["source"] == "me" and "answer" not in records[0]

    # Scoring rules: any accepted answer, after the VQA normalisation; per type.
    hand = tmp_path / "hand.jsonl"
    hand.write_text('{"question_id": "x1", "text": "Dark red."}\n{"question_id": "x2", "text": "four"}\n')  # fmt: skip
    _run(["--score-only", "--benchmark", "custom", "--data", folder, "--predictions", hand, "--output", out])  # fmt: skip
    metrics = json.loads((out / "custom" / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == 100.0
    assert metrics["types"] == {"all": 100.0, "colour": 100.0}


def test_custom_questions_bad_answer_names_the_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "questions.jsonl").write_text('{"question_id": 1, "text": "q", "answer": "a"}\n\n{"question_id": 2, "text": "q", "answer": {"x": 1}}\n')  # fmt: skip
    (tmp_path / "p.jsonl").write_text('{"question_id": 1, "text": "a"}\n')
    result = CliRunner().invoke(eval_command, ["--score-only", "--benchmark", "custom", "--data", str(folder), "--predictions", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert result.exit_code != 0
    assert (
        "questions.jsonl:3: question '2': 'answer' must be a string or a list of strings"
        in result.output
    )
