"""Loading student, teacher and processor; every model-family quirk lives here.

Other modules ask a `FamilyAdapter` (chosen from the model's config) for what
differs between families: extra forward inputs, how per-sample image tensors
batch, where the projected visual tokens come from and which token ids belong
to an image. No other module branches on the family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
)

from betakd.processors import OWN_PROCESSORS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelError(ValueError):
    """A model betakd cannot use as brought (a family it does not know, a processor
    without a chat template, a teacher of another vocabulary); the message names it."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Accept a torch dtype, a name ("bfloat16", "bf16", ...) or "auto"."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def is_multimodal_config(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    frozen: bool = False,
) -> PreTrainedModel:
    """Load a VLM (AutoModelForImageTextToText) or a causal LM from `path`.

    `frozen=True` is for the teacher: eval mode and no parameter needs a gradient.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    adapter_spec(config)  # fail early on an unsupported family
    auto = AutoModelForImageTextToText if is_multimodal_config(config) else AutoModelForCausalLM
    model = auto.from_pretrained(
        path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def check_model_path(key: str, path: str | Path) -> None:
    """A model path that looks local must exist; hub ids are left to transformers, unless
    ``HF_HUB_OFFLINE=1`` forbids downloading them. ``key`` names the setting in errors."""
    path = str(path)
    local = Path(path)
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") > 1
    if looks_local and not local.expanduser().is_dir():
        raise FileNotFoundError(f"{key}: no model directory at {path}")
    if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"{key}: {path!r} is not a local directory and HF_HUB_OFFLINE=1 forbids downloads"
        )


@dataclass(frozen=True)
class LoadedModel:
    """A model with its processor (or tokenizer) and its family adapter."""

    model: PreTrainedModel
    processor: object
    adapter: FamilyAdapter

    @property
    def visual_width(self) -> int | None:
        return visual_width(self.model.config)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    frozen: bool = False,
    key: str = "model path",
) -> LoadedModel:
    """Model, processor and adapter from one folder (or hub id); see :func:`load_model`."""
    processor, adapter = load_interface(path, trust_remote_code=trust_remote_code, key=key)
    try:
        model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, frozen=frozen)
    except ModelError as err:
        raise ModelError(f"{key} ({path}): {err}") from err
    return LoadedModel(model, processor, adapter)


def load_interface(
    path: str | Path, *, trust_remote_code: bool = False, key: str = "model path"
) -> tuple[object, FamilyAdapter]:
    """A model's processor and family adapter without its weights: what encoding its
    data needs (a teacher served elsewhere shares the student's)."""
    check_model_path(key, path)
    try:
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        check_chat_template(processor)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return processor, get_adapter(config, processor)
    except ModelError as err:
        raise ModelError(f"{key} ({path}): {err}") from err


def check_chat_template(processor) -> None:
    """Prompts are built with the processor's chat template (the training data's turns
    and the evaluation prompts), so a model without one cannot be used."""
    templates = (getattr(processor, "chat_template", None), tokenizer_of(processor).chat_template)
    if not any(templates):
        raise ModelError(
            "the processor has no chat template, which betakd builds every prompt with; set "
            "processor.chat_template (or the tokenizer's) and save it with the model"
        )


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the first CUDA device when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def text_width(config: PretrainedConfig) -> int:
    """Hidden size of the language model (its hidden states and, in a VLM, the projected
    visual tokens spliced into it)."""
    return int(config.get_text_config().hidden_size)


def visual_width(config: PretrainedConfig) -> int | None:
    """Width of the projected visual tokens a VLM feeds its language model; None for a
    text-only model."""
    return text_width(config) if is_multimodal_config(config) else None


def load_processor(path: str | Path, *, trust_remote_code: bool = False):
    """The processor saved with the model (a tokenizer for a text-only model)."""
    own = OWN_PROCESSORS.get(_saved_processor_class(Path(path)))
    if own is not None:
        return own.from_pretrained(path)
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError) as err:
        # Video processors (Qwen2-VL, Qwen2.5-VL, ...) import torchvision.
        raise RuntimeError(
            f"cannot load the processor from {path}: {err}. If this family needs a video "
            "processor, install torchvision matching your torch build."
        ) from err


def _saved_processor_class(path: Path) -> str | None:
    config_file = path / "processor_config.json"
    if not config_file.is_file():
        return None
    with config_file.open(encoding="utf-8") as handle:
        return json.load(handle).get("processor_class")


def tokenizer_of(processor):
    """The tokenizer inside a processor, or the processor itself if it is one."""
    return getattr(processor, "tokenizer", processor)


# ---------------------------------------------------------------------------
# Vocabulary


def check_same_vocabulary(
    student_tokenizer, teacher_tokenizer, teacher_name: str | None = None
) -> None:
    """Logit KD needs token i to mean the same string for both models (``teacher_name``:
    which of several teachers, for the message)."""
    student_vocab = tokenizer_of(student_tokenizer).get_vocab()
    teacher_vocab = tokenizer_of(teacher_tokenizer).get_vocab()
    if student_vocab == teacher_vocab:
        return
    only_student = sorted(set(student_vocab) - set(teacher_vocab))
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
    moved = sorted(
        t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t]
    )
    teacher = "teacher" if teacher_name is None else f"teacher {teacher_name!r}"
    raise ModelError(
        f"student and {teacher} vocabularies differ, so their logits cannot be compared: "
        f"student has {len(student_vocab)} tokens, teacher {len(teacher_vocab)}; "
        f"only in student: {only_student[:5]}, only in teacher: {only_teacher[:5]}, "
        f"same token with another id: {moved[:5]}; to distil across tokenizers, set "
        f"{'teacher' if teacher_name is None else 'teachers.' + teacher_name}.cross_tokenizer: {{}} "
        "(docs/cross-tokenizer.md)"
    )


def output_rows(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def vocab_rows(tokenizer, *models: PreTrainedModel) -> int:
    """Number of logit columns that are real tokens.

    Embedding matrices are often padded (to a multiple of 64 or more); those rows
    are no token and are sliced away. Fewer rows than tokens is an error.
    """
    rows = len(tokenizer_of(tokenizer))
    for model in models:
        if output_rows(model) < rows:
            raise ValueError(
                f"{type(model).__name__} has {output_rows(model)} output rows but the tokenizer "
                f"has {rows} tokens"
            )
    return rows


def slice_vocab(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop padding columns beyond the real vocabulary."""
    if logits.shape[-1] < rows:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the {rows} tokens")
    return logits[..., :rows]


# ---------------------------------------------------------------------------
# Family adapters


def _concat_vision(per_sample: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Image tensors whose first dimension counts images or patches: concatenate."""
    present = [s for s in per_sample if s]
    if not present:
        return {}
    return {key: torch.cat([s[key] for s in present]) for key in present[0]}


def _pad_images_vision(per_sample: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors shaped [1, images, ...] per sample: pad the image axis with zeros.

    Idefics3 treats an all-zero image as padding, so samples without an image
    (or with fewer) can share a batch with others.
    """
    present = [s for s in per_sample if s]
    if not present:
        return {}
    batch = {}
    most = max(s["pixel_values"].shape[1] for s in present)
    for key, reference in present[0].items():
        shape = (len(per_sample), most, *reference.shape[2:])
        out = torch.zeros(shape, dtype=reference.dtype)
        for row, sample in enumerate(per_sample):
            if sample:
                out[row, : sample[key].shape[1]] = sample[key][0]
        batch[key] = out
    return batch


def _pad_tiles_vision(per_sample: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Any-resolution tiles (LLaVA-NeXT): ``pixel_values [images, tiles, C, H, W]`` with a
    tile count per image, zero-padded to the batch's most; the model reads each image's
    real count from ``image_sizes [images, 2]``, concatenated."""
    present = [s for s in per_sample if s]
    if not present:
        return {}
    pixels = [s["pixel_values"] for s in present]
    most = max(p.shape[1] for p in pixels)
    padded = pixels[0].new_zeros(sum(p.shape[0] for p in pixels), most, *pixels[0].shape[2:])
    row = 0
    for p in pixels:
        padded[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return {"pixel_values": padded, "image_sizes": torch.cat([s["image_sizes"] for s in present])}


@dataclass(frozen=True)
class FamilySpec:
    """What one model family needs; see `FamilyAdapter` for the bound version."""

    name: str
    multimodal: bool
    # Unit of `out.image_outputs.pooler_output`: one tensor per "image", per "sample", or
    # per "tile" (InternVL: each tile of an image is an image of its own to the model).
    visual_unit: str | None = None
    collate_vision: Callable[[Sequence[dict]], dict] = _concat_vision
    # The forward input that marks image tokens, computed from the padded ids (Qwen2-VL:
    # mm_token_type_ids; Gemma 3: token_type_ids, which it needs to train); None: none.
    image_type_ids: str | None = None
    # Config attributes naming token ids that belong to an image besides the image token.
    image_token_attrs: tuple[str, ...] = ()
    # Token strings that belong to an image (looked up in the tokenizer).
    image_token_strings: tuple[str, ...] = ()
    # Image tensors the processor returns and the forward takes.
    vision_keys: tuple[str, ...] = ("pixel_values",)


_SPECS = {
    "llava": FamilySpec("llava", True, visual_unit="image"),
    # Any-resolution tiling: image-token counts follow each image's size.
    "llava_next": FamilySpec(
        "llava_next",
        True,
        visual_unit="image",
        collate_vision=_pad_tiles_vision,
        vision_keys=("pixel_values", "image_sizes"),
    ),
    # Dynamic tiles, each a separate image to the vision tower (pixel_values rows).
    "internvl": FamilySpec(
        "internvl", True, visual_unit="tile", image_token_strings=("<img>", "</img>")
    ),
    # Fixed tokens per image (pan and scan off); image tokens between begin/end markers.
    "gemma3": FamilySpec(
        "gemma3",
        True,
        visual_unit="image",
        image_type_ids="token_type_ids",
        image_token_attrs=("boi_token_index", "eoi_token_index"),
    ),
    "llava_onevision": FamilySpec(
        "llava_onevision",
        True,
        visual_unit="image",
        collate_vision=_pad_tiles_vision,
        vision_keys=("pixel_values", "image_sizes"),
    ),
    "qwen2_vl": FamilySpec(
        "qwen2_vl",
        True,
        visual_unit="image",
        image_type_ids="mm_token_type_ids",
        image_token_attrs=("vision_start_token_id", "vision_end_token_id"),
        vision_keys=("pixel_values", "image_grid_thw"),
    ),
    "qwen2_5_vl": FamilySpec(
        "qwen2_5_vl",
        True,
        visual_unit="image",
        image_token_attrs=("vision_start_token_id", "vision_end_token_id"),
        vision_keys=("pixel_values", "image_grid_thw"),
    ),
    "idefics3": FamilySpec(
        "idefics3",
        True,
        visual_unit="sample",
        collate_vision=_pad_images_vision,
        vision_keys=("pixel_values", "pixel_attention_mask"),
        image_token_strings=(
            "<fake_token_around_image>",
            "<global-img>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
        ),
    ),
    "causal_lm": FamilySpec("causal_lm", False, vision_keys=()),
}
_SPECS["smolvlm"] = _SPECS["idefics3"]


def adapter_spec(config: PretrainedConfig) -> FamilySpec:
    model_type = config.model_type
    if model_type in _SPECS:
        return _SPECS[model_type]
    if not is_multimodal_config(config):
        return _SPECS["causal_lm"]
    supported = sorted(k for k in _SPECS if k != "causal_lm")
    raise ModelError(
        f"model type {model_type!r} is not supported for distillation (betakd does not know "
        f"where its image tokens are); supported VLMs: {supported} and any text-only causal LM"
    )


def _image_token_id(config: PretrainedConfig) -> int:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{config.model_type} config has no image_token_id")


@dataclass(frozen=True)
class FamilyAdapter:
    """A family's quirks bound to one model's token ids."""

    spec: FamilySpec
    image_token_id: int | None
    # Every token id that belongs to an image (placeholders, markers, tags).
    image_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def multimodal(self) -> bool:
        return self.spec.multimodal

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward inputs that depend on the final (padded) token ids."""
        if self.spec.image_type_ids is not None:
            marks = (input_ids == self.image_token_id).to(torch.int32)
            return {self.spec.image_type_ids: marks}
        return {}

    def visual_pieces(self, vision: dict[str, torch.Tensor], images: int) -> int:
        """How many entries of the visual output one sample's images give: its images,
        or its tiles where each tile is an image to the model (``visual_unit`` "tile")."""
        if self.spec.visual_unit == "tile":
            return int(vision["pixel_values"].shape[0]) if vision else 0
        return images

    def collate_vision(self, per_sample: Sequence[dict[str, torch.Tensor]]) -> dict:
        """Batch the image tensors that the processor returned per sample."""
        return self.spec.collate_vision(per_sample)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where a token belongs to an image (not text that both models share)."""
        if not self.image_token_ids:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        ids = torch.tensor(sorted(self.image_token_ids), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def visual_tokens(self, output, image_counts: Sequence[int]) -> list[torch.Tensor]:
        """Projected visual tokens per sample, each [n_tokens, hidden] (n=0 without image);
        ``image_counts``: each sample's :meth:`visual_pieces`.

        Comes from `out.image_outputs.pooler_output` (transformers 5): the
        projector's output, i.e. what is spliced into the language model.
        """
        if not self.multimodal:
            raise ValueError(f"{self.name} is a text-only model: it has no visual tokens")
        image_outputs = getattr(output, "image_outputs", None)
        if image_outputs is None or image_outputs.pooler_output is None:
            if sum(image_counts) == 0:
                return [torch.empty(0, 0) for _ in image_counts]
            raise ValueError(
                f"{self.name} forward output has no image_outputs.pooler_output; "
                "was pixel_values passed?"
            )
        pieces = list(image_outputs.pooler_output)
        if self.spec.visual_unit == "sample":
            return self._per_sample_units(pieces, image_counts)
        return self._group_images(pieces, image_counts)

    def _per_sample_units(self, pieces, image_counts):
        if len(pieces) != len(image_counts):
            raise ValueError(
                f"{self.name}: {len(pieces)} visual outputs for a batch of {len(image_counts)}"
            )
        return [p.reshape(-1, p.shape[-1]) for p in pieces]

    def _group_images(self, pieces, image_counts):
        if len(pieces) != sum(image_counts):
            raise ValueError(
                f"{self.name}: {len(pieces)} visual outputs for {sum(image_counts)} images"
            )
        width = pieces[0].shape[-1] if pieces else 0
        grouped, start = [], 0
        for count in image_counts:
            mine = [p.reshape(-1, width) for p in pieces[start : start + count]]
            start += count
            grouped.append(torch.cat(mine) if mine else pieces[0].new_empty(0, width))
        return grouped


def get_adapter(config_or_model, processor=None) -> FamilyAdapter:
    """The adapter for a model (or its config); `processor` supplies token strings."""
    config = getattr(config_or_model, "config", config_or_model)
    spec = adapter_spec(config)
    if not spec.multimodal:
        return FamilyAdapter(spec, None, frozenset())
    image_token_id = _image_token_id(config)
    ids = {image_token_id}
    for attr in spec.image_token_attrs:
        if getattr(config, attr, None) is not None:
            ids.add(int(getattr(config, attr)))
    if spec.image_token_strings:
        if processor is None:
            raise ValueError(f"{spec.name} needs its processor to know its image marker tokens")
        tokenizer = tokenizer_of(processor)
        unk = tokenizer.unk_token_id
        for token in spec.image_token_strings:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != unk:
                ids.add(int(token_id))
    return FamilyAdapter(spec, image_token_id, frozenset(ids))


def with_image_outputs(inputs: dict, image_outputs) -> dict:
    """Model inputs that reuse an earlier forward pass's image encoder output (its
    ``image_outputs``) for the same images instead of encoding them again: transformers'
    ``mm_encoder_outputs`` (the pixels are dropped; grids, sizes and masks stay, as the
    language model's positions need them). With autograd, both passes' gradients reach
    the vision tower through the one encoding. None: ``inputs`` unchanged."""
    if image_outputs is None or "pixel_values" not in inputs:
        return inputs
    reused = {k: v for k, v in inputs.items() if k != "pixel_values"}
    reused["mm_encoder_outputs"] = {"image": image_outputs}
    return reused


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a generated answer: the model's end-of-sequence ids (its
    generation config's, else the tokenizer's) and the pad token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return ids


def forward_inputs(batch: dict[str, torch.Tensor], adapter: FamilyAdapter) -> dict:
    """The model inputs of a collated batch (drops labels and metadata).

    Image inputs are absent from a batch without images; the model then runs text-only.
    """
    keys = ("input_ids", "attention_mask", *adapter.spec.vision_keys)
    if adapter.spec.image_type_ids is not None:
        keys = (*keys, adapter.spec.image_type_ids)
    return {k: batch[k] for k in keys if k in batch}
