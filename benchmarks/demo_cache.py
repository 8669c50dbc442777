"""easy-VQA student accuracy distilled from the top-32 teacher cache vs the online teacher.

Uses the demo's data, teacher (trained once and cached, as `betakd demo` does) and
student; for each seed it trains the same strategy twice, once with
`teacher.source: online` and once with `teacher.source: cache` (top-32 log-probs +
tail mass, pooled visual tokens), and evaluates both by greedy generation on the same
test questions. Target: accuracy from the cache within 1 point of the online teacher.

    python benchmarks/demo_cache.py                           # ~10 min on 2 CPU cores
    python benchmarks/demo_cache.py --steps 200 --seeds 0 1 --strategy task

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from betakd.demo import run as demo
from betakd.demo.evaluation import test_samples
from betakd.demo.scenario import demo_config, settings_from, student_init
from betakd.demo.strategies import select
from betakd.demo.teacher import ensure_teacher, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="task", help="a strategy of the demo's catalogue")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--test-questions", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = demo_config(quick=False)
    (strategy,) = select(config, [args.strategy])
    settings = settings_from(config, test_questions=args.test_questions)
    if args.steps:
        settings = replace(settings, steps=args.steps)
    data = prepare_data(config)
    teacher = ensure_teacher(config)
    tests = test_samples(data.test, settings.test_questions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        inits = {seed: student_init(config, out, seed) for seed in args.seeds}
        cache_dir = demo.ensure_teacher_cache(config, teacher, inits[args.seeds[0]], data, settings)
        for seed in args.seeds:
            for source, source_cache in (("online", None), ("cache", cache_dir)):
                job = demo.Job(
                    strategy, seed, config, settings, inits[seed], teacher, data,
                    source_cache, out / source, tests,
                )  # fmt: skip
                record = demo.run_job(job)
                seconds, accuracy = record.train_seconds, record.accuracy
                rows.append({"seed": seed, "source": source, "seconds": seconds, **accuracy})
                print(
                    f"seed {seed} {source:<6} acc {accuracy['all']:6.2f}%  train {seconds:6.1f} s"
                )
    mean = {
        source: statistics.fmean(r["all"] for r in rows if r["source"] == source)
        for source in ("online", "cache")
    }
    time_ratio = statistics.fmean(r["seconds"] for r in rows if r["source"] == "online") / (
        statistics.fmean(r["seconds"] for r in rows if r["source"] == "cache")
    )
    diff = mean["cache"] - mean["online"]
    print(
        f"mean accuracy: online {mean['online']:.2f}%, cache {mean['cache']:.2f}% "
        f"({diff:+.2f} points); online/cache training time {time_ratio:.2f}x"
    )
    print(
        json.dumps(
            {
                "benchmark": "demo_cache",
                "strategy": args.strategy,
                "steps": settings.steps,
                "runs": rows,
                "mean_accuracy": mean,
                "cache_minus_online": diff,
                "online_over_cache_time": time_ratio,
                "target_abs_diff": 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
