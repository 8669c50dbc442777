"""Writing the offline teacher cache: run the teacher once over a data set.

The records come from a teacher source (:mod:`betakd.teachers.protocol`), the same
computation training with that source uses, on batches encoded for the teacher's
tokenizer, so the aligned tokens are the answers' tokens in order: an
:class:`~betakd.teachers.online.OnlineTeacher` (its own batch aligned with itself) or a
:class:`~betakd.teachers.served.ServedTeacher` (a vLLM server's top-k, requests of a
batch in flight at once). This module only summarises them (top-k + tail, pooled visual
tokens) and stores them (format: :mod:`betakd.teachers.cache_format`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from betakd import align, files
from betakd.data import ConversationDataset, KDCollator, SampleEncoder
from betakd.teachers.cache_defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
    DEFAULT_VISUAL_TOKENS,
)
from betakd.teachers.cache_format import (
    FLOAT_STORAGE,
    FORMAT,
    INDEX_FILE,
    MASS_K,
    MASS_SUM,
    SHARD_NAME,
    VERSION,
    CacheContents,
    CacheError,
    bytes_per_token,
    differences,
    encode_ids,
    id_storage,
)
from betakd.teachers.protocol import BatchMeta, TeacherSource
from betakd.teachers.targets import TopKLogits, captured_mass, topk_summary

logger = logging.getLogger(__name__)

# Below this mean share of the teacher's probability mass in the top k, the cached
# distribution is mostly the tail rule's guess: `cache-teacher` warns and suggests a k.
MIN_MEAN_TOPK_MASS = 0.9
# The other k the writer measures the mass of, as multiples of the cached k.
MASS_MULTIPLES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class CacheSource:
    """A teacher source to cache and what the index records of its teacher.

    ``source`` gives targets for a collated batch of the teacher's own encoding;
    ``contents`` is what it is asked for; ``visual_dim`` the width of its visual tokens
    (None: text-only); ``representation_dim`` that of h(x) when cached; ``chunk_size``:
    rows of dense logits at a time when summarising; ``top_k_given``: a source that only
    gives a top-k (a server) and its k, which bounds the cache's.
    """

    source: TeacherSource
    contents: CacheContents
    vocab_rows: int
    visual_dim: int | None
    representation_dim: int | None = None
    chunk_size: int | None = None
    top_k_given: int | None = None


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


def write_cache(
    cache_dir: str | Path,
    teacher: CacheSource,
    encoder: SampleEncoder,
    dataset: ConversationDataset,
    *,
    fingerprint: dict,
    top_k: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    visual_tokens: int = DEFAULT_VISUAL_TOKENS,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``teacher`` over ``dataset`` (encoded by ``encoder``) and write the cache.

    What is stored follows what the teacher is asked for (``teacher.contents``).
    ``fingerprint`` identifies the run's inputs (data file, tokenizer, teacher; see
    :mod:`~betakd.teachers.cache_format`); the settings of this call are added to it.
    Resumable: shards already on disk (complete by construction) are kept, so an
    interrupted run continues where it stopped. ``index.json`` is written last, so a folder without it is an unfinished
    cache that readers refuse.
    """
    if shard_size < 1 or batch_size < 1 or visual_tokens < 1:
        raise ValueError("shard_size, batch_size and visual_tokens must be >= 1")
    contents = teacher.contents
    vocab = teacher.vocab_rows
    storage = id_storage(vocab)
    if contents.logits and top_k > vocab:
        raise CacheError(f"teacher.cache_top_k: {top_k} > vocabulary of {vocab}")
    if contents.logits and teacher.top_k_given is not None and top_k > teacher.top_k_given:
        raise CacheError(
            f"teacher.cache_top_k: {top_k} > the {teacher.top_k_given} log-probabilities the "
            "teacher gives per token (teacher.server.top_k)"
        )
    if contents.visual and teacher.visual_dim is None:
        raise CacheError("channels.features: the teacher is text-only, it has no visual tokens")
    fingerprint = {
        **fingerprint,
        "top_k": top_k,
        "visual_tokens": visual_tokens,
        "storage": FLOAT_STORAGE,
        "contents": contents.as_dict(),
    }
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_existing_index(cache_dir, fingerprint)
    for stale in files.leftover_temp_files(cache_dir):
        logger.info("removing %s, left over by an interrupted write", stale)
        stale.unlink()

    summarise = _Summariser(teacher, top_k, visual_tokens, torch.device(device))
    collator = KDCollator(encoder)
    shards: list[dict] = []
    shard_tails: list[Tensor] = []
    bar = tqdm(total=len(dataset), desc="caching teacher", unit="sample", disable=not progress)
    for number, positions in enumerate(_shard_plan(len(dataset), shard_size)):
        conversations = [dataset[p] for p in positions]
        indices = [c.index for c in conversations]
        path = cache_dir / SHARD_NAME.format(number)
        if not _shard_is_complete(path, fingerprint_json, indices):
            records = []
            summarise.reset_mass()
            for start in range(0, len(conversations), batch_size):
                records.extend(summarise(collator(conversations[start : start + batch_size])))
            tensors = _shard_tensors(records, contents, storage)
            if contents.logits:
                tensors.update(summarise.mass_tensors())
            files.write_atomic(
                path,
                lambda tmp, t=tensors: save_file(
                    {k: v.contiguous() for k, v in t.items()},
                    str(tmp),
                    metadata={"fingerprint": fingerprint_json},
                ),
            )
        else:
            logger.info("keeping complete shard %s", path.name)
        with safe_open(str(path), framework="pt") as handle:
            tokens = handle.get_slice("target_ids").get_shape()[0]
            tails = handle.get_tensor("tail_log_mass").float() if contents.logits else None
            mass = _mass_record(handle, tokens) if MASS_K in handle.keys() else None
        if tails is not None:
            shard_tails.append(tails)
        shards.append(
            {
                "file": path.name,
                "sample_indices": indices,
                "sample_ids": [c.id for c in conversations],
                "tokens": tokens,
                "bytes": path.stat().st_size,
                **({"topk_mass": mass} if mass is not None else {}),
            }
        )
        bar.update(len(conversations))
    bar.close()

    layout = {
        "vocab_size": vocab,
        "top_k": top_k,
        "id_storage": storage,
        "visual_tokens": visual_tokens,
        "contents": contents.as_dict(),
        "teacher_visual_dim": teacher.visual_dim,
        "representation_dim": teacher.representation_dim if contents.representation else None,
        "bytes_per_token_fields": bytes_per_token(top_k, vocab, contents.logits),
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
    if contents.logits:
        index["topk_mass"] = topk_mass_report(top_k, shards, shard_tails)
    files.write_json_atomic(cache_dir / INDEX_FILE, index)
    for line in describe_cache(index):
        logger.info("%s: %s", cache_dir, line)
    if contents.logits and index["topk_mass"]["mean"] < MIN_MEAN_TOPK_MASS:
        logger.warning("%s", low_mass_warning(index["topk_mass"], top_k))
    return cache_dir


def _mass_record(handle, tokens: int) -> dict:
    ks, sums = handle.get_tensor(MASS_K).tolist(), handle.get_tensor(MASS_SUM).tolist()
    return {"tokens": tokens, "sums": {str(k): v for k, v in zip(ks, sums)}}


def topk_mass_report(top_k: int, shards: Sequence[dict], tails: Sequence[Tensor]) -> dict:
    """The share of the teacher's probability mass its cached top-k holds, over every
    answer token: mean, 10% quantile and minimum (from the stored tails), and the mean
    with larger k (from the writer's sums; absent when a shard predates them)."""
    captured = 1.0 - torch.cat(list(tails)).double().exp() if tails else torch.ones(1)
    report = {
        "k": top_k,
        "mean": float(captured.mean()),
        "p10": float(torch.quantile(captured, 0.1)),
        "min": float(captured.min()),
    }
    if shards and all("topk_mass" in s for s in shards):
        tokens = sum(s["topk_mass"]["tokens"] for s in shards)
        keys = shards[0]["topk_mass"]["sums"]
        report["mean_by_k"] = {
            k: sum(s["topk_mass"]["sums"][k] for s in shards) / max(tokens, 1) for k in keys
        }
    return report


def low_mass_warning(mass: dict, top_k: int) -> str:
    by_k = {int(k): v for k, v in mass.get("mean_by_k", {}).items()}
    enough = [k for k, v in sorted(by_k.items()) if v >= MIN_MEAN_TOPK_MASS]
    if enough:
        advice = f"teacher.cache_top_k: {enough[0]} would hold {by_k[enough[0]]:.0%} on average"
    elif by_k:
        largest = max(by_k)
        advice = (
            f"even k = {largest} holds only {by_k[largest]:.0%}: this teacher spreads its "
            "probability widely (check that it answers in the data's format), or train with "
            "the online teacher"
        )
    else:
        advice = "raise teacher.cache_top_k"
    return (
        f"the cached top {top_k} tokens hold {mass['mean']:.0%} of the teacher's probability "
        f"on average (10% of answer tokens: under {mass['p10']:.0%}), below "
        f"{MIN_MEAN_TOPK_MASS:.0%}: the cached energies see mostly the evenly spread tail, "
        f"not the teacher's distribution, and differ from the online teacher's; {advice}"
    )


def describe_cache(index: dict) -> list[str]:
    """What a cache holds and costs, in lines for the user: sizes per answer token and
    per sample, and the top-k's captured mass."""
    totals, layout = index["totals"], index["layout"]
    tokens, samples = max(totals["tokens"], 1), max(totals["samples"], 1)
    per_token = layout["bytes_per_token_fields"]
    per_sample = (totals["bytes"] - per_token * totals["tokens"]) / samples
    lines = [
        f"{totals['samples']} samples, {totals['tokens']} answer tokens, "
        f"{totals['bytes'] / 1e6:.1f} MB: {totals['bytes'] / tokens:.0f} bytes per answer "
        f"token in all, of which {per_token} per token for the answer ids and the top-k, "
        f"and {per_sample:.0f} per sample for the pooled visual tokens, the "
        "representation, offsets and file headers"
    ]
    mass = index.get("topk_mass")
    if mass is not None:
        lines.append(
            f"the top {mass['k']} hold {mass['mean']:.1%} of the teacher's probability on "
            f"average (10% quantile {mass['p10']:.1%}, minimum {mass['min']:.1%})"
        )
    return lines


def _to_half(values: Tensor, what: str, sample_id: str) -> Tensor:
    """float16 for storage; an overflow is an error naming the sample, never a silent inf."""
    half = values.detach().float().cpu().half()
    if not torch.isfinite(half).all():
        raise CacheError(
            f"sample {sample_id}: {what} has values outside float16's range "
            f"(max |x| = {float(values.abs().max()):.3g}); the cache stores float16"
        )
    return half


class _Summariser:
    """The teacher's targets for one collated batch, cut into per-sample records."""

    def __init__(
        self, teacher: CacheSource, top_k: int, visual_tokens: int, device: torch.device
    ) -> None:
        self.teacher = teacher
        self.top_k = top_k
        self.visual_tokens = visual_tokens
        self.device = device
        # The mass of larger k is measured where the source has it.
        largest = min(teacher.vocab_rows, teacher.top_k_given or teacher.vocab_rows)
        self.mass_ks = sorted({min(top_k * m, largest) for m in MASS_MULTIPLES})
        self.reset_mass()

    def reset_mass(self) -> None:
        self.mass_sums = torch.zeros(len(self.mass_ks), dtype=torch.float64)
        self.mass_tokens = 0

    def mass_tensors(self) -> dict[str, Tensor]:
        """The captured-mass sums since the last reset (a shard's), as shard tensors (the
        header's metadata order is not deterministic, tensors are)."""
        return {MASS_K: torch.tensor(self.mass_ks), MASS_SUM: self.mass_sums.clone()}

    @torch.no_grad()
    def __call__(self, batch: dict) -> list[_SampleRecord]:
        sample_ids = batch["sample_ids"]
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        index = batch["sample_index"]
        meta = BatchMeta.pop_from(batch)
        # The batch is the teacher's own encoding: it is the source's student batch and
        # its teacher batch at once, so the aligned tokens are its answer tokens in order.
        meta.teacher_batches = {None: batch}
        aligned, targets = self.teacher.source(batch, meta)
        top = self._topk(targets.tokens) if self.teacher.contents.logits else None
        records = []
        rows = aligned.batch_index.cpu()
        for row, sample_id in enumerate(sample_ids):
            mine = (rows == row).nonzero().flatten()
            record = _SampleRecord(
                index=int(index[row]),
                sample_id=str(sample_id),
                target_ids=aligned.token_ids[mine.to(aligned.token_ids.device)].cpu(),
            )
            if top is not None:
                values, ids, tail = (t[mine.to(t.device)] for t in top)
                record.topk_log_probs = _to_half(values, "top-k log-probabilities", sample_id)
                record.topk_ids = ids.cpu()
                record.tail_log_mass = _to_half(tail, "tail log-mass", sample_id)
            if targets.visual is not None:
                record.visual = self._pooled_visual(targets.visual[row], sample_id)
            if targets.representation is not None:
                record.representation = _to_half(
                    targets.representation[row], "representation", sample_id
                )
            records.append(record)
        return records

    def _topk(self, tokens) -> tuple[Tensor, Tensor, Tensor]:
        """The top-k summary of every aligned row, built a chunk of rows at a time (a
        source's own top-k is kept as it came, cut to the cache's k)."""
        if isinstance(tokens, TopKLogits):
            self.mass_sums += tokens.captured_mass(self.mass_ks).sum(dim=0).double().cpu()
            self.mass_tokens += tokens.num_tokens
            return tokens.truncated(self.top_k)
        n, size = tokens.num_tokens, self.teacher.chunk_size or tokens.num_tokens or 1
        parts = []
        for start in range(0, max(n, 1), size):
            logits = tokens.logits(start, min(start + size, n), self.teacher.vocab_rows)
            parts.append(topk_summary(logits, self.top_k))
            self.mass_sums += captured_mass(logits, self.mass_ks).sum(dim=0).double().cpu()
            self.mass_tokens += logits.shape[0]
        return tuple(torch.cat(p) for p in zip(*parts))

    def _pooled_visual(self, tokens: Tensor, sample_id: str) -> Tensor:
        if tokens.shape[0] == 0:
            return torch.empty(0, tokens.shape[-1], dtype=torch.float16)
        pooled = align.pool_tokens(tokens.float(), min(self.visual_tokens, tokens.shape[0]))
        return _to_half(pooled, "visual tokens", sample_id)


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


def _shard_plan(num_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def _check_existing_index(cache_dir: Path, fingerprint: dict) -> None:
    index_path = cache_dir / INDEX_FILE
    if not index_path.is_file():
        return
    found = json.loads(index_path.read_text(encoding="utf-8")).get("fingerprint", {})
    changed = differences(fingerprint, found, sorted(set(fingerprint) | set(found)))
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
