"""Reading the offline teacher cache, and the cached teacher source built on it.

:class:`TeacherCache` gives read access to a finished cache folder (format:
:mod:`betakd.teachers.cache_format`); :class:`CachedTeacher` serves the trainer's
teacher targets from it, with the same protocol as the online teacher, and loads no
teacher model. Its per-token targets stay a top-k summary
(:class:`~betakd.teachers.targets.TopKLogits`): dense rows are only built for the
rows a loss asks for, all at once on the dense path, a chunk at a time with
``channels.chunk_size``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from betakd.align import AlignedPositions, align_positions
from betakd.teachers.cache_format import (
    CHECKED_FIELDS,
    FORMAT,
    INDEX_FILE,
    SHARD_GLOB,
    VERSION,
    CacheContents,
    CacheError,
    decode_ids,
    same_teacher,
    teacher_identity,
)
from betakd.teachers.protocol import BatchMeta, TeacherTargets
from betakd.teachers.targets import TopKLogits

# Open shards kept memory-mapped at once by the reader.
OPEN_SHARDS = 32


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
            shards = sorted(self.cache_dir.glob(SHARD_GLOB))
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

    @property
    def teacher_visual_dim(self) -> int | None:
        return self.layout["teacher_visual_dim"]

    @property
    def representation_dim(self) -> int | None:
        return self.layout["representation_dim"]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sample_index: int) -> bool:
        return int(sample_index) in self._where

    def check_fingerprint(
        self, expected: dict, *, teacher_path: str | None = None, top_k: int | None = None
    ) -> None:
        """The run's data and tokenizer (``expected``, from
        :func:`~betakd.teachers.cache_format.data_fingerprint`), its teacher folder (when
        it exists here) and its top k (when logits are used) must be the cache's."""
        changed = [
            f"{what} ({key})"
            for key, what in CHECKED_FIELDS.items()
            if expected[key] != self.fingerprint.get(key)
        ]
        if teacher_path and Path(teacher_path).expanduser().is_dir():
            now = teacher_identity(teacher_path)
            if not same_teacher(now, self.fingerprint.get("teacher") or {}):
                changed.append(f"teacher config.json ({teacher_path})")
        if top_k is not None and top_k != self.fingerprint.get("top_k"):
            changed.append(
                f"teacher.cache_top_k ({self.fingerprint.get('top_k')} in the cache, now {top_k})"
            )
        if changed:
            raise CacheError(
                f"teacher cache {self.cache_dir} does not match this run; changed since it was "
                f"written: {', '.join(changed)}. Rerun betakd cache-teacher into a fresh "
                "teacher.cache_dir."
            )

    def check_contents(self, needs: CacheContents) -> None:
        missing = needs.missing_from(self.contents)
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


def token_ranks(batch_index: Tensor, batch_size: int) -> Tensor:
    """Position of each aligned row among its sample's rows (rows are sample-major)."""
    if batch_index.numel() > 1 and not bool((batch_index[1:] >= batch_index[:-1]).all()):
        raise ValueError("aligned positions must be grouped by sample in batch order")
    counts = torch.bincount(batch_index, minlength=batch_size)
    starts = counts.cumsum(0) - counts
    return torch.arange(batch_index.numel(), device=batch_index.device) - starts[batch_index]


class CachedTeacher:
    """Teacher targets read from a :class:`TeacherCache` (a teacher source).

    The aligned positions come from the student batch alone: its answer tokens in
    order, cut per sample to the cached count (as the online path cuts to the shorter
    side), each checked against the token the cache says it predicts.
    """

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

    def prepare(self, accelerator) -> CachedTeacher:
        """Outputs go to the process's device; there is no model to place or shard."""
        self.device = torch.device(accelerator.device)
        return self

    def __call__(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        samples = [self.cache.sample(int(i)) for i in torch.as_tensor(meta.sample_index).tolist()]
        aligned, ranks = self._align(student_batch, samples, meta.sample_ids)
        targets = self._targets(samples, aligned.batch_index.cpu(), ranks, meta.image_counts)
        return aligned, targets

    def own_targets(
        self, student_batch: dict, meta: BatchMeta
    ) -> tuple[AlignedPositions, TeacherTargets]:
        """The cached answer tokens with their targets, aligned with themselves (what a
        teacher of another tokenizer is aligned from by text). The cache keeps no turn
        boundaries: a sample's cached answer tokens are one run."""
        del student_batch  # the cache holds the teacher's own tokens
        samples = [self.cache.sample(int(i)) for i in torch.as_tensor(meta.sample_index).tolist()]
        counts = [s.target_ids.numel() for s in samples]
        rows = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts))
        ranks = torch.cat([torch.arange(n) for n in counts]) if counts else rows
        aligned = AlignedPositions(
            batch_index=rows.to(self.device),
            student_pos=ranks.to(self.device),  # consecutive: one run per sample
            teacher_pos=ranks.to(self.device),
            token_ids=torch.cat([s.target_ids.long() for s in samples]).to(self.device),
            is_answer=torch.ones(len(rows), dtype=torch.bool, device=self.device),
            batch_size=len(samples),
        )
        return aligned, self._targets(samples, rows, ranks, meta.image_counts)

    def cached_answer_runs(self, conversation) -> list[list[int]]:
        """A sample's cached answer tokens, as one run."""
        return [self.cache.sample(conversation.index).target_ids.tolist()]

    def _targets(self, samples, rows: Tensor, ranks: Tensor, image_counts) -> TeacherTargets:
        tokens = self._tokens(samples, rows, ranks) if self.need_logits else None
        visual = self._visual(samples, image_counts) if self.need_visual else None
        representation = None
        if self.representation is not None:
            representation = torch.stack([s.representation.float() for s in samples])
            representation = representation.to(self.device)
        return TeacherTargets(tokens, visual, representation)

    def _align(
        self, student_batch: dict, samples: list[CachedSample], sample_ids
    ) -> tuple[AlignedPositions, Tensor]:
        """Student answer positions, cut per sample to the cached tokens, ids checked;
        and each kept row's rank among its sample's cached tokens."""
        own = align_positions(student_batch, student_batch, sample_ids=sample_ids)
        batch_index = own.batch_index.cpu()
        ranks = token_ranks(batch_index, own.batch_size)
        cached_counts = torch.tensor([s.target_ids.numel() for s in samples], dtype=torch.long)
        keep = ranks < cached_counts[batch_index]
        kept_rows, kept_ranks = batch_index[keep], ranks[keep]
        token_ids = own.token_ids.cpu()[keep]
        _check_targets(samples, kept_rows, kept_ranks, token_ids)
        device = own.batch_index.device
        aligned = AlignedPositions(
            batch_index=kept_rows.to(device),
            student_pos=own.student_pos[keep.to(device)],
            teacher_pos=kept_ranks.to(device),  # the i-th cached answer token
            token_ids=token_ids.to(device),
            is_answer=own.is_answer[keep.to(device)],
            batch_size=own.batch_size,
        )
        return aligned, kept_ranks

    def _tokens(self, samples, rows: Tensor, ranks: Tensor) -> TopKLogits:
        pieces = [[], [], []]
        for row, sample in enumerate(samples):
            pick = ranks[rows == row]
            pieces[0].append(sample.topk_log_probs[pick])
            pieces[1].append(sample.topk_ids[pick])
            pieces[2].append(sample.tail_log_mass[pick])
        values, ids, tail = (torch.cat(p).to(self.device) for p in pieces)
        return TopKLogits(values, ids, tail, self.vocab_rows)

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


def _check_targets(samples, rows: Tensor, ranks: Tensor, token_ids: Tensor) -> None:
    for row, sample in enumerate(samples):
        mine = rows == row
        expected = token_ids[mine]
        cached = sample.target_ids[ranks[mine]]
        if not torch.equal(cached, expected):
            first = int((cached != expected).nonzero()[0])
            raise CacheError(
                f"sample {sample.sample_id} (data row {sample.sample_index}): cached answer "
                f"token {first} is {int(cached[first])}, the student batch has "
                f"{int(expected[first])}; the cache was written for another tokenization"
            )
