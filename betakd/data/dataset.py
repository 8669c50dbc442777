"""The training data set: every record validated once (parsed, images opened, encoded
with every model's processor), skips counted before training starts."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from betakd.data.cache import DataCache
from betakd.data.encoding import Encoded, SampleEncoder
from betakd.data.records import (
    Conversation,
    SkipReport,
    SkipSample,
    load_records,
    open_images,
    parse_record,
)
from betakd.files import file_sha256
from betakd.labels import supervised

logger = logging.getLogger(__name__)
logger = logging.getLogger(__name__)

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
    equal_answers: Collection[str] = (),
) -> ConversationDataset:
    """Read, validate and count skips; every encoder (student, teacher) must accept a sample.

    ``equal_answers``: the encoders (by name) that must also keep the same number of
    answer tokens (an answer cut by ``max_length`` for one model's longer sequence only is
    a ``too_long`` skip); several teachers of the student's tokenizer need it to supervise
    the same student tokens.
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
        kept, report = cache.validated((*key, tuple(sorted(equal_answers))), validate)
    if report.count:
        logger.warning("%s", report.summary())
    report.enforce(max_skip_fraction)
    return ConversationDataset(kept, report)


def _validate(
    records, image_folder, encoders: Mapping[str, SampleEncoder], equal_answers: Collection[str]
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
                _check_equal_answers({name: encoded[name] for name in equal_answers})
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
