"""A teacher with another tokenizer against one with the student's: step time and memory
(issue 21).

A tiny LLaVA student and two teachers of one size (``teacher_cache.py``'s sizes and
sentence answers, 20-25 tokens each): ``same`` has the student's tokenizer; ``cross``
another one (other merges, a smaller vocabulary), aligned by text
(``teacher.cross_tokenizer``, the prefix loss). Both distil ``jsd`` with the task
weighting. What the cross-tokenizer step adds: tokenising each answer run again for its
spans, grouping, the teacher's NLL of its own tokens and the per-group energy.

Time: both runs in one process, steps alternating on the same batches (median of the
timed steps). Memory, each run in a fresh process: peak RSS and the peak of live tensor
bytes during one step (``side_by_side.step_memory``).

    python benchmarks/cross_tokenizer.py                 # about a minute on 2 CPU cores

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import side_by_side
import torch
from teacher_cache import ANSWERS, STUDENT, TEACHER, write_data

from betakd import config as cfg
from betakd.testing.tiny import DEFAULT_TEXTS, save_tiny_model, train_tokenizer
from betakd.train import build_trainer, training_arguments

VARIANTS = ("same", "cross")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=48, help="samples in the data set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="see teacher_cache.py")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)  # models and data
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(root: Path, samples: int) -> None:
    tokenizer = train_tokenizer()
    # Other merges (the answers' own words in the corpus) and fewer of them.
    other = train_tokenizer((*DEFAULT_TEXTS[::-1], *ANSWERS), vocab_size=400)
    save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)
    save_tiny_model("llava", root / "same", tokenizer, size=TEACHER)
    save_tiny_model("llava", root / "cross", other, size=TEACHER)
    write_data(root, samples)


def make_config(root: Path, variant: str, batch_size: int) -> cfg.TrainConfig:
    teacher = {"path": str(root / variant)}
    if variant == "cross":
        teacher["cross_tokenizer"] = {"loss": "prefix"}
    return cfg.validate(
        {
            "student": {"path": str(root / "student")},
            "teacher": teacher,
            "data": {"train_file": str(root / "data.json"), "image_folder": str(root / "images")},
            "channels": {"logits": [{"energy": "jsd"}]},
            "weighting": {"name": "task"},
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
    return side_by_side.with_ratios(result, "cross", "same")


if __name__ == "__main__":
    side_by_side.print_comparison(
        main(), {"same": "same tokenizer", "cross": "another tokenizer"}, "cross", "same"
    )
