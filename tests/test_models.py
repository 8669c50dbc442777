"""Model loading, family adapters and the vocabulary contract."""

from __future__ import annotations

import pytest
import torch

from betakd.models import (
    check_same_vocabulary,
    get_adapter,
    load_model,
    load_processor,
    slice_vocab,
    vocab_rows,
)
from betakd.testing.tiny_models import build_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer


def test_frozen_teacher_in_other_dtype(tiny_model_dir):
    teacher = load_model(tiny_model_dir("llava", "teacher"), dtype="bfloat16", frozen=True)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.bfloat16
    student = load_model(tiny_model_dir("llava"), dtype=torch.float32)
    assert all(p.requires_grad for p in student.parameters())


def test_unknown_dtype_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir("llama"), dtype="float8")


@pytest.mark.parametrize(
    ("family", "multimodal", "extra"),
    [
        ("llava", True, set()),
        ("qwen2_vl", True, {"mm_token_type_ids"}),
        ("qwen2_5_vl", True, set()),
        ("idefics3", True, set()),
        ("llama", False, set()),
    ],
)
def test_adapters(family, multimodal, extra, tiny_model_dir):
    path = tiny_model_dir(family)
    model = load_model(path)
    processor = load_processor(path)
    adapter = get_adapter(model, processor)
    assert adapter.multimodal is multimodal
    ids = torch.tensor([[300, 301, 302, 302]])
    assert set(adapter.extra_inputs(ids)) == extra
    if multimodal:
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        assert adapter.image_token_id == image_id
        assert adapter.image_mask(torch.tensor([[image_id, 300]])).tolist() == [[True, False]]
    else:
        assert adapter.image_token_id is None
        assert not adapter.image_mask(ids).any()
        with pytest.raises(ValueError, match="text-only"):
            adapter.visual_tokens(None, [0])


def test_qwen2_vl_marks_image_tokens_for_mrope(tiny_model_dir):
    path = tiny_model_dir("qwen2_vl")
    adapter = get_adapter(load_model(path), load_processor(path))
    image_id = adapter.image_token_id
    out = adapter.extra_inputs(torch.tensor([[4, image_id, image_id, 9]]))
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 1, 0]]


def test_idefics3_markers_count_as_image_tokens(tiny_model_dir):
    path = tiny_model_dir("idefics3")
    processor = load_processor(path)
    adapter = get_adapter(load_model(path), processor)
    fake = processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert fake in adapter.image_token_ids
    with pytest.raises(ValueError, match="needs its processor"):
        get_adapter(load_model(path))


def test_unsupported_multimodal_family_is_an_error(tiny_model_dir):
    config = load_model(tiny_model_dir("llava")).config
    config.model_type = "paligemma"
    with pytest.raises(ValueError, match="'paligemma' is not supported"):
        get_adapter(config)


def test_same_vocabulary_passes(tiny_tokenizer, tiny_model_dir):
    check_same_vocabulary(load_processor(tiny_model_dir("llava")), tiny_tokenizer)


def test_vocabulary_mismatch_is_a_clear_error(tiny_tokenizer):
    # Same size, different merges: comparing sizes alone would not catch it.
    words = [f"zebra{i} quokka{i * 7} xylophone{i * 13}" for i in range(300)]
    other = train_tokenizer(words, vocab_size=512)
    assert len(other) == len(tiny_tokenizer)
    with pytest.raises(ValueError, match="vocabularies differ.*only in teacher"):
        check_same_vocabulary(tiny_tokenizer, other)


def test_padding_rows_are_sliced(tiny_tokenizer):
    student, _ = build_tiny_model("llama", tiny_tokenizer)
    teacher, _ = build_tiny_model("llama", tiny_tokenizer, size="teacher")
    teacher.resize_token_embeddings(len(tiny_tokenizer) + 64)  # padded, like many checkpoints
    rows = vocab_rows(tiny_tokenizer, student, teacher)
    assert rows == 512
    logits = teacher(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == 576
    assert slice_vocab(logits, rows).shape[-1] == 512


def test_fewer_rows_than_tokens_is_an_error(tiny_tokenizer):
    model, _ = build_tiny_model("llama", tiny_tokenizer)
    model.resize_token_embeddings(500)
    with pytest.raises(ValueError, match="500 output rows"):
        vocab_rows(tiny_tokenizer, model)
    with pytest.raises(ValueError, match="fewer than"):
        slice_vocab(torch.zeros(2, 500), 512)
