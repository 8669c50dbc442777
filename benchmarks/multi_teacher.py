"""Two online teachers against one: training step time and memory (issue 11).

A tiny LLaVA student and teachers about 4x its size (``teacher_cache.py``'s sizes and
data): the one-teacher run distills from teacher ``a`` (``cosine_probs`` + a visual
feature channel), the two-teacher run from ``a`` and ``b`` (``b``: ``cosine_probs``,
another patch size, so another image-token count), both with the instance weighting
(``h(x)`` from ``a``). One step = collation of every model's batch from the raw
conversations, the teachers' forward passes (one after another, ``no_grad``),
``BetaKDTrainer.compute_loss``, backward and the optimizer step.

Time: both runs in one process, steps alternating on the same batches (median of the
timed steps), so a busy machine slows both alike. Memory, each run in a fresh process:
``rss``, the process's peak resident set (models, data and steps: what the machine must
hold); ``step live``, the peak of live tensor bytes during one step above those live
before it (activations and gradients; the models' weights excluded).

    python benchmarks/multi_teacher.py                 # about a minute on 2 CPU cores

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import side_by_side
import torch
from teacher_cache import STUDENT, TEACHER, write_data

from betakd import config as cfg
from betakd.testing.tiny import save_tiny_model, train_tokenizer
from betakd.train import build_trainer, training_arguments

# The second teacher: the first's sizes with patch 8 (a quarter of its image tokens).
SECOND_TEACHER = dataclasses.replace(TEACHER, patch_size=8)
VARIANTS = ("one", "two")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=48, help="samples in the data set")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="see teacher_cache.py")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)  # models and data
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(root: Path, samples: int) -> None:
    tokenizer = train_tokenizer()
    save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)
    save_tiny_model("llava", root / "a", tokenizer, size=TEACHER)
    save_tiny_model("llava", root / "b", tokenizer, size=SECOND_TEACHER)
    write_data(root, samples)


def make_config(root: Path, variant: str, batch_size: int) -> cfg.TrainConfig:
    teachers = [
        {
            "name": "a",
            "path": str(root / "a"),
            "channels": {
                "logits": [{"energy": "cosine_probs"}],
                "features": [{"name": "visual", "energy": "mse"}],
            },
        },
        {
            "name": "b",
            "path": str(root / "b"),
            "channels": {"logits": [{"energy": "cosine_probs"}]},
        },
    ]
    return cfg.validate(
        {
            "student": {"path": str(root / "student")},
            "teachers": teachers[: 1 if variant == "one" else 2],
            "data": {"train_file": str(root / "data.json"), "image_folder": str(root / "images")},
            "weighting": {"name": "instance", "representation": "teacher_visual"},
            "training": {
                "output_dir": str(root / f"out-{variant}"),
                "per_device_train_batch_size": batch_size,
                "use_cpu": True,
                "report_to": "none",
                "disable_tqdm": True,
            },
        }
    )


def trainer_of(root: Path, variant: str, batch_size: int):
    config = make_config(root, variant, batch_size)
    return build_trainer(config, training_arguments(config))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return side_by_side.worker(args, trainer_of)
    torch.manual_seed(0)
    result = side_by_side.measure(args, prepare, trainer_of, VARIANTS)
    return side_by_side.with_ratios(result, "two", "one")


if __name__ == "__main__":
    side_by_side.print_comparison(
        main(), {"one": "one teacher", "two": "two teachers"}, "two", "one"
    )
