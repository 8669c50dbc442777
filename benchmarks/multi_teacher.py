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
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import fmt, mib, ratio, run_worker
from side_by_side import alternating_times, batches, medians, step_memory
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


def times(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Alternating steps of both runs on the same batches; the timed steps' seconds."""
    trainers = {v: build_trainer(c, training_arguments(c)) for v, c in configs(root, args)}
    work = batches(trainers["one"], args.batch_size, args.warmup + args.steps)
    return alternating_times(trainers, work, args.warmup)


def configs(root: Path, args: argparse.Namespace):
    return [(v, make_config(root, v, args.batch_size)) for v in VARIANTS]


def worker(args: argparse.Namespace) -> dict:
    """One run's memory in this fresh process."""
    root = Path(args.root)
    config = make_config(root, args.worker, args.batch_size)
    trainer = build_trainer(config, training_arguments(config))
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
        seconds = times(root, args)
        # The workers rerun this script with --root and --worker.
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
        "time_two_vs_one": ratio(median["two"], median["one"]),
        "rss_two_vs_one": ratio(memory["two"]["rss_bytes"], memory["one"]["rss_bytes"]),
        "step_live_two_vs_one": ratio(
            memory["two"]["step_live_bytes"], memory["one"]["step_live_bytes"]
        ),
    }


def report(result: dict) -> None:
    if "step_s" not in result:  # a worker: its measurement for the parent
        print(json.dumps(result))
        return
    for variant, label in (("one", "one teacher "), ("two", "two teachers")):
        memory = result["memory"][variant]
        print(
            f"{label}: step {result['step_s'][variant] * 1e3:.1f} ms (median of "
            f"{result['steps']}, batch {result['batch_size']}), peak RSS "
            f"{fmt(mib(memory['rss_bytes']), '.0f')} MiB, step live tensors "
            f"{fmt(mib(memory['step_live_bytes']), '.1f')} MiB"
        )
    print(
        f"two / one: time {fmt(result['time_two_vs_one'], '.2f')}, peak RSS "
        f"{fmt(result['rss_two_vs_one'], '.2f')}, step live tensors "
        f"{fmt(result['step_live_two_vs_one'], '.2f')}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
