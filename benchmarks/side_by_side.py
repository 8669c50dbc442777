"""Two or more training configs measured side by side: alternating steps on the same
batches for time (a busy machine slows every variant alike), and one variant per fresh
process for memory (``common.run_worker``).

One step = collation of every model's batch from the raw conversations, the teachers'
forward passes, ``BetaKDTrainer.compute_loss``, backward and the optimizer step
(``teacher_cache.step``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from common import fmt, mib, ratio, run_worker
from teacher_cache import step

from betakd.build import build_trainer, training_arguments
from betakd.profiling import peak_rss_bytes, peak_tensor_bytes


def batches(trainer, batch_size: int, count: int) -> list[list]:
    """``count`` batches of raw conversations, cycling through the data set."""
    dataset = trainer.train_dataset
    return [
        [dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]
        for i in range(count)
    ]


def stepper(trainer) -> Callable[[list], float]:
    """One training step of ``trainer`` on a batch of conversations -> its seconds."""
    optimizer = trainer.create_optimizer()
    return lambda conversations: step(trainer, optimizer, trainer.data_collator, conversations)


def alternating_times(
    trainers: Mapping[str, object], work: list[list], warmup: int
) -> dict[str, list[float]]:
    """Each batch stepped by every trainer in turn; the seconds of the steps after
    ``warmup``, per variant."""
    steps = {name: stepper(trainer) for name, trainer in trainers.items()}
    result: dict[str, list[float]] = {name: [] for name in trainers}
    for i, conversations in enumerate(work):
        for name, run in steps.items():
            seconds = run(conversations)
            if i >= warmup:
                result[name].append(seconds)
    return result


def medians(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def step_memory(trainer, work: list[list]) -> dict:
    """This process's peak RSS after stepping through ``work``, and the peak of live
    tensor bytes during the last step above those live before it."""
    run = stepper(trainer)
    for conversations in work[:-1]:
        run(conversations)
    live = peak_tensor_bytes(lambda: run(work[-1]))
    return {"rss_bytes": peak_rss_bytes(), "step_live_bytes": live}


def parse_args(argv: list[str] | None, description: str, batch_size: int):
    """The options every side-by-side benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--samples", type=int, default=48, help="samples in the data set")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="see teacher_cache.py")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)  # models and data
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def training_block(root: Path, variant: str, batch_size: int) -> dict:
    """The ``training`` block of a variant's config (CPU, no reporting)."""
    return {
        "output_dir": str(root / f"out-{variant}"),
        "per_device_train_batch_size": batch_size,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
    }


def main(
    args, prepare: Callable[[Path, int], None], make_config: Callable, variants: tuple[str, ...]
) -> dict:
    """A benchmark's run: a worker's memory (``--worker``), or every variant measured
    with the last variant's ratios over the first's. ``make_config(root, variant,
    batch_size)`` is a variant's ``betakd train`` config."""
    torch.set_num_threads(args.threads)

    def trainer_of(root: Path, variant: str, batch_size: int):
        config = make_config(root, variant, batch_size)
        return build_trainer(config, training_arguments(config))

    if args.worker:
        return worker(args, trainer_of)
    torch.manual_seed(0)
    result = measure(args, prepare, trainer_of, variants)
    return with_ratios(result, variants[-1], variants[0])


def measure(
    args, prepare: Callable[[Path, int], None], trainer_of: Callable, variants: tuple[str, ...]
) -> dict:
    """Time (alternating steps in this process) and memory (one fresh process per variant,
    through ``--worker``) of every variant; ``trainer_of(root, variant, batch_size)``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.samples)
        trainers = {v: trainer_of(root, v, args.batch_size) for v in variants}
        work = batches(trainers[variants[0]], args.batch_size, args.warmup + args.steps)
        seconds = alternating_times(trainers, work, args.warmup)
        # The workers rerun the script with --root and --worker.
        sys.argv += ["--root", str(root)]
        memory = {v: run_worker(v) for v in variants}
    median = medians(seconds)
    return {
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "step_s": median,
        "step_min_s": {v: min(seconds[v]) for v in variants},
        "memory": memory,
    }


def worker(args, trainer_of: Callable) -> dict:
    """One variant's memory (``--worker``) in this fresh process."""
    trainer = trainer_of(Path(args.root), args.worker, args.batch_size)
    return step_memory(trainer, batches(trainer, args.batch_size, args.warmup + args.steps))


def with_ratios(result: dict, variant: str, base: str) -> dict:
    """``result`` with ``variant``'s time, peak RSS and step live tensors over ``base``'s."""
    memory = result["memory"]
    suffix = f"{variant}_vs_{base}"
    return {
        **result,
        f"time_{suffix}": ratio(result["step_s"][variant], result["step_s"][base]),
        f"rss_{suffix}": ratio(memory[variant]["rss_bytes"], memory[base]["rss_bytes"]),
        f"step_live_{suffix}": ratio(
            memory[variant]["step_live_bytes"], memory[base]["step_live_bytes"]
        ),
    }


def print_comparison(result: dict, labels: Mapping[str, str], variant: str, base: str) -> None:
    """One line per variant, one of ``variant`` over ``base``, then the JSON (a worker's
    result, without step times, is printed as JSON only)."""
    if "step_s" not in result:
        print(json.dumps(result))
        return
    width = max(len(label) for label in labels.values())
    for name, label in labels.items():
        memory = result["memory"][name]
        print(
            f"{label:<{width}}: step {result['step_s'][name] * 1e3:.1f} ms (median of "
            f"{result['steps']}, batch {result['batch_size']}), peak RSS "
            f"{fmt(mib(memory['rss_bytes']), '.0f')} MiB, step live tensors "
            f"{fmt(mib(memory['step_live_bytes']), '.1f')} MiB"
        )
    suffix = f"{variant}_vs_{base}"
    print(
        f"{labels[variant]} / {labels[base]}: time {fmt(result[f'time_{suffix}'], '.2f')}, "
        f"peak RSS {fmt(result[f'rss_{suffix}'], '.2f')}, step live tensors "
        f"{fmt(result[f'step_live_{suffix}'], '.2f')}"
    )
    print(json.dumps(result))
