"""Tiny offline models: tokenizer, builders, save and offline reload per family."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from betakd.models import get_adapter, load_model, load_processor, tokenizer_of
from betakd.testing.tiny_models import FAMILIES, TinyDims, build_tiny_model
from betakd.testing.tiny_tokenizer import (
    FAMILY_TOKENS,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    train_tokenizer,
)


def test_tokenizer_has_specials_and_template(tiny_tokenizer):
    assert len(tiny_tokenizer) == 512
    for token in SPECIAL_TOKENS:
        ids = tiny_tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
    assert tiny_tokenizer.image_token == IMAGE_TOKEN
    text = "What colour is the shape? ünïcode 42"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_is_deterministic():
    assert train_tokenizer().get_vocab() == train_tokenizer().get_vocab()


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="byte alphabet"):
        train_tokenizer(vocab_size=100)


def test_unknown_family_and_size():
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_model("gpt9")
    with pytest.raises(ValueError, match="size must be"):
        build_tiny_model("llama", size="huge")
    with pytest.raises(TypeError, match="unknown tiny-model dimensions"):
        build_tiny_model("llama", depth=3)


def test_seed_makes_builds_reproducible(tiny_tokenizer):
    a, _ = build_tiny_model("llama", tiny_tokenizer, seed=1)
    b, _ = build_tiny_model("llama", tiny_tokenizer, seed=1)
    c, _ = build_tiny_model("llama", tiny_tokenizer, seed=2)
    wa, wb, wc = (m.get_output_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_llava_teacher_and_student_differ_in_image_tokens(tiny_tokenizer):
    image = Image.new("RGB", (32, 32))
    counts = {}
    for size in ("student", "teacher"):
        model, processor = build_tiny_model("llava", tiny_tokenizer, size=size)
        enc = processor(text=["<image>hi"], images=[[image]], return_tensors="pt")
        counts[size] = int((enc["input_ids"] == model.config.image_token_id).sum())
        out = model(**enc)
        assert out.image_outputs.pooler_output[0].shape == (
            counts[size],
            model.config.text_config.hidden_size,
        )
    assert counts == {"student": 16, "teacher": 64}


def test_explicit_dims_override_preset(tiny_tokenizer):
    model, processor = build_tiny_model(
        "llava",
        tiny_tokenizer,
        size=TinyDims(hidden=48, vision_hidden=24, patch_size=16),
        image_size=64,
    )
    assert model.config.text_config.hidden_size == 48
    assert model.config.vision_config.hidden_size == 24
    assert processor.patch_size == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_offline_reload(family, tiny_model_dir, tiny_tokenizer):
    path = tiny_model_dir(family)
    model = load_model(path)
    processor = load_processor(path)
    # The reloaded tokenizer is the shared one (template per family); Gemma 3 and InternVL
    # append their image tokens, every shared token keeping its id.
    vocab, shared = tokenizer_of(processor).get_vocab(), tiny_tokenizer.get_vocab()
    extra = set(FAMILY_TOKENS.get(family, {}).values())
    assert vocab.items() >= shared.items() and set(vocab) - set(shared) == extra
    assert processor.chat_template
    adapter = get_adapter(model, processor)
    assert adapter.multimodal == (family != "llama")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 200_000
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
