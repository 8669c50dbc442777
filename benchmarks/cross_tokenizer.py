"""A teacher with another tokenizer against one with the student's: step time and memory
(issue 21).

A tiny LLaVA student and two teachers of one size (``teacher_cache.py``'s sizes and
sentence answers, 20-25 tokens each): ``same`` has the student's tokenizer; ``cross``
another one (other merges, a smaller vocabulary), aligned by text
(``teacher.cross_tokenizer``, the hybrid loss). Both distil ``jsd`` with the task
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
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import fmt, mib, ratio, run_worker
from side_by_side import alternating_times, batches, medians, step_memory
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
        teacher["cross_tokenizer"] = {"loss": "hybrid"}
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


def worker(args: argparse.Namespace) -> dict:
    """One run's memory in this fresh process."""
    trainer = trainer_of(Path(args.root), args.worker, args.batch_size)
    return step_memory(trainer, batches(trainer, args.batch_size, args.warmup + args.steps))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.samples)
        trainers = {v: trainer_of(root, v, args.batch_size) for v in VARIANTS}
        work = batches(trainers["same"], args.batch_size, args.warmup + args.steps)
        seconds = alternating_times(trainers, work, args.warmup)
        sys.argv += ["--root", str(root)]
        memory = {v: run_worker(v) for v in VARIANTS}
    median = medians(seconds)
    return {
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "step_s": median,
        "step_min_s": {v: min(seconds[v]) for v in VARIANTS},
        "memory": memory,
        "time_cross_vs_same": ratio(median["cross"], median["same"]),
        "rss_cross_vs_same": ratio(memory["cross"]["rss_bytes"], memory["same"]["rss_bytes"]),
        "step_live_cross_vs_same": ratio(
            memory["cross"]["step_live_bytes"], memory["same"]["step_live_bytes"]
        ),
    }


def report(result: dict) -> None:
    if "step_s" not in result:  # a worker: its measurement for the parent
        print(json.dumps(result))
        return
    for variant, label in (("same", "same tokenizer   "), ("cross", "another tokenizer")):
        memory = result["memory"][variant]
        print(
            f"{label}: step {result['step_s'][variant] * 1e3:.1f} ms (median of "
            f"{result['steps']}, batch {result['batch_size']}), peak RSS "
            f"{fmt(mib(memory['rss_bytes']), '.0f')} MiB, step live tensors "
            f"{fmt(mib(memory['step_live_bytes']), '.1f')} MiB"
        )
    print(
        f"another / same: time {fmt(result['time_cross_vs_same'], '.2f')}, peak RSS "
        f"{fmt(result['rss_cross_vs_same'], '.2f')}, step live tensors "
        f"{fmt(result['step_live_cross_vs_same'], '.2f')}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
