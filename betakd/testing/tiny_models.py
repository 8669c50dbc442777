"""Tiny randomly initialised models of real families, built offline.

Tests, benchmarks and the demo need real architectures (LLaVA, LLaVA-NeXT,
LLaVA-OneVision, Gemma 3, InternVL, Qwen2-VL, Qwen2.5-VL, Idefics3, Llama) without
downloading weights. This module holds one builder per family (``FAMILIES``), the
model sizes (:class:`TinyDims`, ``PRESETS``), :func:`build_tiny_model` and
:func:`save_tiny_model`. Everything builds from configs, uses the shared tokenizer of
:mod:`betakd.testing.tiny_tokenizer`, and saves with ``save_pretrained`` so that the
Auto classes reload it with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from betakd.processors import (
    InternVLImageOnlyProcessor,
    LlavaOnevisionImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
)
from betakd.testing.tiny_tokenizer import (
    GEMMA3_TOKENS,
    IMAGE_TOKEN,
    INTERNVL_TOKENS,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    family_tokenizer,
    named_tokens_tokenizer,
    train_tokenizer,
)

# "idefics3_split": Idefics3 with image splitting on (as SmolVLM's processors default to):
# an image becomes tiles plus a global view, so image-token counts follow image sizes.
FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "gemma3",
    "internvl",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "idefics3_split",
    "llama",
)


@dataclass(frozen=True)
class TinyDims:
    """Sizes of a tiny model; `size="student"|"teacher"` picks a preset."""

    hidden: int = 32
    layers: int = 1
    heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 1
    patch_size: int = 8


PRESETS = {
    "student": TinyDims(hidden=32, layers=1, vision_hidden=16, patch_size=8),
    "teacher": TinyDims(hidden=64, layers=2, vision_hidden=32, patch_size=4),
}


def _dims(size: str | TinyDims, overrides: dict) -> TinyDims:
    if isinstance(size, TinyDims):
        base = size
    elif size in PRESETS:
        base = PRESETS[size]
    else:
        raise ValueError(f"size must be one of {sorted(PRESETS)} or a TinyDims, got {size!r}")
    unknown = set(overrides) - set(TinyDims.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tiny-model dimensions: {sorted(unknown)}")
    return replace(base, **overrides)


def _text_config(tokenizer: PreTrainedTokenizerFast, dims: TinyDims, config_cls=LlamaConfig, **kw):
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden,
        intermediate_size=2 * dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **kw,
    )


def _check_square(image_size: int, patch_size: int, factor: int = 1) -> int:
    if image_size % (patch_size * factor):
        raise ValueError(
            f"image_size={image_size} must be a multiple of patch_size*{factor}={patch_size * factor}"
        )
    return image_size // patch_size


def _clip_vision_config(dims: TinyDims, image_size: int) -> CLIPVisionConfig:
    """The CLIP tower of the LLaVA families."""
    return CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.heads,
        image_size=image_size,
        patch_size=dims.patch_size,
        projection_dim=dims.vision_hidden,
    )


def _build_llava(tokenizer, dims: TinyDims, image_size: int):
    grid = _check_square(image_size, dims.patch_size)
    vision = _clip_vision_config(dims, image_size)
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, dims),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=grid * grid,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    tok = family_tokenizer(tokenizer, "llava")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=dims.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tok.chat_template,
    )
    return model, processor


def _build_llava_next(tokenizer, dims: TinyDims, image_size: int):
    """LLaVA-NeXT: an image becomes a base view plus the tiles of the grid (from
    ``image_grid_pinpoints``) that fits its aspect ratio, so the token count follows
    the image's size."""
    _check_square(image_size, dims.patch_size)
    pinpoints = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    vision = _clip_vision_config(dims, image_size)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, dims),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    model = LlavaNextForConditionalGeneration(config)
    tok = family_tokenizer(tokenizer, "llava_next")
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=dims.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tok.chat_template,
    )
    return model, processor


def _build_llava_onevision(tokenizer, dims: TinyDims, image_size: int):
    """LLaVA-OneVision: SigLIP tiles as in LLaVA-NeXT (a base view plus the grid that
    fits each image), all patch features kept ("full"); images only (no video
    processor, see :class:`betakd.processors.LlavaOnevisionImageOnlyProcessor`)."""
    grid = _check_square(image_size, dims.patch_size)
    pinpoints = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    vision = SiglipVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.heads,
        image_size=image_size,
        patch_size=dims.patch_size,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, dims),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    tok = family_tokenizer(tokenizer, "llava_onevision")
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=grid * grid,
        vision_feature_select_strategy="full",
        chat_template=tok.chat_template,
    )
    return model, processor


def _build_gemma3(tokenizer, dims: TinyDims, image_size: int):
    """Gemma 3: SigLIP patches average-pooled to a fixed number of tokens per image
    (pan and scan off), between begin/end-of-image tokens."""
    grid = _check_square(image_size, dims.patch_size)
    tok = named_tokens_tokenizer(tokenizer, "gemma3", GEMMA3_TOKENS)
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=dims.hidden,
        intermediate_size=2 * dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=1,
        head_dim=dims.hidden // dims.heads,
        sliding_window=64,
        pad_token_id=tok.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.heads,
        image_size=image_size,
        patch_size=dims.patch_size,
    )
    tokens_per_image = max(1, (grid // 2) ** 2)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        tie_word_embeddings=False,
    )
    model = Gemma3ForConditionalGeneration(config)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
        image_seq_length=tokens_per_image,
        chat_template=tok.chat_template,
    )
    return model, processor


def _build_internvl(tokenizer, dims: TinyDims, image_size: int):
    """InternVL: an image becomes 1-4 tiles of ``image_size`` (by its aspect ratio), each a
    separate image to the vision tower, whose patch grid is pixel-shuffled to a quarter."""
    grid = _check_square(image_size, dims.patch_size, 2)
    named = {**INTERNVL_TOKENS, "video_token": VIDEO_TOKEN}
    tok = named_tokens_tokenizer(tokenizer, "internvl", named)
    vision = InternVLVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.heads,
        image_size=[image_size, image_size],
        patch_size=[dims.patch_size, dims.patch_size],
    )
    text = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=dims.hidden,
        intermediate_size=2 * dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,
    )
    processor = InternVLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=(grid // 2) ** 2,
        chat_template=tok.chat_template,
    )
    return model, processor


def _qwen_vision_config(family: str, dims: TinyDims, merge: int) -> dict:
    common = {
        "depth": dims.vision_layers,
        "num_heads": dims.heads,
        "patch_size": dims.patch_size,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if family == "qwen2_vl":
        # `hidden_size` is the merger's output, i.e. the language model's width.
        return {
            **common,
            "embed_dim": dims.vision_hidden,
            "hidden_size": dims.hidden,
            "mlp_ratio": 2,
        }
    # Qwen2.5-VL: windowed attention; one full-attention block keeps tiny grids simple.
    return {
        **common,
        "hidden_size": dims.vision_hidden,
        "intermediate_size": 2 * dims.vision_hidden,
        "out_hidden_size": dims.hidden,
        "window_size": 4 * dims.patch_size * merge,
        "fullatt_block_indexes": list(range(dims.vision_layers)),
    }


def _build_qwen_vl(tokenizer, dims: TinyDims, image_size: int, family: str):
    merge = 2
    _check_square(image_size, dims.patch_size, merge)
    head_dim = dims.hidden // dims.heads
    # Multimodal RoPE splits half the head dimension into (time, height, width).
    quarter = head_dim // 4
    mrope_section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    text = _text_config(
        tokenizer,
        dims,
        config_cls=dict,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": mrope_section,
            "rope_theta": 10000.0,
        },
    )
    text.pop("tie_word_embeddings")
    config_cls, model_cls = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[family]
    config = config_cls(
        text_config=text,
        vision_config=_qwen_vision_config(family, dims, merge),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        tie_word_embeddings=False,
    )
    model = model_cls(config)
    tok = family_tokenizer(tokenizer, family)
    pixels = image_size * image_size
    # min = max pixels pins every image to one square grid, like a fixed-resolution tower.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=dims.patch_size,
        merge_size=merge,
        temporal_patch_size=2,
    )
    processor = Qwen2VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )
    return model, processor


def _build_idefics3(tokenizer, dims: TinyDims, image_size: int, splitting: bool = False):
    scale = 2
    grid = _check_square(image_size, dims.patch_size, scale)
    vision = Idefics3VisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.heads,
        image_size=image_size,
        patch_size=dims.patch_size,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=_text_config(tokenizer, dims),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config)
    tok = family_tokenizer(tokenizer, "idefics3")
    # With splitting, images up to twice the tile size become up to 2 x 2 tiles (each
    # image_size square) plus the whole image resized to one tile.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=splitting,
        size={"longest_edge": 2 * image_size if splitting else image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(grid // scale) ** 2,
        chat_template=tok.chat_template,
    )
    return model, processor


def _build_llama(tokenizer, dims: TinyDims, image_size: int):
    del image_size  # text-only
    model = LlamaForCausalLM(_text_config(tokenizer, dims))
    return model, family_tokenizer(tokenizer, "llama")


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "gemma3": _build_gemma3,
    "internvl": _build_internvl,
    "qwen2_vl": partial(_build_qwen_vl, family="qwen2_vl"),
    "qwen2_5_vl": partial(_build_qwen_vl, family="qwen2_5_vl"),
    "idefics3": _build_idefics3,
    "idefics3_split": partial(_build_idefics3, splitting=True),
    "llama": _build_llama,
}


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    size: str | TinyDims = "student",
    image_size: int = 32,
    seed: int = 0,
    **dims,
) -> tuple[PreTrainedModel, object]:
    """Return `(model, processor)`; the processor is a tokenizer for "llama".

    `dims` overrides fields of the preset (hidden, layers, heads, vision_hidden,
    vision_layers, patch_size), e.g. a teacher with another patch size gets a
    different number of image tokens from the same tokenizer.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer()
    resolved = _dims(size, dims)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer, resolved, image_size)
    model.eval()
    return model, processor


def save_tiny_model(
    family: str, path: str | Path, tokenizer: PreTrainedTokenizerFast | None = None, **kw
) -> Path:
    """Build a tiny model and save model + processor under `path`; returns `path`."""
    path = Path(path)
    model, processor = build_tiny_model(family, tokenizer, **kw)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
