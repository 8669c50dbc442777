"""What the generation runner consumes: one prompt, at most one image, an id."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from betakd.eval.records import EvalDataError, question_id

ImageSource = str | Path | bytes | Image.Image | None

# Fields of a LLaVA question record that the runner consumes itself; all
# other fields are copied to the prediction record (e.g. category, round_id).
_SAMPLE_FIELDS = ("question_id", "text", "image")


@dataclass(frozen=True)
class Sample:
    """One generation request.

    `text` is the full user turn (question plus the benchmark's suffix); the
    runner wraps it in the model's chat template. `image` is a path, encoded
    bytes (MMBench ships base64 images), a PIL image, or None (text only).
    `extra` is copied into the prediction record.
    """

    question_id: str
    text: str
    image: ImageSource = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def as_sample(item: Sample | Mapping[str, Any], where: str = "sample") -> Sample:
    """Accept a `Sample` or a LLaVA-style question record (`question_id`, `text`, `image`)."""
    if isinstance(item, Sample):
        return item
    if not isinstance(item, Mapping):
        raise EvalDataError(f"{where}: expected a Sample or a mapping, got {type(item).__name__}")
    for key in ("question_id", "text"):
        if key not in item:
            raise EvalDataError(f"{where}: missing field {key!r}")
    if not isinstance(item["text"], str):
        raise EvalDataError(f"{where}: field 'text' must be a string")
    extra = {k: v for k, v in item.items() if k not in _SAMPLE_FIELDS}
    return Sample(question_id(item["question_id"], where), item["text"], item.get("image"), extra)


def with_suffix(question: str, suffix: str) -> str:
    """`question + "\\n" + suffix`, unless the question already ends with the suffix.

    The LLaVA question files of some benchmarks already carry the suffix;
    appending it twice would change the prompt.
    """
    question = question.rstrip()
    if question.endswith(suffix):
        return question
    return f"{question}\n{suffix}"


def load_image(source: ImageSource, where: str) -> Image.Image:
    """Open an image as RGB (the vision towers expect three channels)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source)).convert("RGB")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise EvalDataError(f"{where}: image file not found: {path}")
        with Image.open(path) as image:
            return image.convert("RGB")
    raise EvalDataError(f"{where}: unsupported image value of type {type(source).__name__}")


@dataclass(frozen=True)
class BenchmarkData:
    """A benchmark read from disk: what to generate and what to score against.

    `annotations` maps each sample's question id to what its scorer needs.
    """

    samples: list[Sample]
    annotations: dict[str, Any]

    def limited(self, limit: int | None) -> BenchmarkData:
        """The first `limit` samples (all when None), for quick runs."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return BenchmarkData(self.samples[:limit], self.annotations)
