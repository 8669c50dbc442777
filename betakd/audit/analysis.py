"""From per-sample scores to what the audit reports: where each teacher is probably
wrong, which labels are probably wrong, per slice of the data's metadata.

Tensors and plain values in, JSON-ready dicts out; `betakd.audit.run` feeds it the
scores and the trainer's weighting, `betakd.audit.report` writes it out.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from betakd.eval.normalize import normalize_answer
from betakd.reliability import TeacherReliability
from betakd.weighting import CE, Weighting

ABSENT = "(absent)"
# Fields of a LLaVA record that are the sample itself, not metadata about it.
RECORD_FIELDS = ("id", "image", "conversations")
# A slice is reported once it holds this many samples (and this share of the data).
MIN_SLICE_SAMPLES = 5
MIN_SLICE_SHARE = 0.005


# --------------------------------------------------------------------------- reliability


def reliability_posteriors(
    reliability: TeacherReliability, nll: Tensor, chunks
) -> tuple[Tensor, Tensor]:
    """``P(teacher right) [N, T]`` and ``P(label right) [N]`` (several teachers' evidence
    combined as in training), over ``chunks`` of ``(rows, h(x))``."""
    teacher_right = torch.empty(nll.shape, dtype=torch.float64)
    label_right = torch.empty(nll.shape[0], dtype=torch.float64)
    for rows, representation in chunks:
        right, label = reliability.factors(nll[rows], representation)
        teacher_right[rows] = right.double()
        label_right[rows] = label.double()
    return teacher_right, label_right


def channel_nll(weighting: Weighting, nll: Tensor, teachers: Sequence[str | None]) -> Tensor:
    """What the weighting receives in training from per-teacher NLLs ``[N, T]``: ``[N]``
    for one teacher, else ``[N, K]``, each weighted channel its teacher's (CE: the first)."""
    if len(teachers) == 1:
        return nll[:, 0]
    return nll[:, weighting.reliability_teacher]


def configured_trust(
    weighting: Weighting, nll: Tensor, teachers: Sequence[str | None], chunks
) -> Tensor | None:
    """``[N, T]``: the factor the configured weighting's data trust or reliability puts
    on each teacher's channels (its first channel's), exactly as in training; None when
    the weighting has neither (every sample keeps the teacher's full weight)."""
    if not weighting.needs_teacher_nll:
        return None
    per_channel = channel_nll(weighting, nll, teachers)
    first_channel = {}
    for column, channel in enumerate(weighting.weighted_channels):
        if channel != CE:
            first_channel.setdefault(weighting.reliability_teacher[column], column)
    factors = torch.empty(nll.shape, dtype=torch.float64)
    for rows, representation in chunks:
        values = weighting.teacher_factors(per_channel[rows], representation)
        for t in range(len(teachers)):
            factors[rows, t] = values[:, first_channel[t]].double()
    return factors


# --------------------------------------------------------------------------- metadata


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A record's metadata as ``field -> text``: nested mappings by dotted names
    (``meta.colour``), lists and other values as JSON; None is left out."""
    out: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key in RECORD_FIELDS:
            continue
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, ensure_ascii=False)
    return out


def metadata_columns(
    records: Sequence[Mapping[str, Any]], ignore: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Per metadata field, every sample's value (``ABSENT`` where it has none); fields
    named in ``ignore`` (or below them: ``meta`` ignores ``meta.noisy``) are left out."""
    flat = [flatten(r) for r in records]
    names = sorted({k for f in flat for k in f})
    kept = [n for n in names if not any(n == i or n.startswith(f"{i}.") for i in ignore)]
    return {n: [f.get(n, ABSENT) for f in flat] for n in kept}


# --------------------------------------------------------------------------- slices


def slice_table(
    values: Sequence[str], measures: Mapping[str, Tensor], *, sort_by: str, top: int
) -> dict[str, Any]:
    """Per value of one field: its count, share and the mean of every measure
    (``[N]`` tensors); the ``top`` values with the lowest ``sort_by`` first, among those
    with at least ``MIN_SLICE_SAMPLES`` samples and ``MIN_SLICE_SHARE`` of the data."""
    n = len(values)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        rows[value].append(i)
    least = max(MIN_SLICE_SAMPLES, int(MIN_SLICE_SHARE * n))
    table = []
    for value, members in rows.items():
        if len(members) < least:
            continue
        index = torch.tensor(members)
        entry = {"value": value, "samples": len(members), "share": len(members) / n}
        # Which samples, as a short digest: tells slices of the same samples apart.
        entry["members"] = hashlib.sha256(index.numpy().tobytes()).hexdigest()[:16]
        entry.update({k: float(m[index].mean()) for k, m in measures.items()})
        table.append(entry)
    table.sort(key=lambda e: (e[sort_by], -e["samples"]))
    return {
        "distinct_values": len(rows),
        "reported": len(table),
        "smallest_reported": least,
        "slices": table[:top],
    }


def distinct_slices(slices: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slices in order, each group of the same samples once (its first field): the
    answer and an attribute often cut the data identically."""
    seen, kept = set(), []
    for s in slices:
        if s["members"] not in seen:
            seen.add(s["members"])
            kept.append(s)
    return kept


def ranked(score: Tensor, top: int) -> list[int]:
    """Indices of the ``top`` highest scores, highest first (ties: data order)."""
    return torch.sort(score, descending=True, stable=True).indices[:top].tolist()


def teacher_disagreement(
    teachers: Sequence[str], answers: Sequence[Sequence[str]], labels: Sequence[str]
) -> dict[str, Any]:
    """Where several teachers answer differently, which one the data's label supports."""
    norm = [[normalize_answer(a) for a in row] for row in answers]
    label = [normalize_answer(x) for x in labels]
    differ = [i for i, row in enumerate(norm) if len(set(row)) > 1]
    supported: dict[str, int] = defaultdict(int)
    for i in differ:
        winners = [t for t, a in zip(teachers, norm[i]) if a == label[i]]
        supported[winners[0] if len(winners) == 1 else ("several" if winners else "none")] += 1
    return {
        "samples": len(norm),
        "disagree": len(differ),
        "disagree_share": len(differ) / max(len(norm), 1),
        "label_agrees_with": dict(supported),
    }
