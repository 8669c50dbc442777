"""The part of two vocabularies that is shared: tokens that spell the same text.

A token is compared by the bytes it stands for, not by its vocabulary string: a
byte-level BPE vocabulary writes a leading space as ``Ġ`` and a SentencePiece one as
``▁``, so ``Ġthe`` and ``▁the`` are the same token. Special tokens (added tokens such as
``<|im_end|>``) match only special tokens of the same text. Computed once at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from betakd.models import tokenizer_of

SENTENCEPIECE_SPACE = "\u2581"


@dataclass(frozen=True)
class SharedVocabulary:
    """Pairs of student and teacher token ids that spell the same text."""

    student_ids: Tensor  # [S] long
    teacher_ids: Tensor  # [S] long
    student_size: int
    teacher_size: int
    # Per token of each vocabulary [V]: the shared token (its index in the pairs) that is
    # the longest prefix of its text, or S when none is (what the prefix loss projects
    # each side's distribution onto).
    student_prefix: Tensor | None = None
    teacher_prefix: Tensor | None = None

    def __len__(self) -> int:
        return int(self.student_ids.numel())

    @property
    def identical(self) -> bool:
        """Both vocabularies are the same ids for the same texts (no cross-tokenizer
        mapping needed)."""
        return self.student_size == self.teacher_size == len(self) and bool(
            torch.equal(self.student_ids, self.teacher_ids)
        )

    # Computed once per vocabulary pair, not on every batch of the hybrid loss.
    @cached_property
    def unshared_student(self) -> Tensor:
        return _complement(self.student_ids, self.student_size)

    @cached_property
    def unshared_teacher(self) -> Tensor:
        return _complement(self.teacher_ids, self.teacher_size)

    @classmethod
    def between(cls, student, teacher, student_size: int, teacher_size: int) -> SharedVocabulary:
        """The shared vocabulary of two tokenizers (or processors); ids at or beyond a
        model's ``size`` (logit rows it does not have) are left out."""
        student_keys = token_keys(tokenizer_of(student))
        teacher_keys = token_keys(tokenizer_of(teacher))
        # A text spelt by several ids of one vocabulary pairs its lowest ids, once.
        teacher_of = _first_id_of_key(teacher_keys, teacher_size)
        student_of = _first_id_of_key(student_keys, student_size)
        pairs = sorted((i, teacher_of[key]) for key, i in student_of.items() if key in teacher_of)
        ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        shared_index = {student_keys[i]: n for n, (i, _) in enumerate(pairs)}
        return cls(
            ids[:, 0].contiguous(),
            ids[:, 1].contiguous(),
            student_size,
            teacher_size,
            _longest_shared_prefix(student_keys, student_size, shared_index),
            _longest_shared_prefix(teacher_keys, teacher_size, shared_index),
        )


def _longest_shared_prefix(
    keys: dict[int, tuple[bool, bytes]], size: int, shared: dict[tuple[bool, bytes], int]
) -> Tensor:
    """``[size]``: for each token, the index of the shared token that is the longest
    prefix of its bytes (a special token: only itself), else ``len(shared)``."""
    out = torch.full((size,), len(shared), dtype=torch.long)
    for i, (special, text) in keys.items():
        if i >= size:
            continue
        lengths = [len(text)] if special else range(len(text), 0, -1)
        for length in lengths:
            n = shared.get((special, text[:length]))
            if n is not None:
                out[i] = n
                break
    return out


def _first_id_of_key(keys: dict[int, tuple[bool, bytes]], size: int) -> dict:
    first: dict[tuple[bool, bytes], int] = {}
    for i in sorted(keys):
        if i < size:
            first.setdefault(keys[i], i)
    return first


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().flatten()


def token_keys(tokenizer) -> dict[int, tuple[bool, bytes]]:
    """Each token id's (is special, the bytes it spells)."""
    added = {token: i for token, i in tokenizer.get_added_vocab().items()}
    to_bytes = _decoder_kind(tokenizer)
    keys: dict[int, tuple[bool, bytes]] = {}
    for token, i in tokenizer.get_vocab().items():
        if token in added:
            keys[i] = (True, token.encode("utf-8"))
        else:
            keys[i] = (False, to_bytes(token))
    return keys


def _decoder_kind(tokenizer):
    """How a vocabulary string becomes bytes, read from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    kinds = _decoder_types(decoder)
    if "ByteLevel" in kinds:
        return _byte_level_bytes
    if "Metaspace" in kinds or "ByteFallback" in kinds:
        return _sentencepiece_bytes
    return _plain_bytes


def _decoder_types(decoder) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}
    return {decoder.get("type")}


_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


def _plain_bytes(token: str) -> bytes:
    return token.encode("utf-8")
