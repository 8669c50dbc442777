"""One conversation encoded by one model's processor: its chat template, tokens,
answer-only labels and image inputs."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
import torch
from PIL import Image

from betakd.data.cache import DataCache, conversation_key
from betakd.data.records import Conversation, SkipSample, open_images
from betakd.labels import IGNORE_INDEX, supervised
from betakd.models import FamilyAdapter, tokenizer_of

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)

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
