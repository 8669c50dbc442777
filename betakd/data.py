"""LLaVA-format conversations: reading, validation with skip accounting, collation.

Records look like ``{"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}]}`` with an ``<image>`` placeholder in a human turn. A validation pass
reads every record once (parsing, opening images, encoding with every model's
processor) so that skipped samples are counted before training starts; the
collator then encodes the same raw sample once per model, so teacher and
student may use different processors and image-token counts.

Prompts are rendered by the model's own chat template. Labels are ``IGNORE_INDEX``
everywhere except on assistant answers (and the template's end-of-turn token).

Encoding (chat template, tokenizer, image processor) costs milliseconds per sample and
model, more than a tiny model's training step, so encodings are kept in an explicit
:class:`DataCache` that the caller owns: one per training run by default, or one
shared by several runs in a process (sweeps, the demo), which then also validate a
data set once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import jinja2
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from betakd.files import file_sha256
from betakd.labels import IGNORE_INDEX, supervised
from betakd.models import FamilyAdapter, tokenizer_of

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


SkipCounter = SkipReport


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


# ---------------------------------------------------------------------------
# Encoding with one model's processor


@dataclass(frozen=True)
class Segment:
    text: str
    is_answer: bool


@dataclass
class Encoded:
    """One sample encoded for one model (not yet padded)."""

    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T]
    vision: dict[str, torch.Tensor]  # image tensors as the processor returns them
    image_count: int  # visual pieces (FamilyAdapter.visual_pieces): images, or tiles


def _as_text_only(messages: Sequence[dict]) -> list[dict]:
    # Text-only chat templates (most causal LMs) expect string content.
    out = []
    for message in messages:
        if any(part["type"] == "image" for part in message["content"]):
            raise SkipSample("bad_record", "an image in a sample for a text-only model")
        text = " ".join(part["text"] for part in message["content"])
        out.append({"role": message["role"], "content": text})
    return out


class SampleEncoder:
    """Encodes conversations for one model: chat template, answer-only labels, images."""

    def __init__(
        self,
        processor,
        adapter: FamilyAdapter,
        max_length: int | None = None,
        cache: DataCache | None = None,
    ):
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.adapter = adapter
        self.max_length = max_length
        # Encodings are kept for the encoder's life (every epoch reuses them) unless a
        # longer-lived cache is given.
        self.cache = cache if cache is not None else DataCache()
        self._fingerprint: str | None = None
        self.image_token = getattr(processor, "image_token", None)
        if adapter.multimodal and self.image_token is None:
            raise ValueError(f"the processor of {adapter.name} has no image_token")

    def fingerprint(self) -> str:
        """A digest of everything that decides how a sample is encoded (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._digest()
        return self._fingerprint

    def encode_cached(self, conversation: Conversation, images=None) -> Encoded:
        """``encode`` through the encoder's :class:`DataCache`; images load only on a miss."""
        key = (self.fingerprint(), conversation_key(conversation))
        encoded = self.cache.encodings.get(key)
        if encoded is None:
            encoded = self.encode(
                conversation, open_images(conversation) if images is None else images
            )
            self.cache.encodings.put(key, encoded)
        return encoded

    def _digest(self) -> str:
        # The processor's own config holds what decides the image tokens (patch size,
        # image processor); the tokenizer and chat template are not in it.
        processor_config = self.processor.to_json_string() if self.adapter.multimodal else ""
        parts = [
            type(self.processor).__name__,
            self.adapter.name,
            str(self.max_length),
            json.dumps(sorted(self.tokenizer.get_vocab().items())),
            str(getattr(self.processor, "chat_template", None)),
            str(getattr(self.tokenizer, "chat_template", None)),
            processor_config,
        ]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(self, conversation: Conversation) -> list[Segment]:
        """Split the rendered conversation into prompt text and answer text.

        Renders growing prefixes of the conversation with the model's template;
        an answer is what a full assistant turn adds after the generation
        prompt. Its trailing whitespace stays unlabelled.
        """
        messages = list(conversation.messages)
        if not self.adapter.multimodal:
            messages = _as_text_only(messages)
        try:
            return self._segments(messages, conversation.id)
        except jinja2.TemplateError as err:
            raise SkipSample("bad_record", f"chat template failed: {err}") from err

    def _segments(self, messages: list[dict], sample_id: str) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._render(messages[:k], generation_prompt=True)
            full = self._render(messages[: k + 1], generation_prompt=False)
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError(
                    f"sample {sample_id}: the chat template does not render conversations "
                    "prefix by prefix, so answers cannot be located"
                )
            body = full[len(head) :]
            answer = body.rstrip()
            segments.append(Segment(head[len(done) :], False))
            segments.append(Segment(answer, True))
            segments.append(Segment(body[len(answer) :], False))
            done = full
        rest = self._render(messages, generation_prompt=False)[len(done) :]
        segments.append(Segment(rest, False))
        return [s for s in segments if s.text]

    def encode(self, conversation: Conversation, images: Sequence[Image.Image]) -> Encoded:
        """Encode a sample; raises SkipSample("too_long") when it cannot fit."""
        ids: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        vision: dict[str, torch.Tensor] = {}
        remaining = list(images)
        for segment in self.segments(conversation):
            count = segment.text.count(self.image_token) if self.adapter.multimodal else 0
            if count and vision:
                raise SkipSample("bad_record", "images in more than one prompt turn")
            if count:
                seg_ids, vision = self._encode_with_images(segment.text, remaining[:count])
                remaining = remaining[count:]
            else:
                seg_ids = self._encode_text(segment.text)
            ids.append(seg_ids)
            labels.append(
                seg_ids.clone() if segment.is_answer else torch.full_like(seg_ids, IGNORE_INDEX)
            )
        if remaining:
            raise SkipSample("bad_record", f"{len(remaining)} images without a placeholder")
        pieces = self.adapter.visual_pieces(vision, len(images))
        encoded = Encoded(torch.cat(ids), torch.cat(labels), vision, pieces)
        return self._fit(encoded, conversation.id)

    def _encode_text(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _encode_with_images(self, text: str, images: list) -> tuple[torch.Tensor, dict]:
        out = self.processor(
            text=[text], images=[images], add_special_tokens=False, return_tensors="pt"
        )
        vision = {
            k: v
            for k, v in out.items()
            if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
        }
        return out["input_ids"][0].long(), vision

    def _fit(self, encoded: Encoded, sample_id: str) -> Encoded:
        """Cut at max_length, but never through image tokens or all answers."""
        limit = self.max_length
        length = encoded.input_ids.numel()
        if limit is None or length <= limit:
            return encoded
        image_positions = self.adapter.image_mask(encoded.input_ids).nonzero()
        if image_positions.numel() and int(image_positions.max()) >= limit:
            raise SkipSample(
                "too_long", f"{length} tokens > max_length={limit} and the cut hits image tokens"
            )
        if not supervised(encoded.labels[:limit]).any():
            raise SkipSample(
                "too_long", f"{length} tokens > max_length={limit} and no answer token fits"
            )
        encoded.input_ids = encoded.input_ids[:limit]
        encoded.labels = encoded.labels[:limit]
        return encoded


# ---------------------------------------------------------------------------
# Data set with a validation pass


class ConversationDataset(torch.utils.data.Dataset):
    """Usable conversations (after validation); items are raw `Conversation`s."""

    def __init__(self, conversations: Sequence[Conversation], report: SkipReport):
        self.conversations = list(conversations)
        self.report = report
        self._position = {c.index: i for i, c in enumerate(self.conversations)}

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> Conversation:
        return self.conversations[i]

    def by_index(self, indices: Sequence[int]) -> list[Conversation]:
        """The conversations at these rows of the data file (``Conversation.index``)."""
        missing = [i for i in indices if i not in self._position]
        if missing:
            raise KeyError(f"rows {missing} of the data file are not in this data set")
        return [self.conversations[self._position[i]] for i in indices]


def build_dataset(
    data_path: str | Path,
    image_folder: str | Path | None,
    encoders: Mapping[str, SampleEncoder] | Sequence[SampleEncoder],
    *,
    max_skip_fraction: float = 0.05,
    limit: int | None = None,
    cache_dir: str | None = None,
    cache: DataCache | None = None,
    equal_answers: bool = False,
) -> ConversationDataset:
    """Read, validate and count skips; every encoder (student, teacher) must accept a sample.

    ``equal_answers``: every encoder must also keep the same number of answer tokens (an
    answer cut by ``max_length`` for one model's longer sequence only is a ``too_long``
    skip); several teachers need it to supervise the same student tokens.
    Raises DataError when more than `max_skip_fraction` of the records were skipped.
    With a :class:`DataCache`, the validation pass is remembered there for the same data
    file contents, image folder, limit and encoders, so repeated runs on one data set
    (sweeps, the demo) validate it once. `cache_dir` is the `datasets` cache.
    """
    named = (
        dict(encoders)
        if isinstance(encoders, Mapping)
        else {f"encoder {i}": e for i, e in enumerate(encoders)}
    )
    encoder_list = list(named.values())

    def validate() -> tuple[list[Conversation], SkipReport]:
        records = load_records(data_path, cache_dir=cache_dir)
        if limit is not None:
            records = records.select(range(min(limit, len(records))))
        return _validate(records, image_folder, named, equal_answers)

    if cache is None:
        kept, report = validate()
    else:
        key = _validation_key(data_path, image_folder, encoder_list, limit)
        kept, report = cache.validated((*key, equal_answers), validate)
    if report.count:
        logger.warning("%s", report.summary())
    report.enforce(max_skip_fraction)
    return ConversationDataset(kept, report)


def _validate(
    records, image_folder, encoders: Mapping[str, SampleEncoder], equal_answers: bool
) -> tuple[list[Conversation], SkipReport]:
    report = SkipReport(total=len(records))
    kept = []
    rows = tqdm(
        enumerate(records),
        total=len(records),
        desc="validating samples",
        disable=len(records) < 2000,
    )
    seen: set[str] = set()
    for index, record in rows:
        try:
            conversation = parse_record(record, index, image_folder)
            if conversation.id in seen:
                # Per-sample ids key caches, groups and reports: the first one is kept.
                raise SkipSample("duplicate_id", f"id {conversation.id!r} appeared earlier")
            seen.add(conversation.id)
            images = open_images(conversation)
            encoded = {name: _encode(name, e, conversation, images) for name, e in encoders.items()}
            if equal_answers:
                _check_equal_answers(encoded)
        except SkipSample as skip:
            sample_id = record.get("id") if record.get("id") is not None else index
            report.add(skip.reason, str(sample_id), skip.detail)
            continue
        kept.append(conversation)
    return kept, report


def _encode(name: str, encoder: SampleEncoder, conversation: Conversation, images) -> Encoded:
    """One model's encoding; a skip says whose (the student's and a teacher's encodings
    differ in length, e.g. by their image-token counts)."""
    try:
        return encoder.encode_cached(conversation, images)
    except SkipSample as skip:
        raise SkipSample(skip.reason, f"{name}'s encoding: {skip.detail}") from skip


def _check_equal_answers(encoded: Mapping[str, Encoded]) -> None:
    counts = {name: int(supervised(e.labels).sum()) for name, e in encoded.items()}
    if len(set(counts.values())) > 1:
        raise SkipSample(
            "too_long",
            f"max_length cuts the answer unequally: answer tokens kept per model {counts}",
        )


def _validation_key(data_path, image_folder, encoders, limit) -> tuple:
    """Same file contents and same encoding -> same validation result."""
    return (
        file_sha256(data_path),
        str(image_folder),
        limit,
        tuple(encoder.fingerprint() for encoder in encoders),
    )


# ---------------------------------------------------------------------------
# Caching encodings and validation results


def conversation_key(conversation: Conversation) -> tuple:
    messages = json.dumps(conversation.messages, sort_keys=True, default=str)
    return (conversation.index, conversation.id, conversation.image_paths, messages)


class EncodingCache:
    """Encoded samples, least recently used first out, bounded by tensor bytes.

    Encoding (chat template, tokenizer, image processor) costs milliseconds per sample
    and model, more than a tiny model's training step; the validation pass, every epoch
    and repeated runs in one process (sweeps, the demo) reuse the result. Encodings are
    never mutated after creation, so sharing them is safe.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[Encoded, int]] = OrderedDict()

    def get(self, key: tuple) -> Encoded | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple, encoded: Encoded) -> None:
        size = _nbytes(encoded)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = (encoded, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def _nbytes(encoded: Encoded) -> int:
    tensors = [encoded.input_ids, encoded.labels, *encoded.vision.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def default_encoding_bytes() -> int:
    """Encoding cache size: ``BETAKD_ENCODING_CACHE_MB`` (default 2048) MiB."""
    return int(os.environ.get("BETAKD_ENCODING_CACHE_MB", "2048")) * 2**20


class DataCache:
    """Work on data sets worth keeping while their files stay the same: encoded samples
    (:class:`EncodingCache`) and validation passes (keyed on the data file's contents,
    the image folder, the limit and the encoders; images are assumed not to change
    while the cache lives). The owner decides its lifetime; nothing is kept per process.
    """

    MAX_DATA_SETS = 4

    def __init__(self, max_encoding_bytes: int | None = None) -> None:
        size = default_encoding_bytes() if max_encoding_bytes is None else max_encoding_bytes
        self.encodings = EncodingCache(size)
        self._validations: OrderedDict[tuple, tuple[list[Conversation], SkipReport]] = OrderedDict()

    def validated(self, key: tuple, validate) -> tuple[list[Conversation], SkipReport]:
        """The validation result for ``key``, from ``validate()`` on the first request."""
        if key not in self._validations:
            if len(self._validations) >= self.MAX_DATA_SETS:
                self._validations.popitem(last=False)  # memory stays bounded
            self._validations[key] = validate()
        return self._validations[key]


# ---------------------------------------------------------------------------
# Collation


def pad_encoded(
    samples: Sequence[Encoded], encoder: SampleEncoder, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded samples into one model's batch."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), width), encoder.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = sample.input_ids
        labels[row, span] = sample.labels
        attention[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    batch.update(encoder.adapter.collate_vision([s.vision for s in samples]))
    batch.update(encoder.adapter.extra_inputs(input_ids))
    return batch


class KDCollator:
    """Collates raw conversations into a student batch and, optionally, a teacher batch.

    Output: the student's model inputs and `labels` at the top level (so the
    Trainer sees them), the teacher's under "teacher" (several teachers: a dict of
    batches by teacher name), and per-sample metadata: `sample_index` (row in the data
    file), `sample_ids` and `image_counts`.
    """

    def __init__(
        self,
        student: SampleEncoder,
        teacher: SampleEncoder | Mapping[str, SampleEncoder] | None = None,
        *,
        student_padding_side: str = "right",
        teacher_padding_side: str = "right",
    ):
        self.student = student
        self.teacher = teacher
        self.student_padding_side = student_padding_side
        self.teacher_padding_side = teacher_padding_side

    def _encode_all(self, encoder: SampleEncoder, conversations) -> list[Encoded]:
        encoded = []
        for conversation in conversations:
            try:
                encoded.append(encoder.encode_cached(conversation))
            except SkipSample as skip:
                # Validation accepted this sample, so this is a changed file or a misconfiguration.
                raise DataError(
                    f"sample {conversation.id} passed validation but now fails: {skip}"
                ) from skip
        return encoded

    def _teacher_batch(self, encoder: SampleEncoder, conversations) -> dict:
        encoded = self._encode_all(encoder, conversations)
        batch = pad_encoded(encoded, encoder, self.teacher_padding_side)
        # The teacher's own pieces: tile counts differ between families.
        batch["image_counts"] = image_counts(encoded)
        return batch

    def __call__(self, conversations: Sequence[Conversation]) -> dict:
        encoded = self._encode_all(self.student, conversations)
        batch = pad_encoded(encoded, self.student, self.student_padding_side)
        if isinstance(self.teacher, Mapping):
            batch["teacher"] = {
                name: self._teacher_batch(encoder, conversations)
                for name, encoder in self.teacher.items()
            }
        elif self.teacher is not None:
            batch["teacher"] = self._teacher_batch(self.teacher, conversations)
        batch["sample_index"] = torch.tensor([c.index for c in conversations], dtype=torch.long)
        batch["sample_ids"] = [c.id for c in conversations]
        batch["image_counts"] = image_counts(encoded)
        return batch


def image_counts(encoded: Sequence[Encoded]) -> torch.Tensor:
    """Each sample's visual pieces ``[B]`` (see :class:`Encoded`)."""
    return torch.tensor([e.image_count for e in encoded], dtype=torch.long)
