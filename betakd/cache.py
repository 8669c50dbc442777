"""The offline teacher cache: run the teacher once, train later without loading it.

``write_teacher_cache(config)`` (``betakd cache-teacher CONFIG``) runs the frozen teacher
over the training data and stores, for every answer token, what the logit channels
need, and per sample what the feature channels and the instance weighting need.
``CachedTeacher`` then serves :class:`~betakd.teachers.TeacherTargets` from the files,
with the same call as :class:`~betakd.teachers.OnlineTeacher`.

Layout of ``teacher.cache_dir``::

    index.json                  written last (atomically): fingerprint, layout, shards
    shard-00000.safetensors     samples [0, shard_size) of the data set, and so on

Each shard holds, for its S samples and their T answer tokens in total:

* ``sample_index`` int64 [S] (row in the data file) and ``token_offsets`` int64 [S+1];
* ``target_ids`` [T]: the token each cached position predicts, to check the alignment
  against the student batch;
* with logit channels: ``topk_log_probs`` float16 [T, k], ``topk_ids`` [T, k] and
  ``tail_log_mass`` float16 [T], the log of the probability outside the top k;
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

Tail mass (how energies see a sparse teacher): the dense teacher distribution is
rebuilt as the k cached tokens with their probabilities and the tail mass spread
uniformly over the other V - k tokens (:func:`dense_from_topk`), renormalised so the
row sums to 1. Every energy then runs unchanged on these log-probabilities (they are
valid logits). A tail below e**-80 (or none, k = V) is floored at e**-80 so that every
token keeps a positive probability and reverse-KL-type energies stay finite. The
uniform tail keeps forward KL's tail term and cosine/MSE on probabilities close to the
online values when the tail is small; energies on standardised logits
(``cosine_logits``, ``mse_logits``) see a flat tail instead of the teacher's logits, so
prefer probability energies with a cached teacher.

Visual grid: 16 tokens (4 x 4) by default. The feature channels compare student and
teacher tokens after pooling both to the smaller count (``align.pool_visual_pair``),
so a teacher cached at 16 tokens gives the same feature energy as online for students
with up to 16 visual tokens, and a 4 x 4 average of the layout otherwise; at d = 4096
it costs 128 KiB per sample instead of 4.5 MiB for 576 tokens. Pass
``visual_tokens`` (``--visual-tokens``) for more.

Validity: the index records a fingerprint (SHA-256 of the data file, of the
tokenizer's vocabulary, of the teacher's config.json, k, max_length, dtype, grid);
loading recomputes it from the training config and names every field that changed.
Images are not hashed (only the data file and the image folder's path).

Answer positions only: a logit channel with ``positions: answer_and_prompt`` needs an
online teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from betakd import align, models
from betakd import config as cfg
from betakd.align import AlignedPositions, align_positions, representation_dim
from betakd.data import KDCollator, SampleEncoder, build_dataset
from betakd.teachers import TeacherTargets

logger = logging.getLogger(__name__)

FORMAT = "betakd-teacher-cache"
VERSION = 1
INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:05d}.safetensors"
TMP_SUFFIX = ".tmp"
DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 4
DEFAULT_VISUAL_TOKENS = 16
LOG_TAIL_FLOOR = -80.0
FLOAT_STORAGE = "float16"
# Fingerprint fields that training recomputes from its own config and data.
CHECKED_FIELDS = ("data_sha256", "image_folder", "vocab_sha256", "max_length")
# Open shards kept memory-mapped at once by the reader.
OPEN_SHARDS = 32


class CacheError(ValueError):
    """The cache is missing, incomplete, or does not fit the config, data or tokenizer."""


# --------------------------------------------------------------------------- what to store


@dataclass(frozen=True)
class CacheContents:
    """What the config's channels and weighting need from the teacher."""

    logits: bool
    visual: bool
    representation: str | None

    def as_dict(self) -> dict:
        return {"logits": self.logits, "visual": self.visual, "representation": self.representation}


def cache_contents(config: cfg.TrainConfig) -> CacheContents:
    """Only what this config uses is stored; prompt positions are not cached."""
    for i, channel in enumerate(config.channels.logits):
        if channel.positions != "answer":
            raise CacheError(
                f"channels.logits.{i}.positions: {channel.positions!r} needs the teacher at "
                "prompt positions; the cache holds answer tokens only (use an online teacher)"
            )
    representation = (
        config.weighting.representation if config.weighting.needs_representation else None
    )
    return CacheContents(
        logits=bool(config.channels.logits),
        visual=bool(config.channels.features),
        representation=representation,
    )


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


ID_BYTES = {"int16": 2, "int24": 3}


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def data_fingerprint(config: cfg.TrainConfig, tokenizer) -> dict:
    """The fields both the writer and the trainer can compute."""
    return {
        "data_sha256": file_sha256(config.data.train_file),
        "image_folder": config.data.image_folder,
        "vocab_sha256": vocab_sha256(tokenizer),
        "max_length": config.data.max_length,
    }


def _differences(expected: dict, found: dict, keys: Sequence[str]) -> list[str]:
    return [
        f"{k} ({found.get(k)!r} in the cache, now {expected.get(k)!r})"
        for k in keys
        if expected.get(k) != found.get(k)
    ]


_WHAT_CHANGED = {
    "data_sha256": "data file contents",
    "image_folder": "data.image_folder",
    "vocab_sha256": "tokenizer vocabulary",
    "max_length": "data.max_length",
}


# --------------------------------------------------------------------------- atomic files


def _temp_name(path: Path) -> Path:
    # A dot-name never matches a shard or index name, so readers never see it.
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_shard_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: a shard file is always complete."""
    tmp = _temp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _fsync(tmp)
    os.replace(tmp, path)


def write_json_atomic(data: dict, path: Path) -> None:
    tmp = _temp_name(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def leftover_temp_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(f".*{TMP_SUFFIX}"))


# --------------------------------------------------------------------------- dense teacher


def dense_from_topk(
    topk_log_probs: Tensor, topk_ids: Tensor, tail_log_mass: Tensor, vocab_size: int
) -> Tensor:
    """Dense float32 teacher log-probabilities [n, V] from a top-k summary.

    The k listed tokens keep their log-probabilities; the tail mass (floored at
    e**LOG_TAIL_FLOOR) is spread uniformly over the other V - k tokens; each row is then
    renormalised to sum to 1 (which also absorbs float16 rounding). Unlike
    ``betakd.chunked.topk_to_log_probs``, which derives the tail as 1 - sum(top k), this
    uses the stored tail: the subtraction loses the tail to rounding when it is small,
    and an all-zero tail would make reverse-KL energies infinite.
    """
    n, k = topk_log_probs.shape
    if topk_ids.shape != (n, k) or tail_log_mass.shape != (n,):
        raise ValueError(
            f"top-k summary shapes disagree: log-probs {tuple(topk_log_probs.shape)}, ids "
            f"{tuple(topk_ids.shape)}, tail {tuple(tail_log_mass.shape)}"
        )
    if k > vocab_size:
        raise ValueError(f"k = {k} exceeds the vocabulary size {vocab_size}")
    head = topk_log_probs.float()
    ids = topk_ids.long()
    if k == vocab_size:
        log_norm = head.logsumexp(dim=-1, keepdim=True)
        dense = head.new_full((n, vocab_size), LOG_TAIL_FLOOR)
        return dense.scatter_(1, ids, head - log_norm)
    tail = tail_log_mass.float().clamp_min(LOG_TAIL_FLOOR).unsqueeze(1)
    # The row's total mass from the k head entries and the tail: an [n, k] reduction
    # instead of a log-sum-exp over the whole vocabulary.
    log_norm = torch.logaddexp(head.logsumexp(dim=-1, keepdim=True), tail)
    fill = tail - math.log(vocab_size - k) - log_norm
    dense = fill.expand(n, vocab_size).contiguous()
    return dense.scatter_(1, ids, head - log_norm)


def topk_summary(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k log-probs [n, k], ids [n, k], log tail mass [n]) of float32 logits [n, V]."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    top = log_p.topk(k, dim=-1)
    # The tail as a log-sum-exp of the rest, not 1 - sum(top): exact for tiny tails.
    rest = log_p.scatter(1, top.indices, float("-inf"))
    tail = rest.logsumexp(dim=-1).clamp_min(LOG_TAIL_FLOOR)
    return top.values, top.indices, tail


# --------------------------------------------------------------------------- writer


def _to_half(values: Tensor, what: str, sample_id: str) -> Tensor:
    """float16 for storage; an overflow is an error naming the sample, never a silent inf."""
    half = values.detach().float().cpu().half()
    if not torch.isfinite(half).all():
        raise CacheError(
            f"sample {sample_id}: {what} has values outside float16's range "
            f"(max |x| = {float(values.abs().max()):.3g}); the cache stores float16"
        )
    return half


@dataclass
class _SampleRecord:
    index: int
    sample_id: str
    target_ids: Tensor
    topk_log_probs: Tensor | None = None
    topk_ids: Tensor | None = None
    tail_log_mass: Tensor | None = None
    visual: Tensor | None = None
    representation: Tensor | None = None


class _TeacherRunner:
    """Runs the teacher on one collated batch and cuts its outputs per sample."""

    def __init__(
        self,
        model,
        adapter,
        *,
        vocab: int,
        top_k: int,
        contents: CacheContents,
        visual_tokens: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.vocab = vocab
        self.top_k = top_k
        self.contents = contents
        self.visual_tokens = visual_tokens
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict) -> list[_SampleRecord]:
        sample_ids = batch["sample_ids"]
        image_counts = batch["image_counts"].tolist()
        # The teacher batch aligned with itself: its answer tokens in order.
        aligned = align_positions(batch, batch, sample_ids=sample_ids)
        inputs = {
            k: v.to(self.device) if isinstance(v, Tensor) else v
            for k, v in models.forward_inputs(batch, self.adapter).items()
        }
        wants_hidden = self.contents.representation == "teacher_answer_hidden"
        out = self.model(**inputs, output_hidden_states=wants_hidden)
        logits = models.slice_vocab(aligned.teacher(out.logits), self.vocab).float()
        visual = None
        if self.contents.visual or self.contents.representation == "teacher_visual":
            visual = self.adapter.visual_tokens(out, image_counts)
        rep = self._representation(out, logits, visual, aligned)
        top = topk_summary(logits, self.top_k) if self.contents.logits else None
        records = []
        rows = aligned.batch_index.cpu()
        for row, sample_id in enumerate(sample_ids):
            mine = (rows == row).nonzero().flatten()
            record = _SampleRecord(
                index=int(batch["sample_index"][row]),
                sample_id=str(sample_id),
                target_ids=aligned.token_ids[mine.to(aligned.token_ids.device)].cpu(),
            )
            if top is not None:
                values, ids, tail = (t[mine.to(t.device)] for t in top)
                record.topk_log_probs = _to_half(values, "top-k log-probabilities", sample_id)
                record.topk_ids = ids.cpu()
                record.tail_log_mass = _to_half(tail, "tail log-mass", sample_id)
            if self.contents.visual:
                record.visual = self._pooled_visual(visual[row], sample_id)
            if rep is not None:
                record.representation = _to_half(rep[row], "representation", sample_id)
            records.append(record)
        return records

    def _pooled_visual(self, tokens: Tensor, sample_id: str) -> Tensor:
        if tokens.shape[0] == 0:
            return torch.empty(0, tokens.shape[-1], dtype=torch.float16)
        pooled = align.pool_tokens(tokens.float(), min(self.visual_tokens, tokens.shape[0]))
        return _to_half(pooled, "visual tokens", sample_id)

    def _representation(self, out, logits, visual, aligned) -> Tensor | None:
        # The online teacher's own computation, from the full (not top-k) outputs.
        kind = self.contents.representation
        if kind is None:
            return None
        hidden = out.hidden_states[-1] if out.hidden_states is not None else None
        return align.instance_representation(
            kind,
            aligned=aligned,
            teacher_visual=visual,
            teacher_hidden=hidden,
            teacher_logits=logits,
        )


def _shard_tensors(records: Sequence[_SampleRecord], contents: CacheContents, storage: str) -> dict:
    def offsets(lengths):
        return torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)

    tensors = {
        "sample_index": torch.tensor([r.index for r in records], dtype=torch.long),
        "token_offsets": offsets([r.target_ids.numel() for r in records]),
    }
    for suffix, part in encode_ids(torch.cat([r.target_ids for r in records]), storage).items():
        tensors["target_ids" + suffix] = part
    if contents.logits:
        tensors["topk_log_probs"] = torch.cat([r.topk_log_probs for r in records])
        for suffix, part in encode_ids(torch.cat([r.topk_ids for r in records]), storage).items():
            tensors["topk_ids" + suffix] = part
        tensors["tail_log_mass"] = torch.cat([r.tail_log_mass for r in records])
    if contents.visual:
        width = max(r.visual.shape[-1] for r in records)
        pieces = [r.visual if r.visual.numel() else r.visual.new_empty(0, width) for r in records]
        tensors["visual"] = torch.cat(pieces)
        tensors["visual_offsets"] = offsets([r.visual.shape[0] for r in records])
    if contents.representation is not None:
        tensors["representation"] = torch.stack([r.representation for r in records])
    return tensors


def _plan(num_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def _check_existing_index(cache_dir: Path, fingerprint: dict) -> None:
    index_path = cache_dir / INDEX_FILE
    if not index_path.is_file():
        return
    found = json.loads(index_path.read_text(encoding="utf-8")).get("fingerprint", {})
    changed = _differences(fingerprint, found, sorted(set(fingerprint) | set(found)))
    if changed:
        raise CacheError(
            f"{cache_dir} holds a teacher cache of another config or data set; changed: "
            f"{'; '.join(changed)}. Choose another teacher.cache_dir or delete this one."
        )


def _shard_is_complete(path: Path, fingerprint_json: str, indices: list[int]) -> bool:
    """A shard file exists only complete (atomic rename); it must be this run's shard."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        stored = handle.get_tensor("sample_index").tolist()
    if meta.get("fingerprint") != fingerprint_json:
        raise CacheError(
            f"{path} was written for another config or data set; delete the cache folder "
            f"{path.parent} or choose another teacher.cache_dir"
        )
    if stored != indices:
        raise CacheError(
            f"{path} holds samples {stored[:3]}... but this run puts {indices[:3]}... there "
            "(another shard size or data limit); delete the cache folder or keep the settings"
        )
    return True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_teacher_cache(
    config: cfg.TrainConfig,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    visual_tokens: int = DEFAULT_VISUAL_TOKENS,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Run the teacher over the training data once and write the cache; returns its folder.

    Resumable: shards already on disk (complete by construction) are kept, so an
    interrupted run continues where it stopped. ``index.json`` is written last, so a
    folder without it is an unfinished cache that training refuses.
    """
    if shard_size < 1 or batch_size < 1 or visual_tokens < 1:
        raise ValueError("shard_size, batch_size and visual_tokens must be >= 1")
    teacher = config.teacher
    if not teacher.cache_dir:
        raise CacheError("teacher.cache_dir: set where the cache goes (--set teacher.cache_dir=)")
    if not teacher.path:
        raise CacheError("teacher.path: writing the cache needs the teacher model")
    if not Path(teacher.path).expanduser().is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"teacher.path: no model directory at {teacher.path}")
    contents = cache_contents(config)
    cache_dir = Path(teacher.cache_dir)
    device = _resolve_device(device)

    processor = models.load_processor(teacher.path, trust_remote_code=teacher.trust_remote_code)
    model = models.load_model(
        teacher.path,
        dtype=teacher.dtype,
        trust_remote_code=teacher.trust_remote_code,
        frozen=True,
    ).to(device)
    adapter = models.get_adapter(model, processor)
    vocab = models.vocab_rows(processor, model)
    storage = id_storage(vocab)
    if contents.logits and teacher.cache_top_k > vocab:
        raise CacheError(f"teacher.cache_top_k: {teacher.cache_top_k} > vocabulary of {vocab}")
    if contents.visual and not adapter.multimodal:
        raise CacheError("channels.features: the teacher is text-only, it has no visual tokens")
    encoder = SampleEncoder(processor, adapter, config.data.max_length)
    dataset = build_dataset(
        config.data.train_file,
        config.data.image_folder,
        {"teacher": encoder},
        max_skip_fraction=config.data.max_skip_fraction,
        limit=config.data.limit,
    )
    fingerprint = {
        **data_fingerprint(config, processor),
        "teacher": teacher_identity(teacher.path),
        "teacher_dtype": teacher.dtype,
        "top_k": teacher.cache_top_k,
        "visual_tokens": visual_tokens,
        "storage": FLOAT_STORAGE,
        "contents": contents.as_dict(),
        "data_limit": config.data.limit,
    }
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_existing_index(cache_dir, fingerprint)
    for stale in leftover_temp_files(cache_dir):
        logger.info("removing %s, left over by an interrupted write", stale)
        stale.unlink()

    runner = _TeacherRunner(
        model,
        adapter,
        vocab=vocab,
        top_k=teacher.cache_top_k,
        contents=contents,
        visual_tokens=visual_tokens,
        device=device,
    )
    collator = KDCollator(encoder)
    shards = []
    bar = tqdm(total=len(dataset), desc="caching teacher", unit="sample", disable=not progress)
    for number, positions in enumerate(_plan(len(dataset), shard_size)):
        conversations = [dataset[p] for p in positions]
        indices = [c.index for c in conversations]
        path = cache_dir / SHARD_NAME.format(number)
        if not _shard_is_complete(path, fingerprint_json, indices):
            records = []
            for start in range(0, len(conversations), batch_size):
                records.extend(runner(collator(conversations[start : start + batch_size])))
            tensors = _shard_tensors(records, contents, storage)
            save_shard_atomic(tensors, path, {"fingerprint": fingerprint_json})
        else:
            logger.info("keeping complete shard %s", path.name)
        with safe_open(str(path), framework="pt") as handle:
            tokens = handle.get_slice("target_ids").get_shape()[0]
        shards.append(
            {
                "file": path.name,
                "sample_indices": indices,
                "sample_ids": [c.id for c in conversations],
                "tokens": tokens,
                "bytes": path.stat().st_size,
            }
        )
        bar.update(len(conversations))
    bar.close()

    layout = {
        "vocab_size": vocab,
        "top_k": teacher.cache_top_k,
        "id_storage": storage,
        "visual_tokens": visual_tokens,
        "contents": contents.as_dict(),
        "teacher_visual_dim": (
            int(model.config.get_text_config().hidden_size) if adapter.multimodal else None
        ),
        "representation_dim": (
            representation_dim(contents.representation, model.config)
            if contents.representation
            else None
        ),
        "bytes_per_token_fields": bytes_per_token(teacher.cache_top_k, vocab, contents.logits),
    }
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "layout": layout,
        "shards": shards,
        "totals": {
            "samples": sum(len(s["sample_indices"]) for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "skips": dataset.report.as_dict(),
    }
    write_json_atomic(index, cache_dir / INDEX_FILE)
    logger.info(
        "teacher cache %s: %d samples, %d answer tokens, %.1f bytes per token",
        cache_dir,
        index["totals"]["samples"],
        index["totals"]["tokens"],
        index["totals"]["bytes"] / max(index["totals"]["tokens"], 1),
    )
    return cache_dir


# --------------------------------------------------------------------------- reader


@dataclass
class CachedSample:
    """One sample's cached teacher outputs (CPU tensors as stored)."""

    sample_index: int
    sample_id: str
    target_ids: Tensor  # [n] long
    topk_log_probs: Tensor | None  # [n, k] float16
    topk_ids: Tensor | None  # [n, k] long
    tail_log_mass: Tensor | None  # [n] float16
    visual: Tensor | None  # [m, d] float16
    representation: Tensor | None  # [D] float16


class TeacherCache:
    """Read access to a finished cache folder (memory-mapped, shard by shard)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_FILE
        if not index_path.is_file():
            shards = sorted(self.cache_dir.glob("shard-*.safetensors"))
            hint = (
                (
                    f" ({len(shards)} shards written: an interrupted run; rerun "
                    "betakd cache-teacher with the same config to finish it)"
                )
                if shards
                else ""
            )
            raise CacheError(f"teacher.cache_dir: no finished teacher cache at {index_path}{hint}")
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CacheError(
                f"{index_path}: not a {FORMAT} v{VERSION} index (format "
                f"{self.index.get('format')!r}, version {self.index.get('version')!r})"
            )
        self.layout = self.index["layout"]
        self.fingerprint = self.index["fingerprint"]
        self._where: dict[int, tuple[int, int, str]] = {}
        for number, shard in enumerate(self.index["shards"]):
            if not (self.cache_dir / shard["file"]).is_file():
                raise CacheError(
                    f"{self.cache_dir / shard['file']}: listed in the index but missing"
                )
            for row, (idx, sid) in enumerate(zip(shard["sample_indices"], shard["sample_ids"])):
                self._where[int(idx)] = (number, row, str(sid))
        self._open: OrderedDict[int, tuple] = OrderedDict()

    @property
    def contents(self) -> dict:
        return self.layout["contents"]

    @property
    def vocab_size(self) -> int:
        return int(self.layout["vocab_size"])

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sample_index: int) -> bool:
        return int(sample_index) in self._where

    def validate(self, config: cfg.TrainConfig, tokenizer) -> None:
        """The config's data, tokenizer and teacher must be those the cache was written for."""
        expected = data_fingerprint(config, tokenizer)
        changed = [
            f"{_WHAT_CHANGED[k]} ({k})"
            for k in CHECKED_FIELDS
            if expected[k] != self.fingerprint.get(k)
        ]
        if config.teacher.path and Path(config.teacher.path).expanduser().is_dir():
            now = teacher_identity(config.teacher.path)
            if not same_teacher(now, self.fingerprint.get("teacher") or {}):
                changed.append(f"teacher config.json ({config.teacher.path})")
        if config.channels.logits and config.teacher.cache_top_k != self.fingerprint.get("top_k"):
            changed.append(
                f"teacher.cache_top_k ({self.fingerprint.get('top_k')} in the cache, now "
                f"{config.teacher.cache_top_k})"
            )
        if changed:
            raise CacheError(
                f"teacher cache {self.cache_dir} does not match this run; changed since it was "
                f"written: {', '.join(changed)}. Rerun betakd cache-teacher into a fresh "
                "teacher.cache_dir."
            )
        self.check_contents(cache_contents(config))

    def check_contents(self, needs: CacheContents) -> None:
        have = self.contents
        missing = []
        if needs.logits and not have["logits"]:
            missing.append("top-k logits (channels.logits)")
        if needs.visual and not have["visual"]:
            missing.append("visual tokens (channels.features)")
        if needs.representation and needs.representation != have["representation"]:
            missing.append(
                f"representation {needs.representation!r} (weighting.representation; cached: "
                f"{have['representation']!r})"
            )
        if missing:
            raise CacheError(
                f"teacher cache {self.cache_dir} was written without {', '.join(missing)}; "
                "rerun betakd cache-teacher with this config"
            )

    def check_covers(self, sample_indices: Sequence[int], sample_ids: Sequence[str]) -> None:
        """Every training sample must be cached (a teacher-side skip leaves it out)."""
        missing = [sid for idx, sid in zip(sample_indices, sample_ids) if int(idx) not in self]
        if missing:
            raise CacheError(
                f"teacher cache {self.cache_dir} lacks {len(missing)} training samples "
                f"(e.g. {missing[:5]}); the teacher skipped them or data.limit grew"
            )

    def _shard(self, number: int):
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        path = self.cache_dir / self.index["shards"][number]["file"]
        handle = safe_open(str(path), framework="pt")
        keys = set(handle.keys())
        token_offsets = handle.get_tensor("token_offsets")
        visual_offsets = handle.get_tensor("visual_offsets") if "visual_offsets" in keys else None
        entry = (handle, keys, token_offsets, visual_offsets)
        self._open[number] = entry
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return entry

    def sample(self, sample_index: int) -> CachedSample:
        if int(sample_index) not in self._where:
            raise CacheError(f"sample at data row {int(sample_index)} is not in {self.cache_dir}")
        number, row, sample_id = self._where[int(sample_index)]
        handle, keys, token_offsets, visual_offsets = self._shard(number)
        a, b = int(token_offsets[row]), int(token_offsets[row + 1])

        def rows(name, start=a, stop=b):
            return handle.get_slice(name)[start:stop] if name in keys else None

        visual = None
        if visual_offsets is not None:
            visual = rows("visual", int(visual_offsets[row]), int(visual_offsets[row + 1]))
        representation = rows("representation", row, row + 1)
        topk_ids = rows("topk_ids")
        return CachedSample(
            sample_index=int(sample_index),
            sample_id=sample_id,
            target_ids=decode_ids(rows("target_ids"), rows("target_ids_high")),
            topk_log_probs=rows("topk_log_probs"),
            topk_ids=None if topk_ids is None else decode_ids(topk_ids, rows("topk_ids_high")),
            tail_log_mass=rows("tail_log_mass"),
            visual=visual,
            representation=None if representation is None else representation[0],
        )


# --------------------------------------------------------------------------- cached teacher


def _ranks(batch_index: Tensor, batch_size: int) -> Tensor:
    """Position of each aligned row among its sample's rows (rows are sample-major)."""
    if batch_index.numel() > 1 and not bool((batch_index[1:] >= batch_index[:-1]).all()):
        raise ValueError("aligned positions must be grouped by sample in batch order")
    counts = torch.bincount(batch_index, minlength=batch_size)
    starts = counts.cumsum(0) - counts
    return torch.arange(batch_index.numel(), device=batch_index.device) - starts[batch_index]


class CachedTeacher:
    """Teacher targets read from a :class:`TeacherCache`; loads no teacher model.

    ``align`` gives the aligned positions from the student batch alone (answer tokens
    in order, cut to the cached count like the online path cuts to the shorter side).
    ``__call__`` mirrors ``OnlineTeacher.__call__`` plus the batch's ``sample_index``.
    """

    adapter = None  # no teacher-side batch exists to align

    def __init__(
        self,
        cache: TeacherCache,
        *,
        vocab_rows: int,
        need_logits: bool,
        need_visual: bool,
        representation: str | None,
    ) -> None:
        if need_logits and cache.vocab_size != vocab_rows:
            raise CacheError(
                f"teacher cache {cache.cache_dir} has a vocabulary of {cache.vocab_size} "
                f"tokens, the student {vocab_rows}"
            )
        cache.check_contents(CacheContents(need_logits, need_visual, representation))
        self.cache = cache
        self.vocab_rows = vocab_rows
        self.need_logits = need_logits
        self.need_visual = need_visual
        self.representation = representation
        self.device = torch.device("cpu")

    @property
    def teacher_visual_dim(self) -> int | None:
        return self.cache.layout["teacher_visual_dim"]

    @property
    def representation_dim(self) -> int | None:
        return self.cache.layout["representation_dim"]

    def check_covers(self, dataset) -> None:
        """Every sample of a ``ConversationDataset`` must be in the cache (checked up front)."""
        conversations = list(dataset.conversations)
        self.cache.check_covers([c.index for c in conversations], [c.id for c in conversations])

    def prepare(self, accelerator) -> CachedTeacher:
        """Outputs go to the process's device; there is no model to place or shard."""
        return self.to(accelerator.device)

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.device = torch.device(device)
        return self

    def _samples(self, sample_index) -> list[CachedSample]:
        if sample_index is None:
            raise CacheError("the cached teacher needs the batch's sample_index")
        return [self.cache.sample(int(i)) for i in torch.as_tensor(sample_index).tolist()]

    def align(self, student_batch: dict, sample_index, sample_ids=None) -> AlignedPositions:
        """Student answer positions, cut per sample to the cached tokens, ids checked."""
        own = align_positions(student_batch, student_batch, sample_ids=sample_ids)
        samples = self._samples(sample_index)
        batch_index = own.batch_index.cpu()
        ranks = _ranks(batch_index, own.batch_size)
        cached_counts = torch.tensor([s.target_ids.numel() for s in samples], dtype=torch.long)
        keep = ranks < cached_counts[batch_index]
        kept_rows, kept_ranks = batch_index[keep], ranks[keep]
        token_ids = own.token_ids.cpu()[keep]
        self._check_targets(samples, kept_rows, kept_ranks, token_ids)
        device = own.batch_index.device
        return AlignedPositions(
            batch_index=kept_rows.to(device),
            student_pos=own.student_pos[keep.to(device)],
            teacher_pos=kept_ranks.to(device),  # the i-th cached answer token
            token_ids=token_ids.to(device),
            is_answer=own.is_answer[keep.to(device)],
            batch_size=own.batch_size,
        )

    @staticmethod
    def _check_targets(samples, rows: Tensor, ranks: Tensor, token_ids: Tensor) -> None:
        for row, sample in enumerate(samples):
            mine = rows == row
            expected = token_ids[mine]
            if mine.any() and int(ranks[mine].max()) >= sample.target_ids.numel():
                raise CacheError(f"sample {sample.sample_id}: more aligned tokens than cached")
            cached = sample.target_ids[ranks[mine]]
            if not torch.equal(cached, expected):
                first = int((cached != expected).nonzero()[0])
                raise CacheError(
                    f"sample {sample.sample_id} (data row {sample.sample_index}): cached answer "
                    f"token {first} is {int(cached[first])}, the student batch has "
                    f"{int(expected[first])}; the cache was written for another tokenization"
                )

    @torch.no_grad()
    def __call__(
        self,
        teacher_batch,
        aligned: AlignedPositions,
        image_counts: Sequence[int],
        sample_index=None,
    ) -> TeacherTargets:
        del teacher_batch  # nothing to run: the cache replaces the teacher batch
        samples = self._samples(sample_index)
        if len(samples) != aligned.batch_size:
            raise CacheError(f"{len(samples)} sample indices for a batch of {aligned.batch_size}")
        rows = aligned.batch_index.cpu()
        ranks = _ranks(rows, aligned.batch_size)
        self._check_targets(samples, rows, ranks, aligned.token_ids.cpu())
        logits = self._logits(samples, rows, ranks) if self.need_logits else None
        visual = self._visual(samples, image_counts) if self.need_visual else None
        representation = None
        if self.representation is not None:
            representation = torch.stack([s.representation.float() for s in samples])
            representation = representation.to(self.device)
        return TeacherTargets(logits=logits, visual=visual, representation=representation)

    def _logits(self, samples, rows: Tensor, ranks: Tensor) -> Tensor:
        pieces = [[], [], []]
        for row, sample in enumerate(samples):
            pick = ranks[rows == row]
            pieces[0].append(sample.topk_log_probs[pick])
            pieces[1].append(sample.topk_ids[pick])
            pieces[2].append(sample.tail_log_mass[pick])
        values, ids, tail = (torch.cat(p) for p in pieces)
        return dense_from_topk(values, ids, tail, self.vocab_rows).to(self.device)

    def _visual(self, samples, image_counts: Sequence[int]) -> list[Tensor]:
        out = []
        for sample, count in zip(samples, image_counts):
            if count and sample.visual.shape[0] == 0:
                raise CacheError(
                    f"sample {sample.sample_id}: the batch has {count} images but the cache "
                    "holds no visual tokens for it"
                )
            out.append(sample.visual.float().to(self.device))
        return out


def build_cached_teacher(
    config: cfg.TrainConfig,
    student_adapter: models.FamilyAdapter,
    vocab_rows: int,
    representation: str | None,
    *,
    tokenizer,
) -> CachedTeacher:
    """The trainer's teacher for ``teacher.source: cache``, validated against the run.

    ``tokenizer`` is the student's processor or tokenizer: the cache's vocabulary hash
    must match it (teacher and student share one vocabulary for logit KD).
    """
    if config.teacher.source != "cache":
        raise CacheError("teacher.source: build_cached_teacher needs 'cache'")
    needs = cache_contents(config)
    if needs.visual and not student_adapter.multimodal:
        raise CacheError("channels.features: the student is text-only, it has no visual tokens")
    cache = TeacherCache(config.teacher.cache_dir)
    cache.validate(config, tokenizer)
    return CachedTeacher(
        cache,
        vocab_rows=vocab_rows,
        need_logits=needs.logits,
        need_visual=needs.visual,
        representation=representation,
    )
