"""Encodings and validation passes kept for reuse: the explicit :class:`DataCache` the
caller owns (one per run by default, or shared by the runs of a process)."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from betakd.data.records import Conversation, SkipReport

if TYPE_CHECKING:
    from betakd.data.encoding import Encoded

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)

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
