"""The demo's data audited before the runs (`betakd audit`), and how well the audit
finds what the demo planted: the teacher's blind slice and the noisy labels.

The audit sees only what a user's data would carry: the demo's ground-truth fields
(which answers were made noisy, which samples are blind, the original answers) are
left out of its slices and used here only to score it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from betakd import config as cfg
from betakd.audit.report import SAMPLES_FILE
from betakd.audit.run import AuditOptions, run_audit
from betakd.demo.easyvqa_data import read_jsonl

AUDIT_FOLDER = "audit"
GROUND_TRUTH_FIELDS = ("meta.noisy", "meta.blind", "meta.original_answer")


def audit_demo_data(
    config: cfg.TrainConfig, out: Path, blind: Mapping[str, tuple[str, str]]
) -> dict:
    """Audit a demo run's config into ``out/audit``. ``blind``: per teacher (as the audit
    names them: ``teacher`` for a single one), its planted blind slice as (attribute,
    value). Returns the audit's findings against the truth."""
    folder = out / AUDIT_FOLDER
    result = run_audit(config, folder, AuditOptions(ignore_fields=GROUND_TRUTH_FIELDS))
    truth = {r["id"]: r["meta"] for r in read_jsonl(Path(config.data.train_file))}
    samples = [json.loads(line) for line in (folder / SAMPLES_FILE).read_text().splitlines()]
    noisy = [bool(truth[s["id"]]["noisy"]) for s in samples]
    label_wrong = [s["p_label_right"] < 0.5 for s in samples]
    teachers = {}
    for name, (attribute, value) in blind.items():
        in_blind = [truth[s["id"]][attribute] == value for s in samples]
        teacher_wrong = [s["p_teacher_right"][name] < 0.5 for s in samples]
        worst = result["teachers"][name]["worst_slices"][0]
        # The attribute itself, or the answer: colour questions answer with the colour.
        named = worst["value"] == value and worst["field"] in (f"meta.{attribute}", "answer")
        teachers[name] = {
            "blind": f"{attribute} = {value}",
            "top_slice": {k: worst[k] for k in ("field", "value", "samples", "p_teacher_right")},
            "blind_slice_named_first": named,
            "teacher_errors": _precision_recall(teacher_wrong, in_blind),
        }
    return {
        "report": f"{AUDIT_FOLDER}/report.md",
        "samples": len(samples),
        "seconds": round(result["seconds"], 1),
        "teachers": teachers,
        "label_errors": _precision_recall(label_wrong, noisy),
        **({"disagreement": result["disagreement"]} if "disagreement" in result else {}),
    }


def _precision_recall(predicted: list[bool], actual: list[bool]) -> dict:
    hits = sum(p and a for p, a in zip(predicted, actual))
    flagged, present = sum(predicted), sum(actual)
    return {
        "flagged": flagged,
        "planted": present,
        "precision": hits / flagged if flagged else None,
        "recall": hits / present if present else None,
    }
