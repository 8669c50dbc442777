"""A new user's trial, end to end through the command line: a LLaVA-format folder with
every kind of broken record, checked, trained, resumed and extended, cached, trained from
the cache and evaluated. Each step either works or stops with one line naming what to
fix; skips are counted once, by reason, and listed in the run folder."""

from __future__ import annotations

import json
import logging

from click.testing import CliRunner
from kd_configs import kd_raw

from betakd import config as cfg
from betakd.cli import main

GOOD = 8


def broken_data_folder(root, llava_files):
    """GOOD clean samples and one of each broken kind; returns (data file, images)."""
    images = root / "images"
    for colour in ("red", "green", "blue"):
        llava_files.write_image(images / f"{colour}.png", colour)
    (images / "truncated.png").write_bytes((images / "red.png").read_bytes()[:40])
    (images / "a_folder.png").mkdir()
    record = llava_files.record
    records = [
        record(
            f"ok{i}",
            "What colour is the shape?",
            ["red", "green", "blue"][i % 3],
            f"{['red', 'green', 'blue'][i % 3]}.png",
        )  # fmt: skip
        for i in range(GOOD)
    ]
    records += [
        {
            **record("number", "How many shapes?", "x", "red.png"),
            "conversations": [
                {"from": "human", "value": "<image>\nHow many shapes?"},
                {"from": "gpt", "value": 3},
            ],
        },  # fmt: skip
        record("folder", "What colour?", "red", "a_folder.png"),
        record("missing", "What colour?", "red", "nowhere.png"),
        record("truncated", "What colour?", "red", "truncated.png"),
        record("ok1", "What colour is the shape?", "green", "green.png"),  # a second ok1
        record("empty_answer", "What colour?", "", "red.png"),
        {
            **record("empty_question", "x", "red", None),
            "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "red"}],
        },  # fmt: skip
        record("too_long", "What colour? " + "very " * 80, "red", "red.png"),
        {
            "id": "no_answer",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>"}],
        },  # fmt: skip
    ]
    return llava_files.write_records(root / "data.jsonl", records), images


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_new_users_trial(llava_pair, llava_files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data, images = broken_data_folder(tmp_path, llava_files)
    run = tmp_path / "run"
    raw = kd_raw(llava_pair, data, images, run, "task", {"trust": {"reference": "data", "threshold": 1.0}},
                 max_steps=2, save_strategy="steps", save_steps=2)  # fmt: skip
    raw["data"].update(max_length=96, max_skip_fraction=0.6)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.yaml.safe_dump(raw))

    # --check: the paths, by key, without loading a model.
    assert invoke("train", config, "--check").output.strip() == f"{config}: valid"
    bad = invoke("train", config, "--check", "--set", "teacher.path=/nowhere/teacher",
                 "--set", f"data.train_file={tmp_path / 'no.jsonl'}")  # fmt: skip
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "teacher.path" in bad.output and "data.train_file: no file at" in bad.output

    # Train: 8 of 17 samples are used; the skips are logged once and listed in the run.
    trained = invoke("train", config)
    assert trained.exit_code == 0, trained.output
    assert f"9 of 17 samples skipped, listed in {run / 'betakd_skipped.json'}" in trained.output
    skipped = json.loads((run / "betakd_skipped.json").read_text())
    assert skipped["counts"] == {
        "missing_image": 2,  # nowhere.png, and the folder
        "corrupt_image": 1,
        "too_long": 1,
        "empty_answer": 1,
        "no_assistant_turn": 1,
        "bad_record": 2,  # the numeric answer, the empty question
        "duplicate_id": 1,
    }
    listed = " ".join(e for entries in skipped["samples"].values() for e in entries)
    for expected in (
        "number: conversations[1].value is a int (3), not a string",
        "a_folder.png is a folder, not an image file",
        "nowhere.png",
        "truncated.png",
        "id 'ok1' appeared earlier",
        "empty_question: conversations[0].value is empty",
        "too_long: student's encoding: ",
        "max_length=96",
    ):
        assert expected in listed, expected
    summaries = [r for r in caplog.records if r.getMessage().startswith("skipped 9 of 17")]
    assert len(summaries) == 1
    # The trust leaves the random teacher almost no weight: said before the first step.
    assert "the data trust leaves 100% of the first samples" in caplog.text

    # Extend the finished run, with a fresh schedule over the added steps.
    extended = invoke("train", config, "--resume", "--set", "training.max_steps=4",
                      "--set", "schedule.restart_at=2")  # fmt: skip
    assert extended.exit_code == 0, extended.output
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    rates = {h["step"]: h["learning_rate"] for h in state["log_history"] if "learning_rate" in h}
    assert rates[3] == raw["training"]["learning_rate"]  # the restart's first step: the peak

    # Cache the teacher, train from the cache: the top-k's mass is reported.
    cache = tmp_path / "cache"
    cached = invoke("cache-teacher", config, "--set", f"teacher.cache_dir={cache}", "--no-progress")  # fmt: skip
    assert cached.exit_code == 0, cached.output
    assert "of the teacher's probability on average" in caplog.text
    from_cache = invoke("train", config, "--set", "teacher.source=cache",
                        "--set", f"teacher.cache_dir={cache}",
                        "--set", f"training.output_dir={tmp_path / 'run-cache'}")  # fmt: skip
    assert from_cache.exit_code == 0, from_cache.output

    # Evaluate the student on the user's own questions; the teacher into the same folder
    # is refused; a broken image stops the run before any answer, naming file and line.
    mine = tmp_path / "mine"
    llava_files.write_image(mine / "q.png", "blue")
    questions = [{"question_id": 1, "image": "q.png", "text": "Colour? One word.", "answer": "blue"},
                 {"question_id": 2, "text": "Say red.", "answer": ["red", "Red."]}]  # fmt: skip
    (mine / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    results = tmp_path / "eval"
    common = ["--benchmark", "custom", "--data", mine, "--output", results, "--max-new-tokens", "3"]
    student = invoke("eval", "--model", run, *common)
    assert student.exit_code == 0, student.output
    assert "custom" in student.output and "average (6" not in student.output
    teacher = invoke("eval", "--model", llava_pair[1], *common)
    assert teacher.exit_code != 0 and "holds answers of model_sha256=" in teacher.output
    (mine / "questions.jsonl").write_text(
        json.dumps({**questions[0], "image": "nowhere.png"}) + "\n"
    )
    broken = invoke("eval", "--model", run, *common, "--output", tmp_path / "eval2")
    assert broken.exit_code != 0 and "Traceback" not in broken.output
    assert "questions.jsonl:1: question '1': image file not found" in broken.output
