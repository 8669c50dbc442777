"""LLaVA-format data: parsing, answer-only labels, skip accounting, collation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from betakd.data import (
    DataCache,
    DataError,
    KDCollator,
    SampleEncoder,
    SkipReport,
    SkipSample,
    build_dataset,
    open_image,
    parse_record,
)
from betakd.labels import IGNORE_INDEX
from betakd.models import forward_inputs, get_adapter, load_model, load_processor
from betakd.testing.tiny_models import FAMILIES


def encoder_for(path, max_length=None):
    processor = load_processor(path)
    model_config = load_model(path).config
    return SampleEncoder(processor, get_adapter(model_config, processor), max_length)


def answer_text(batch, encoder, row):
    labels = batch["labels"][row]
    return encoder.tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_parse_record_places_image_and_roles(llava_files, tmp_path):
    rec = llava_files.record("a", "What colour?", "red", "x.png")
    conv = parse_record(rec, 3, tmp_path)
    assert conv.id == "a" and conv.index == 3
    assert conv.image_paths == (tmp_path / "x.png",)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0]["content"][0] == {"type": "image"}


def test_parse_record_without_placeholder_prepends_image(llava_files, tmp_path):
    rec = llava_files.record("a", "What colour?", "red", None)
    rec["image"] = "x.png"
    conv = parse_record(rec, 0, tmp_path)
    assert conv.messages[0]["content"][0] == {"type": "image"}


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([{"from": "human", "value": "hi"}], "no_assistant_turn"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], "empty_answer"),
        ([{"from": "robot", "value": "hi"}], "bad_record"),
        ([{"from": "human", "value": "How many?"}, {"from": "gpt", "value": 3}], "bad_record"),
        ([{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "yes"}], "bad_record"),
        ([{"from": "human", "value": " "}, {"from": "gpt", "value": "yes"}], "bad_record"),
    ],
)
def test_parse_record_rejects(turns, reason):
    with pytest.raises(SkipSample) as err:
        parse_record({"id": "z", "conversations": turns}, 0, None)
    assert err.value.reason == reason


def test_a_non_string_value_names_its_turn_and_type():
    turns = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": 3}]
    with pytest.raises(SkipSample, match=r"conversations\[1\]\.value is a int \(3\)"):
        parse_record({"id": "z", "conversations": turns}, 0, None)


def test_empty_strings_name_their_field():
    turns = [{"from": "human", "value": ""}, {"from": "gpt", "value": "yes"}]
    with pytest.raises(SkipSample, match=r"conversations\[0\]\.value is empty"):
        parse_record({"id": "z", "conversations": turns}, 0, None)
    turns[0]["value"] = "hi"
    with pytest.raises(SkipSample, match="field 'id' is an empty string"):
        parse_record({"id": "", "conversations": turns}, 0, None)
    # An image alone is a question (LLaVA puts it before the first human turn).
    with_image = {"id": "z", "image": "a.png", "conversations": [{**turns[0], "value": ""}, turns[1]]}  # fmt: skip
    assert parse_record(with_image, 0, None).messages[0]["content"] == [{"type": "image"}]


def test_an_image_path_that_is_a_folder_is_named_as_one(tmp_path):
    (tmp_path / "shapes").mkdir()
    with pytest.raises(SkipSample, match="is a folder, not an image file") as err:
        open_image(tmp_path / "shapes")
    assert err.value.reason == "missing_image"
    with pytest.raises(SkipSample, match="no file at"):
        open_image(tmp_path / "nowhere.png")


def test_labels_cover_only_answers(tiny_model_dir, vqa_data):
    path = tiny_model_dir("llava")
    encoder = encoder_for(path)
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, [encoder])
    batch = KDCollator(encoder)([dataset[0], dataset[1]])
    assert answer_text(batch, encoder, 0) == "red<|im_end|>"
    assert answer_text(batch, encoder, 1) == "no<|im_end|>"
    # The prompt (with its 16 image tokens) is unlabelled.
    image_id = encoder.adapter.image_token_id
    assert (batch["input_ids"][0] == image_id).sum() == 16
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()


def test_multi_turn_labels_every_answer(llava_files, tiny_model_dir, tmp_path):
    llava_files.write_image(tmp_path / "i.png")
    rec = {
        "id": "m",
        "image": "i.png",
        "conversations": [
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Shape?"},
            {"from": "gpt", "value": "a circle"},
        ],
    }
    data = llava_files.write_records(tmp_path / "d.jsonl", [rec])
    encoder = encoder_for(tiny_model_dir("llava"))
    batch = KDCollator(encoder)(list(build_dataset(data, tmp_path, [encoder])))
    assert answer_text(batch, encoder, 0) == "red<|im_end|>a circle<|im_end|>"


def test_skips_are_counted_with_reasons_and_logged(llava_files, tiny_model_dir, tmp_path, caplog):
    images = tmp_path / "images"
    llava_files.write_image(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    records = [
        llava_files.record(f"ok{i}", "What colour is the shape?", "red", "ok.png")
        for i in range(10)
    ] + [
        llava_files.record("missing", "What colour?", "red", "nowhere.png"),
        llava_files.record("corrupt", "What colour?", "red", "corrupt.png"),
        llava_files.record("long", "What colour? " + "very " * 60, "red", "ok.png"),
        llava_files.record("empty", "What colour?", "", "ok.png"),
        {
            "id": "noanswer",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>"}],
        },
        llava_files.record("ok3", "What colour is the shape?", "red", "ok.png"),
        {
            "id": "number",
            "image": "ok.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many shapes?"},
                {"from": "gpt", "value": 3},
            ],
        },
    ]
    data = llava_files.write_records(tmp_path / "d.json", records)
    encoder = encoder_for(tiny_model_dir("llava"), max_length=64)
    with caplog.at_level(logging.WARNING, logger="betakd.data"):
        dataset = build_dataset(data, images, [encoder], max_skip_fraction=0.5)
    report = dataset.report
    assert len(dataset) == 10 and report.total == 17 and report.count == 7
    assert report.counts() == {
        "missing_image": 1,
        "corrupt_image": 1,
        "too_long": 1,
        "empty_answer": 1,
        "no_assistant_turn": 1,
        "bad_record": 1,
        "duplicate_id": 1,
    }
    assert "nowhere.png" in caplog.text and "corrupt.png" in caplog.text
    assert "noanswer" in caplog.text and "id 'ok3' appeared earlier" in caplog.text
    assert "conversations[1].value is a int (3), not a string" in caplog.text
    # Which model's encoding was too long, and its limit.
    (too_long,) = report.skipped["too_long"]
    assert too_long.startswith("long: encoder 0's encoding: ") and "max_length=64" in too_long
    # The first of two samples with one id is the one kept.
    assert [c.index for c in dataset if c.id == "ok3"] == [3]
    with pytest.raises(DataError, match="max_skip_fraction=0.1"):
        build_dataset(data, images, [encoder], max_skip_fraction=0.1)


def test_truncation_keeps_images_and_cuts_answer(llava_files, tiny_model_dir, tmp_path):
    llava_files.write_image(tmp_path / "i.png")
    data = llava_files.write_records(
        tmp_path / "d.json", [llava_files.record("t", "Describe.", "a long answer " * 20, "i.png")]
    )
    encoder = encoder_for(tiny_model_dir("llava"), max_length=40)
    batch = KDCollator(encoder)(list(build_dataset(data, tmp_path, [encoder])))
    assert batch["input_ids"].shape[1] == 40
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_an_answer_cut_for_one_model_only_is_a_counted_skip_with_equal_answers(
    llava_pair, llava_files, tmp_path
):
    """The student's 16 image tokens leave room for the whole answer, the teacher's 64
    do not: trimmed alignment by default, a too_long skip when several teachers need
    every model to keep the same answer tokens."""
    llava_files.write_image(tmp_path / "i.png")
    records = [
        llava_files.record("long", "Describe.", "a long answer " * 8, "i.png"),
        llava_files.record("short", "Colour?", "red", "i.png"),
    ]
    data = llava_files.write_records(tmp_path / "d.json", records)
    student, teacher = (encoder_for(p, max_length=110) for p in llava_pair)
    encoders = {"student": student, "teacher big": teacher}
    assert len(build_dataset(data, tmp_path, encoders, max_skip_fraction=1.0)) == 2
    dataset = build_dataset(
        data, tmp_path, encoders, max_skip_fraction=1.0, equal_answers=list(encoders)
    )
    assert [c.id for c in dataset] == ["short"]
    (skip,) = dataset.report.skipped["too_long"]
    assert skip.startswith("long:") and "'teacher big'" in skip, skip


def test_teacher_and_student_batches_differ_in_image_tokens(llava_pair, vqa_data):
    student, teacher = (encoder_for(p) for p in llava_pair)
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, {"student": student, "teacher": teacher})
    collate = KDCollator(student, {None: teacher}, teacher_padding_side="left")
    batch = collate([dataset[i] for i in range(4)])
    image_id = student.adapter.image_token_id
    assert (batch["input_ids"][0] == image_id).sum() == 16
    assert (batch["teacher"][None]["input_ids"][0] == image_id).sum() == 64
    assert batch["sample_ids"] == ["s0", "s1", "s2", "s3"]
    assert batch["sample_index"].tolist() == [0, 1, 2, 3]
    assert batch["image_counts"].tolist() == [1, 1, 1, 1]
    # Left padding: the last column is real for every teacher row.
    assert batch["teacher"][None]["attention_mask"][:, -1].all()
    for row in range(4):
        assert answer_text(batch, student, row) == answer_text(batch["teacher"][None], teacher, row)


def test_skip_report_enforce_messages():
    report = SkipReport(total=4)
    report.add("missing_image", "a", "no file at /x.png")
    report.enforce(0.25)
    with pytest.raises(DataError, match=r"missing_image=1 \(e.g. a: no file at /x.png\)"):
        report.enforce(0.2)
    with pytest.raises(DataError, match="no records"):
        SkipReport(total=0).enforce(1.0)


def test_text_only_model_skips_image_samples(llava_files, tiny_model_dir, tmp_path):
    llava_files.write_image(tmp_path / "i.png")
    recs = [llava_files.record(f"t{i}", "Say hi.", "hi", None) for i in range(3)]
    recs.append(llava_files.record("img", "What colour?", "red", "i.png"))
    data = llava_files.write_records(tmp_path / "d.jsonl", recs)
    encoder = encoder_for(tiny_model_dir("llama"))
    dataset = build_dataset(data, tmp_path, [encoder], max_skip_fraction=0.3)
    assert dataset.report.counts()["bad_record"] == 1
    batch = KDCollator(encoder)(list(dataset))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert "pixel_values" not in batch
    assert answer_text(batch, encoder, 0) == "hi<|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_with_collated_batch(llava_files, family, tiny_model_dir, tmp_path):
    images = tmp_path / "images"
    with_image = family != "llama"
    recs = []
    for i, colour in enumerate(["red", "blue", "green"]):
        if with_image:
            llava_files.write_image(images / f"{i}.png", colour, size=(32 + 8 * i, 32))
        recs.append(
            llava_files.record(
                f"f{i}", "What colour is it?", colour, f"{i}.png" if with_image else None
            )
        )
    if with_image:  # a text-only sample in the same batch
        recs.append(llava_files.record("text", "Say yes.", "yes", None))
    data = llava_files.write_records(tmp_path / "d.json", recs)
    path = tiny_model_dir(family)
    model = load_model(path)
    processor = load_processor(path)
    encoder = SampleEncoder(processor, get_adapter(model, processor))
    batch = KDCollator(encoder)(list(build_dataset(data, images, [encoder])))
    model.train()
    out = model(**forward_inputs(batch, encoder.adapter), labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3])
    if with_image:
        visual = encoder.adapter.visual_tokens(out, batch["image_counts"].tolist())
        assert [v.shape[0] > 0 for v in visual] == [True, True, True, False]


VICUNA_STYLE = (
    "{%- if messages[0]['role'] != 'system' -%}A chat between a user and an assistant. {% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}USER: "
    "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}<image>\n"
    "{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%} "
    "{%- elif m['role'] == 'assistant' -%}ASSISTANT: {{ m['content'][0]['text'] }}</s>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def test_other_chat_template_with_default_system_prompt(llava_files, tiny_model_dir, tmp_path):
    """A template unlike ChatML still yields answer-only labels."""
    path = tiny_model_dir("llava")
    processor = load_processor(path)
    processor.chat_template = VICUNA_STYLE
    encoder = SampleEncoder(processor, get_adapter(load_model(path).config, processor))
    llava_files.write_image(tmp_path / "i.png")
    data = llava_files.write_records(
        tmp_path / "d.json", [llava_files.record("v", "What colour?", "red", "i.png")]
    )
    batch = KDCollator(encoder)(list(build_dataset(data, tmp_path, [encoder])))
    # "ASSISTANT:" ends the generation prompt, so the answer starts with the space.
    assert answer_text(batch, encoder, 0) == " red</s>"
    prompt = encoder.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX])
    assert prompt.startswith("A chat between") and prompt.endswith("ASSISTANT:")


def test_a_shared_data_cache_validates_once_per_data_file_contents(llava_pair, vqa_data, tmp_path):
    data_file, images = vqa_data
    cache = DataCache()
    processor = load_processor(llava_pair[0])
    adapter = get_adapter(load_model(llava_pair[0]).config, processor)
    encoder = SampleEncoder(processor, adapter, cache=cache)
    encoded = []
    real_encode = encoder.encode

    def counting(conversation, images):
        encoded.append(conversation.id)
        return real_encode(conversation, images)

    encoder.encode = counting
    first = build_dataset(data_file, images, [encoder], cache=cache)
    assert len(encoded) == 6
    # A second run (a fresh encoder, as a new training run builds) reuses the validation
    # and the encodings; the collator reads encodings from the cache too.
    again = SampleEncoder(processor, adapter, cache=cache)
    again.encode = counting
    second = build_dataset(data_file, images, [again], cache=cache)
    KDCollator(again)(list(second))
    assert len(encoded) == 6 and [c.id for c in second] == [c.id for c in first]
    # The same file with other contents is validated afresh (the key is the contents).
    records = json.loads(data_file.read_text())
    records[0]["conversations"][1]["value"] = "purple"
    data_file.write_text(json.dumps(records))
    build_dataset(data_file, images, [again], cache=cache)
    assert encoded[6:] == ["s0"]  # only the changed sample needed a new encoding
    # Nothing is kept per process: an encoder with a cache of its own encodes again.
    fresh = SampleEncoder(processor, adapter)
    fresh.encode = counting
    build_dataset(data_file, images, [fresh])
    assert len(encoded) == 13
