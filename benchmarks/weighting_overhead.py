"""Step-time overhead of the Beta-KD weightings over plain equal weights.

Builds one tiny LLaVA teacher/student pair and a synthetic LLaVA-format data set, then
builds a trainer per weighting (equal, task, instance, closed_form) on the same models
and batches, and times full training steps (collation, teacher forward, student
forward/backward, optimizer step). Steps of the different weightings are interleaved,
so machine noise hits them alike. Target: instance and task within 3% of equal (the
paper reports 1.85 vs 1.82 it/s, +1.6%, for its instance weighting).

    python benchmarks/weighting_overhead.py              # about a minute on 2 CPU cores
    python benchmarks/weighting_overhead.py --steps 40 --batch-size 16

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.testing.tiny_models import TinyDims, save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

WEIGHTINGS = {
    "equal": {},
    "task": {},
    "instance": {"hidden": 128},
    "closed_form": {},
}
STUDENT = TinyDims(hidden=64, layers=2, heads=2, vision_hidden=32, vision_layers=1, patch_size=8)
TEACHER = TinyDims(hidden=128, layers=3, heads=4, vision_hidden=64, vision_layers=2, patch_size=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_data(root: Path, samples: int) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i in range(samples):
        colour = list(COLOURS)[i % 3]
        Image.new("RGB", (32, 32), COLOURS[colour]).save(images / f"{i}.png")
        record = {
            "id": f"s{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": f"The shape is {colour}."},
            ],
        }
        lines.append(json.dumps(record))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_trainer(root: Path, data: Path, name: str, batch_size: int):
    raw = {
        "student": {"path": str(root / "student")},
        "teacher": {"path": str(root / "teacher")},
        "data": {"train_file": str(data), "image_folder": str(root / "images")},
        "channels": {"logits": [{"energy": "cosine_probs"}], "features": [{"name": "visual"}]},
        "weighting": {"name": name, "options": WEIGHTINGS[name]},
        "training": {
            "output_dir": str(root / f"out-{name}"),
            "per_device_train_batch_size": batch_size,
            "use_cpu": True,
            "report_to": "none",
            "seed": 0,
        },
    }
    config = cfg.validate(raw)
    trainer = build_trainer(config, training_arguments(config))
    trainer.create_optimizer()
    return trainer


def timed_step(trainer, batch) -> float:
    start = time.perf_counter()
    num_items = trainer.num_items([batch], torch.device("cpu"))
    trainer.optimizer.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    trainer.optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer()
        save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)
        save_tiny_model("llava", root / "teacher", tokenizer, size=TEACHER)
        data = write_data(root, 64)
        trainers = {name: make_trainer(root, data, name, args.batch_size) for name in WEIGHTINGS}
        dataset = trainers["equal"].train_dataset
        collate = trainers["equal"].data_collator
        batches = [
            collate(
                [dataset[(s * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)]
            )
            for s in range(args.steps + 2)
        ]
        times: dict[str, list[float]] = {name: [] for name in WEIGHTINGS}
        for step, batch in enumerate(batches):
            for name, trainer in trainers.items():
                elapsed = timed_step(trainer, batch)
                if step >= 2:  # warm-up steps are not counted
                    times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["equal"] for name in WEIGHTINGS}
    print(f"{'weighting':<12} {'median step ms':>15} {'vs equal':>10}")
    for name in WEIGHTINGS:
        print(f"{name:<12} {1000 * medians[name]:>15.1f} {ratios[name]:>9.3f}x")
    print(
        json.dumps(
            {
                "benchmark": "weighting_overhead",
                "steps": args.steps,
                "batch_size": args.batch_size,
                "median_step_seconds": medians,
                "ratio_vs_equal": ratios,
                "target_max_ratio": 1.03,
            }
        )
    )


if __name__ == "__main__":
    main()
