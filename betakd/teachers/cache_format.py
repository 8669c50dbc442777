"""The offline teacher cache's file format: layout, token-id storage, fingerprint.

Layout of a cache folder::

    index.json                  written last (atomically): fingerprint, layout, shards
    shard-00000.safetensors     samples [0, shard_size) of the data set, and so on

Each shard holds, for its S samples and their T answer tokens in total:

* ``sample_index`` int64 [S] (row in the data file) and ``token_offsets`` int64 [S+1];
* ``target_ids`` [T]: the token each cached position predicts, to check the alignment
  against the student batch;
* with logit channels: ``topk_log_probs`` float16 [T, k], ``topk_ids`` [T, k] and
  ``tail_log_mass`` float16 [T], the log of the probability outside the top k (how a
  row is rebuilt from them: :mod:`betakd.teachers.targets`);
* with feature channels: ``visual`` float16 [M, d] with ``visual_offsets`` int64
  [S+1]: the teacher's projected visual tokens, average-pooled to at most
  ``visual_tokens`` per sample (a square count pools on the 2-D grid);
* with an instance weighting: ``representation`` float16 [S, D], computed exactly from
  the full teacher outputs (pooled visual tokens, pooled answer hidden state, or
  [mean entropy, mean max-probability]).

Token ids are int16 when the vocabulary has at most 32768 tokens, else 24-bit (an int16
tensor of low bits plus a uint8 ``*_high`` tensor), so at k = 32 a token costs
32 * (2 + 2) + 2 + 2 = 132 bytes, or 32 * (2 + 3) + 2 + 3 = 165 bytes for a large
vocabulary, before the per-sample fields.

Precision: log-probabilities in float16 carry a relative error of at most 2**-11, i.e.
an absolute log-probability error <= |log p| * 4.9e-4 (0.005 at log p = -10);
probabilities are off by < 0.5% of themselves. The cached tail mass is kept as a
log, so tiny tails keep their relative precision.

Visual grid: 16 tokens (4 x 4) by default. The feature channels compare student and
teacher tokens after pooling both to the smaller count (``align.pool_visual_pair``),
so a teacher cached at 16 tokens gives the same feature energy as online for students
with up to 16 visual tokens, and a 4 x 4 average of the layout otherwise; at d = 4096
it costs 128 KiB per sample instead of 4.5 MiB for 576 tokens.

Validity: the index records a fingerprint (SHA-256 of the data file, of the
tokenizer's vocabulary, of the teacher's config.json, k, max_length, dtype, grid);
a reader compares it with the run's and names every field that changed. Images are
not hashed (only the data file and the image folder's path).

Answer positions only: a logit channel on prompt positions needs an online teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from betakd import models
from betakd.files import file_sha256

FORMAT = "betakd-teacher-cache"
VERSION = 1
INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:05d}.safetensors"
SHARD_GLOB = "shard-*.safetensors"
# Shard tensors: the k the writer measured the captured mass of, and per k the sum over
# the shard's answer tokens of the mass the top k hold (what `index.json` reports).
MASS_K = "mass_k"
MASS_SUM = "mass_sum"
FLOAT_STORAGE = "float16"
ID_BYTES = {"int16": 2, "int24": 3}
# Per-sample tensors (the rest is per token).
FEATURE_TENSORS = ("visual", "visual_offsets", "representation")
# Fingerprint fields that a training run recomputes from its own data and tokenizer,
# and what they mean in an error message.
CHECKED_FIELDS = {
    "data_sha256": "data file contents",
    "image_folder": "data.image_folder",
    "vocab_sha256": "tokenizer vocabulary",
    "max_length": "data.max_length",
}


class CacheError(ValueError):
    """The cache is missing, incomplete, or does not fit the config, data or tokenizer."""


@dataclass(frozen=True)
class CacheContents:
    """What a cache holds: top-k logits, visual tokens, an instance representation."""

    logits: bool
    visual: bool
    representation: str | None

    def as_dict(self) -> dict:
        return {"logits": self.logits, "visual": self.visual, "representation": self.representation}

    def missing_from(self, have: dict) -> list[str]:
        """What these contents need that a cache's ``have`` (its ``as_dict``) lacks."""
        missing = []
        if self.logits and not have["logits"]:
            missing.append("top-k logits (channels.logits)")
        if self.visual and not have["visual"]:
            missing.append("visual tokens (channels.features)")
        if self.representation and self.representation != have["representation"]:
            missing.append(
                f"representation {self.representation!r} (weighting.representation; cached: "
                f"{have['representation']!r})"
            )
        return missing


# --------------------------------------------------------------------------- token ids


def id_storage(vocab_size: int) -> str:
    """ "int16" for vocabularies up to 32768 tokens, else "int24" (up to 2**24 tokens).

    int24 keeps the low 16 bits in an int16 tensor ``NAME`` and the high 8 bits in a
    uint8 tensor ``NAME_high``: 3 bytes per id instead of int32's 4, which is what keeps
    a k = 32 token of a 150k vocabulary under 200 bytes.
    """
    if vocab_size <= 2**15:
        return "int16"
    if vocab_size <= 2**24:
        return "int24"
    raise CacheError(f"a vocabulary of {vocab_size} tokens exceeds the cache's 24-bit ids")


def encode_ids(ids: Tensor, storage: str) -> dict[str, Tensor]:
    """Token ids -> the stored tensors ({"": low} or {"": low, "_high": high})."""
    wide = ids.to(torch.int32)
    if storage == "int16":
        return {"": wide.to(torch.int16)}
    low = wide & 0xFFFF
    # The low 16 bits as a two's-complement int16 bit pattern.
    low = torch.where(low >= 2**15, low - 2**16, low).to(torch.int16)
    return {"": low, "_high": (wide >> 16).to(torch.uint8)}


def decode_ids(low: Tensor, high: Tensor | None) -> Tensor:
    """Stored id tensors -> long token ids."""
    if high is None:
        return low.long()
    return (low.long() & 0xFFFF) | (high.long() << 16)


def bytes_per_token(top_k: int, vocab_size: int, logits: bool = True) -> int:
    """Bytes of the per-token fields (target id; with logits: top-k values, ids, tail)."""
    id_bytes = ID_BYTES[id_storage(vocab_size)]
    return id_bytes + (top_k * (2 + id_bytes) + 2 if logits else 0)


# --------------------------------------------------------------------------- fingerprint


def vocab_sha256(tokenizer) -> str:
    """Hash of the token -> id map (added tokens included)."""
    vocab = models.tokenizer_of(tokenizer).get_vocab()
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def teacher_identity(path: str) -> dict:
    """The teacher's path and, for a local folder, the hash of its config.json."""
    config_file = Path(path).expanduser() / "config.json"
    identity = {"path": str(path)}
    if config_file.is_file():
        identity["config_sha256"] = file_sha256(config_file)
    return identity


def same_teacher(now: dict, cached: dict) -> bool:
    """Same config.json when both are known (the folder may have moved), else same path."""
    if "config_sha256" in now and "config_sha256" in cached:
        return now["config_sha256"] == cached["config_sha256"]
    return now.get("path") == cached.get("path")


def data_fingerprint(
    train_file: str | Path, image_folder: str | None, tokenizer, max_length: int
) -> dict:
    """The fields both the writer and a training run can compute (``CHECKED_FIELDS``)."""
    return {
        "data_sha256": file_sha256(train_file),
        "image_folder": image_folder,
        "vocab_sha256": vocab_sha256(tokenizer),
        "max_length": max_length,
    }


def differences(expected: dict, found: dict, keys: Sequence[str]) -> list[str]:
    return [
        f"{k} ({found.get(k)!r} in the cache, now {expected.get(k)!r})"
        for k in keys
        if expected.get(k) != found.get(k)
    ]
