"""The demo's easy-VQA conversion: counts, noise, blind slice, LLaVA format, caching."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from betakd.demo.easyvqa_data import (
    ANSWERS_BY_QTYPE,
    COLOURS,
    SHAPES,
    DemoDataConfig,
    build_demo_data,
    inject_noise,
    load_easyvqa,
    presence_fact,
    question_type,
    read_jsonl,
    train_demo_tokenizer,
)

pytest.importorskip("easy_vqa")

SMALL = DemoDataConfig(
    qtypes=("colour", "shape"), blind_value="red", max_train=2000, max_test=500, seed=3
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-data")
    return build_demo_data(root, SMALL)


@pytest.fixture(scope="module")
def splits(built):
    return {
        "student": read_jsonl(built.train_student),
        "teacher": read_jsonl(built.train_teacher),
        "test": read_jsonl(built.test),
    }


def answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def test_question_types_from_text():
    assert question_type("what color is the shape?") == "colour"
    assert question_type("what is the color of the triangle?") == "colour"
    assert question_type("what is the blue shape?") == "shape"
    assert question_type("what shape does the image contain?") == "shape"
    assert question_type("is there not a red shape in the image?") == "presence"
    with pytest.raises(ValueError, match="unknown type"):
        question_type("how many shapes are there?")
    with pytest.raises(ValueError, match="does not fit"):
        question_type("what color is the shape?", "circle")


def test_presence_questions_with_negation():
    assert presence_fact("is there a red shape?", "yes") == ("red", True)
    assert presence_fact("is there not a circle?", "yes") == ("circle", False)
    assert presence_fact("is no teal shape present?", "no") == ("teal", True)
    assert presence_fact("does the image not contain a triangle?", "no") == ("triangle", True)


def test_image_attributes_match_every_colour_and_shape_answer():
    samples, _ = load_easyvqa("test")
    assert all(s.colour in COLOURS and s.shape in SHAPES for s in samples)
    for s in samples:
        if s.qtype == "colour":
            assert s.answer == s.colour, s.id
        if s.qtype == "shape":
            assert s.answer == s.shape, s.id


def test_counts_and_question_mix(built, splits):
    assert len(splits["student"]) == SMALL.max_train
    assert len(splits["test"]) == SMALL.max_test
    counts = built.manifest["counts"]
    assert counts == {
        "train_student": len(splits["student"]),
        "train_teacher": len(splits["teacher"]),
        "test": len(splits["test"]),
    }
    for records in splits.values():
        assert {r["meta"]["qtype"] for r in records} == set(SMALL.qtypes)


def test_llava_format_and_images_exist(built, splits):
    for record in splits["student"][:50] + splits["test"][:50]:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert (built.image_folder / record["image"]).is_file()
    ids = [r["id"] for r in splits["student"]]
    assert len(set(ids)) == len(ids)


def test_noise_share_and_same_type_wrong_answers(splits):
    student = splits["student"]
    noisy = [r for r in student if r["meta"]["noisy"]]
    assert len(noisy) == round(SMALL.noise_rate * len(student))
    for record in noisy:
        meta = record["meta"]
        assert answer(record) != meta["original_answer"]
        assert answer(record) in ANSWERS_BY_QTYPE[meta["qtype"]]
    for record in student:
        if not record["meta"]["noisy"]:
            assert answer(record) == record["meta"]["original_answer"]


def test_test_split_and_teacher_split_are_clean(splits):
    for name in ("teacher", "test"):
        for record in splits[name]:
            assert not record["meta"]["noisy"]
            assert answer(record) == record["meta"]["original_answer"]


def test_blind_slice_only_in_student_and_test(splits):
    for records in splits.values():
        for record in records:
            assert record["meta"]["blind"] == (record["meta"]["colour"] == SMALL.blind_value)
    assert not any(r["meta"]["blind"] for r in splits["teacher"])
    assert any(r["meta"]["blind"] for r in splits["student"])
    assert any(r["meta"]["blind"] for r in splits["test"])
    teacher_ids = {r["id"] for r in splits["teacher"]}
    for record in splits["student"]:
        # The teacher learns from every question outside its slice, the student's included.
        assert (record["id"] in teacher_ids) == (not record["meta"]["blind"])


def test_teacher_split_ignores_the_students_budget(built, splits):
    train, _ = load_easyvqa("train")
    outside = [s for s in train if s.qtype in SMALL.qtypes and s.colour != SMALL.blind_value]
    assert len(splits["teacher"]) == len(outside) > len(splits["student"])
    assert replace(SMALL, max_train=10, noise_rate=0.4).teacher_key() == SMALL.teacher_key()
    assert replace(SMALL, blind_value="green").teacher_key() != SMALL.teacher_key()


def test_blind_slice_by_shape(tmp_path):
    config = replace(
        SMALL, blind_attribute="shape", blind_value="circle", max_train=300, teacher_max_train=200
    )
    data = build_demo_data(tmp_path, config)
    teacher = read_jsonl(data.train_teacher)
    student = read_jsonl(data.train_student)
    assert len(teacher) == 200
    assert all(r["meta"]["shape"] != "circle" for r in teacher)
    assert any(r["meta"]["blind"] and r["meta"]["shape"] == "circle" for r in student)


def test_build_is_cached_and_keyed_by_config(built, tmp_path):
    stamp = built.train_student.stat().st_mtime_ns
    again = build_demo_data(built.root, SMALL)
    assert again.manifest == built.manifest
    assert built.train_student.stat().st_mtime_ns == stamp  # not rewritten
    assert replace(SMALL, noise_rate=0.3).key() != SMALL.key()
    assert json.loads((built.root / "manifest.json").read_text())["key"] == SMALL.key()


def test_changed_config_rebuilds(tmp_path):
    first = build_demo_data(tmp_path, replace(SMALL, max_train=200, max_test=50))
    second = build_demo_data(tmp_path, replace(SMALL, max_train=300, max_test=50))
    assert first.manifest["key"] != second.manifest["key"]
    assert len(read_jsonl(second.train_student)) == 300


def test_noise_is_seeded_and_keeps_originals():
    samples, _ = load_easyvqa("test")
    samples = [s for s in samples if s.qtype in ("colour", "shape")][:400]
    before = [s.answer for s in samples]
    a = inject_noise(samples, 0.25, seed=7)
    b = inject_noise(samples, 0.25, seed=7)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert [s.answer for s in samples] == before
    assert sum(s.noisy for s in a) == 100


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="qtypes"):
        DemoDataConfig(qtypes=("count",))
    with pytest.raises(ValueError, match="blind_value"):
        DemoDataConfig(blind_attribute="shape", blind_value="red")
    with pytest.raises(ValueError, match="noise_rate"):
        DemoDataConfig(noise_rate=1.5)


def test_tokenizer_makes_every_answer_one_token(tmp_path: Path):
    tokenizer = train_demo_tokenizer(tmp_path / "tok")
    for answers in ANSWERS_BY_QTYPE.values():
        for word in answers:
            assert len(tokenizer.tokenize(word)) == 1, word
    again = train_demo_tokenizer(tmp_path / "tok")
    assert again.get_vocab() == tokenizer.get_vocab()
