"""What the generation runner consumes: one prompt, at most one image, an id."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
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
    `extra` is copied into the prediction record. `source` says where the
    sample was read ("questions.jsonl:12"), so that errors can name it.
    """

    question_id: str
    text: str
    image: ImageSource = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def describe(self) -> str:
        """ "FILE:LINE: question ID", or "question ID" for a sample built in code."""
        name = f"question {self.question_id!r}"
        return f"{self.source}: {name}" if self.source else name


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
    qid = question_id(item["question_id"], where)
    return Sample(qid, item["text"], item.get("image"), extra, source=where)


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
    """Open an image as RGB (the vision towers expect three channels).

    A missing file, a folder, or a file PIL cannot decode (truncated, not an
    image) is an `EvalDataError` naming `where` and the file.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, bytes):
        return _decoded(lambda: Image.open(io.BytesIO(source)), where, "the embedded image")
    if isinstance(source, (str, Path)):
        path = Path(source)
        _check_image_path(path, where)
        return _decoded(lambda: Image.open(path), where, str(path))
    raise EvalDataError(f"{where}: unsupported image value of type {type(source).__name__}")


def _check_image_path(path: Path, where: str) -> None:
    if path.is_dir():
        raise EvalDataError(f"{where}: the image path {path} is a folder, not an image file")
    if not path.is_file():
        raise EvalDataError(f"{where}: image file not found: {path}")


def _decoded(open_image: Callable[[], Image.Image], where: str, name: str) -> Image.Image:
    # PIL reports truncated or foreign files as OSError (UnidentifiedImageError is
    # one) and some broken headers as ValueError/SyntaxError; all mean "not readable".
    try:
        with open_image() as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise EvalDataError(f"{where}: cannot read the image {name}: {err}") from err


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
