"""LLaVA-format records: parsing and validating one record, opening its images, and
the accounting of skipped samples."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "too_long",
    "empty_answer",
    "no_assistant_turn",
    "bad_record",
    "duplicate_id",
)
# Skips logged one by one per reason; the rest only count (and stay in the report).
_LOGGED_PER_REASON = 50


class DataError(ValueError):
    """The data set cannot be used as configured (e.g. too many skipped samples)."""


class SkipSample(Exception):
    """One record cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# Skip accounting


@dataclass
class SkipReport:
    """Counts of skipped samples by reason, with the sample id and detail of each."""

    total: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in SKIP_REASONS})

    def add(self, reason: str, sample_id: str, detail: str) -> None:
        entries = self.skipped[reason]
        entries.append(f"{sample_id}: {detail}")
        level = logging.WARNING if len(entries) <= _LOGGED_PER_REASON else logging.DEBUG
        logger.log(level, "skipping sample %s (%s): %s", sample_id, reason, detail)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def kept(self) -> int:
        return self.total - self.count

    @property
    def fraction(self) -> float:
        return self.count / self.total if self.total else 0.0

    def counts(self) -> dict[str, int]:
        return {reason: len(entries) for reason, entries in self.skipped.items()}

    def summary(self, examples: int = 3) -> str:
        parts = [f"skipped {self.count} of {self.total} samples ({self.fraction:.1%})"]
        for reason, entries in self.skipped.items():
            if entries:
                shown = "; ".join(entries[:examples])
                parts.append(f"{reason}={len(entries)} (e.g. {shown})")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        """JSON-ready: totals, counts per reason and every skipped `id: detail`."""
        return {
            "total": self.total,
            "skipped": self.count,
            "fraction": self.fraction,
            "counts": self.counts(),
            "samples": {reason: list(entries) for reason, entries in self.skipped.items()},
        }

    def enforce(self, max_skip_fraction: float) -> None:
        """Fail when more than `max_skip_fraction` of the samples were skipped."""
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if self.total == 0:
            raise DataError("the data set has no records")
        if self.kept == 0 or self.fraction > max_skip_fraction:
            raise DataError(
                f"{self.summary()}; more than data.max_skip_fraction={max_skip_fraction} "
                "(check the image folder and the data file)"
            )


# ---------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Conversation:
    """One usable record: chat messages with typed content and its image files."""

    index: int  # row in the source file
    id: str
    messages: tuple[dict, ...]
    image_paths: tuple[Path, ...] = ()


def load_records(path: str | Path, cache_dir: str | None = None) -> datasets.Dataset:
    """Read a LLaVA-format .json (a list of records) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)


def _image_field(record: Mapping) -> list[str]:
    image = record.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def _split_placeholders(text: str) -> list[dict]:
    """Turn 'a <image> b' into typed content parts in order."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def parse_record(record: Mapping, index: int, image_folder: str | Path | None) -> Conversation:
    """Validate one record's structure; raises SkipSample with the reason."""
    sample_id = str(record.get("id") if record.get("id") is not None else index)
    if not sample_id.strip():
        raise SkipSample("bad_record", "field 'id' is an empty string")
    turns = record.get("conversations")
    if not turns:
        raise SkipSample("no_assistant_turn", "no conversations")
    messages = []
    for number, turn in enumerate(turns):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise SkipSample("bad_record", f"unknown speaker {turn.get('from')!r}")
        value = turn.get("value")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise SkipSample(
                "bad_record",
                f"conversations[{number}].value is a {type(value).__name__} ({value!r}), "
                "not a string",
            )
        if role == "assistant":
            if IMAGE_PLACEHOLDER in value:
                raise SkipSample("bad_record", "an <image> placeholder in an assistant turn")
            if not value.strip():
                raise SkipSample("empty_answer", "an assistant turn is empty")
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
        else:
            messages.append({"role": role, "content": _split_placeholders(value)})
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample("no_assistant_turn", "no turn from gpt")
    images = _image_field(record)
    placeholders = sum(part["type"] == "image" for m in messages for part in m["content"])
    if images and placeholders == 0:
        # LLaVA convention: the image belongs in front of the first human turn.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SkipSample("bad_record", "an image but no human turn")
        first_user["content"] = [{"type": "image"}] * len(images) + first_user["content"]
        placeholders = len(images)
    if placeholders != len(images):
        raise SkipSample(
            "bad_record", f"{placeholders} <image> placeholders for {len(images)} images"
        )
    for number, message in enumerate(messages):
        if message["role"] != "assistant" and not message["content"]:
            raise SkipSample("bad_record", f"conversations[{number}].value is empty")
    paths = tuple(_image_path(p, image_folder) for p in images)
    return Conversation(index, sample_id, tuple(messages), paths)


def _image_path(name: str, image_folder: str | Path | None) -> Path:
    path = Path(name)
    if not path.is_absolute() and image_folder is not None:
        path = Path(image_folder) / path
    return path


def open_image(path: Path) -> Image.Image:
    """Decode an image fully (lazy decoding would hide truncated files)."""
    if path.is_dir():
        raise SkipSample("missing_image", f"{path} is a folder, not an image file")
    if not path.is_file():
        raise SkipSample("missing_image", f"no file at {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SkipSample("corrupt_image", f"cannot decode {path}: {err}") from err


def open_images(conversation: Conversation) -> list[Image.Image]:
    return [open_image(p) for p in conversation.image_paths]
