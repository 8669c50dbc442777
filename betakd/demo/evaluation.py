"""How the demo measures a run, slice by slice (clean, noisy labels, the teacher's blind
slice).

* Accuracy: each run's student answers a fixed subset of the test split by greedy
  generation (``betakd.eval.generate``) and is scored by the easy-VQA exact match,
  overall, per question type and for the blind slice vs the rest.
* Betas: what its weighting gave each slice, from the training log (``beta_history``,
  ``slice_history``) and per training sample once trained (``training_betas``,
  ``final_betas``: ROC AUCs of "lower beta" on the blind slice and on noisy labels).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from betakd.demo import report
from betakd.demo.easyvqa_data import read_jsonl
from betakd.eval import easyvqa
from betakd.eval.runner import generate
from betakd.eval.samples import Sample

SLICES = ("clean", "noisy", "blind")


def slice_of(record: dict) -> str:
    """The teacher's blind slice first, then noisy labels, then the rest."""
    meta = record["meta"]
    return "blind" if meta["blind"] else "noisy" if meta["noisy"] else "clean"


def test_samples(test_file: Path, limit: int, seed: int = 0) -> list[dict]:
    """A fixed random subset of the test split (the same for every run)."""
    records = read_jsonl(test_file)
    random.Random(seed).shuffle(records)
    return records[:limit]


def _as_sample(record: dict, image_folder: Path) -> Sample:
    # The prompt is exactly the training prompt (image, then the question): tiny models
    # have seen no other phrasing.
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    return Sample(record["id"], question, str(image_folder / record["image"]))


def evaluate(model_dir: Path, records: list[dict], image_folder: Path, batch_size: int) -> dict:
    """Generation-based exact match (%): overall, per question type, blind slice vs rest."""
    return accuracy_by_slice(predict(model_dir, records, image_folder, batch_size), records)


def predict(
    model_dir: Path,
    records: list[dict],
    image_folder: Path,
    batch_size: int,
    max_new_tokens: int = 4,
) -> dict[str, str]:
    """Each test record's generated answer, by record id (greedy, ``betakd eval``'s harness)."""
    from betakd.models import load_model, load_processor

    model = load_model(model_dir, dtype="float32", frozen=True)
    processor = load_processor(model_dir)
    samples = [_as_sample(r, image_folder) for r in records]
    predictions = generate(
        model,
        processor,
        samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=False,
    )
    return {p["question_id"]: p["text"] for p in predictions}


def percent_correct(predictions: dict[str, str], rows: list[dict]) -> float | None:
    """Exact match (%) of the predictions on ``rows``; None for no rows."""
    if not rows:
        return None
    hits = sum(
        easyvqa.is_correct(predictions[r["id"]], r["conversations"][1]["value"]) for r in rows
    )
    return round(100.0 * hits / len(rows), 2)


def accuracy_by_slice(predictions: dict[str, str], records: list[dict]) -> dict:
    def pct(rows: list[dict]) -> float | None:
        return percent_correct(predictions, rows)

    outside = [r for r in records if not r["meta"]["blind"]]
    inside = [r for r in records if r["meta"]["blind"]]
    result = {"all": pct(records), "outside_blind": pct(outside), "blind": pct(inside)}
    for qtype in sorted({r["meta"]["qtype"] for r in records}):
        result[qtype] = pct([r for r in records if r["meta"]["qtype"] == qtype])
    return result


def beta_history(history: list[dict], channels: list[str]) -> dict[str, list[list[float]]]:
    """Per channel: [step, beta mean, min, max] at every logging step."""
    result: dict[str, list[list[float]]] = {}
    for channel in channels:
        key = f"{channel}/beta_mean"
        rows = [
            [h["step"], h[key], h[f"{channel}/beta_min"], h[f"{channel}/beta_max"]]
            for h in history
            if key in h
        ]
        if rows:
            result[channel] = rows
    return result


def slice_history(history: list[dict], channels: list[str], slices: Sequence[str] = SLICES) -> dict:
    """Per channel and slice: [step, mean beta, mean energy] at every logging step."""
    result: dict = {}
    for channel in channels:
        for name in slices:
            beta_key = f"group/{name}/{channel}/beta_mean"
            rows = [
                [h["step"], h[beta_key], h[f"group/{name}/{channel}/energy"]]
                for h in history
                if beta_key in h
            ]
            if rows:
                result.setdefault(channel, {})[name] = rows
    return result


def training_betas(trainer, batch_size: int = 256) -> tuple[list[str], torch.Tensor, list[str]]:
    """Every training sample's betas ``[N, C]`` under the trained student and weighting,
    with the channel names and the sample ids."""
    dataset = trainer.train_dataset
    channels = trainer.distillation_module.head.objective.channels
    betas = []
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            out = trainer.model(*trainer.loss_inputs(trainer.data_collator(rows)))
            betas.append(out.betas.float().cpu())
    return list(channels), torch.cat(betas), [dataset[i].id for i in range(len(dataset))]


def final_betas(trainer, records: list[dict], batch_size: int = 256) -> dict:
    """Each training sample's betas under the trained student and weighting, per channel:
    ROC AUC of "lower beta" for the blind slice and for noisy labels, and slice means."""
    channels, betas, ids = training_betas(trainer, batch_size)
    by_id = {r["id"]: slice_of(r) for r in records}
    slices = [by_id[i] for i in ids]
    table = {}
    for k, channel in enumerate(channels):
        # The CE's weight varies only when a reliability down-weights likely-wrong labels.
        if channel == "ce" and bool((betas[:, k] == betas[0, k]).all()):
            continue
        values = betas[:, k].tolist()
        groups = {name: [v for v, s in zip(values, slices) if s == name] for name in SLICES}
        rest = groups["clean"] + groups["noisy"]
        table[channel] = {
            "auc_blind_lower": report.roc_auc(rest, groups["blind"]),
            "auc_noisy_lower": report.roc_auc(groups["clean"], groups["noisy"]),
            "mean": {name: sum(v) / len(v) for name, v in groups.items() if v},
        }
    return table
