"""The audit recipe behind ``betakd audit``: a training config -> the teachers' scores of
its data -> where the teachers and the labels are probably wrong -> a report.

No student is trained. The teachers, the data, the skip rules and the scores come from
the training code (a trainer built from the config, never stepped), so the audit's
numbers are those a training run of the same config sees. The teacher reliability
(docs/weighting.md) needs an input representation h(x): when the configured weighting
has no reliability, the audit's trainer gets one (a task weighting with
`reliability: {}` and the config's `weighting.representation`), and the configured
weighting's own trust is computed beside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from betakd import config as cfg
from betakd import weighting as weightings
from betakd.audit import analysis
from betakd.audit.report import write_report
from betakd.audit.scores import SampleScores, score_samples
from betakd.calibration import fit_reliability
from betakd.data import load_records
from betakd.files import file_sha256

SCORES_FOLDER = "scores"
SINGLE_TEACHER = "teacher"


def audit_config(config: cfg.TrainConfig, output: str | Path) -> cfg.TrainConfig:
    """The config the audit's trainer is built from: the user's, with a teacher
    reliability (and so an h(x)) when its weighting has none, off-policy, logging
    nowhere, and its trainer's folder inside the audit's output."""
    raw = config.model_dump()
    weighting = dict(raw["weighting"])
    if not config.weighting.uses_reliability:
        representation = weighting["representation"]
        if config.data.image_folder is None and representation == "teacher_visual":
            representation = "teacher_answer_hidden"  # text-only data has no visual tokens
        weighting.update(
            name="task",
            options={"reliability": {}},
            representation=representation,
            init_from=None,
        )
    raw["weighting"] = weighting
    raw["policy"] = {"mode": "off_policy"}
    raw["training"] = {
        **raw["training"],
        "output_dir": str(Path(output) / "trainer"),
        "report_to": "none",
    }
    return cfg.validate(raw)


@dataclass(frozen=True)
class AuditOptions:
    """How an audit runs and what it keeps (the command line's options)."""

    ignore_fields: tuple[str, ...] = ()  # metadata fields not to slice by (and below them)
    top: int = 20  # slices and samples kept per list
    part_size: int = 256  # samples per scores file: the unit of resuming
    progress: bool = True


def run_audit(
    config: cfg.TrainConfig, output: str | Path, options: AuditOptions = AuditOptions()
) -> dict[str, Any]:
    """Audit ``config``'s training data with its teachers; writes ``output``/report.md,
    audit.json, samples.jsonl and a plot, and returns what audit.json holds."""
    from betakd.build import build_trainer, training_arguments

    started = time.perf_counter()
    derived = audit_config(config, output)
    trainer = build_trainer(derived, training_arguments(derived))
    return audit_trainer(trainer, config, output, options, started=started)


def audit_trainer(
    trainer,
    config: cfg.TrainConfig,
    output: str | Path,
    options: AuditOptions = AuditOptions(),
    *,
    started: float | None = None,
) -> dict[str, Any]:
    """The audit with a trainer built from ``audit_config(config, output)`` (its teacher
    may be any source of the teacher protocol); ``config`` is the user's, whose
    weighting's trust is reported."""
    started = time.perf_counter() if started is None else started
    output = Path(output)
    weighting = trainer.head.objective.weighting
    scores = score_samples(
        trainer,
        output / SCORES_FOLDER,
        fingerprint=_fingerprint(config),
        part_size=options.part_size,
        progress=options.progress,
    )
    # Training fits on the first `reliability_samples` of the data set that have an answer.
    fit_n = int((scores.positions < config.weighting.reliability_samples).sum())
    fit = fit_reliability(
        weighting.reliability, scores.nll[:fit_n], scores.first_representations(fit_n)
    )
    teacher_right, label_right = analysis.reliability_posteriors(
        weighting.reliability, scores.nll, scores.representation_chunks()
    )
    trust = analysis.configured_trust(
        _configured_weighting(config, weighting, scores),
        scores.nll,
        scores.teachers,
        scores.representation_chunks(),
    )
    result = summarise(
        config,
        trainer,
        scores,
        teacher_right=teacher_right,
        label_right=label_right,
        trust=trust,
        fit=fit,
        ignore_fields=options.ignore_fields,
        top=options.top,
    )
    result["seconds"] = time.perf_counter() - started
    write_report(output, result, result.pop("samples"))
    return result


def _configured_weighting(config: cfg.TrainConfig, audit_weighting, scores: SampleScores):
    """The user's weighting, for its trust: the audit's own when it is the same."""
    if config.weighting.uses_reliability:
        return audit_weighting
    dim = next(scores.representation_chunks())[1].shape[1]
    channels = [weightings.CE, *config.channel_names()]
    return weightings.build(config.weighting.name, channels, **config.weighting_options(dim))


def _fingerprint(config: cfg.TrainConfig) -> dict:
    """What the scores depend on: every setting but the trainer's, and the data file."""
    settings = config.model_dump(mode="json", exclude={"training"})
    text = json.dumps(settings, sort_keys=True)
    return {
        "settings_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "data_sha256": file_sha256(config.data.train_file),
    }


def _names(teachers: Sequence[str | None]) -> list[str]:
    return [SINGLE_TEACHER if t is None else t for t in teachers]


def summarise(
    config: cfg.TrainConfig,
    trainer,
    scores: SampleScores,
    *,
    teacher_right: torch.Tensor,
    label_right: torch.Tensor,
    trust: torch.Tensor | None,
    fit: dict[str, float],
    ignore_fields: Sequence[str],
    top: int,
) -> dict[str, Any]:
    """audit.json's content from the scores and posteriors."""
    names = _names(scores.teachers)
    conversations = trainer.train_dataset.by_index(scores.indices.tolist())
    labels = [_text(c, "assistant") for c in conversations]
    records = load_records(config.data.train_file).select(scores.indices.tolist())
    fields = analysis.metadata_columns(list(records), ignore_fields)
    fields["answer"] = labels
    samples = [
        _sample(i, c, labels[i], names, scores, teacher_right, label_right, trust)
        for i, c in enumerate(conversations)
    ]
    per_teacher = {}
    for t, name in enumerate(names):
        answers = [row[t] for row in scores.teacher_answers]
        agree = scores.agree[:, t].double()
        measures = {
            "p_teacher_right": teacher_right[:, t],
            "agreement": agree,
            "mean_nll": scores.nll[:, t].double(),
            "p_label_right": label_right,
        }
        if trust is not None:
            measures["trust"] = trust[:, t]
        tables = {
            field: analysis.slice_table(values, measures, sort_by="p_teacher_right", top=top)
            for field, values in {**fields, "teacher_answer": answers}.items()
        }
        worst = analysis.distinct_slices(
            sorted(
                ({"field": f, **s} for f, table in tables.items() for s in table["slices"]),
                key=lambda s: (s["p_teacher_right"], -s["samples"]),
            )
        )
        per_teacher[name] = {
            "nll": _quantiles(scores.nll[:, t]),
            "agreement": float(agree.mean()),
            "trust": None if trust is None else _quantiles(trust[:, t]),
            "trust_below_0.1": None
            if trust is None
            else float((trust[:, t] < 0.1).double().mean()),  # fmt: skip
            "p_teacher_right_mean": float(teacher_right[:, t].mean()),
            "worst_slices": worst[:top],
            "slices": tables,
            "likely_teacher_errors": [
                samples[i] for i in analysis.ranked(1 - teacher_right[:, t], top)
            ],  # fmt: skip
        }
    report = trainer.train_dataset.report
    result: dict[str, Any] = {
        "samples": samples,
        "config": {
            "train_file": str(config.data.train_file),
            "teachers": names,
            "weighting": config.weighting.name,
            "trust": _trust_kind(config),
        },
        "records": report.total,
        "samples_scored": len(scores),
        "skipped": report.counts(),
        "ignored_fields": list(ignore_fields),
        "reliability_fit": fit,
        "p_label_right_mean": float(label_right.mean()),
        "teachers": per_teacher,
        "likely_label_errors": [samples[i] for i in analysis.ranked(1 - label_right, top)],
    }
    if len(names) > 1:
        result["disagreement"] = analysis.teacher_disagreement(
            names, scores.teacher_answers, labels
        )
    return result


def _trust_kind(config: cfg.TrainConfig) -> str:
    if config.weighting.uses_reliability:
        return "reliability"
    trust = getattr(config.weighting.options, "trust", None)
    if trust is not None and trust.reference == "data":
        return "data trust"
    return "none"


def _text(conversation, role: str) -> str:
    parts = [
        part["text"]
        for message in conversation.messages
        if message["role"] == role
        for part in message["content"]
        if part["type"] == "text"
    ]
    return " ".join(parts)


def _sample(i, conversation, label, names, scores, teacher_right, label_right, trust) -> dict:
    return {
        "id": conversation.id,
        "row": conversation.index,
        "question": _text(conversation, "user"),
        "label": label,
        "teacher_answers": dict(zip(names, scores.teacher_answers[i])),
        "images": [str(p) for p in conversation.image_paths],
        "nll": {n: float(scores.nll[i, t]) for t, n in enumerate(names)},
        "p_teacher_right": {n: float(teacher_right[i, t]) for t, n in enumerate(names)},
        "p_label_right": float(label_right[i]),
        "trust": None if trust is None else {n: float(trust[i, t]) for t, n in enumerate(names)},
    }


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "mean": float(values.double().mean())}  # fmt: skip
