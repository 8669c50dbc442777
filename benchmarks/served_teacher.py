"""Served teacher (vLLM) vs in-process teacher vs offline cache: training step time
and cache-build throughput.

Builds a tiny LLaVA student and a larger teacher (head sizes vLLM's CPU attention
takes), the synthetic data of ``teacher_cache.py``, starts ``vllm serve`` on the teacher
(``betakd.testing.vllm_server``: its own environment, created on first use) and
measures, side by side in one run:

* training steps five ways on the same student, head and optimizer and the same
  batches: the online teacher, a cache, the server asked at the step, the server asked a
  batch ahead (``prefetch``: the batch's requests sent while the step before computes,
  as the data loader's one-batch lookahead does in training), and asked a batch ahead
  through vLLM's token-in API (``tokens``, ``server.token_api``). Each round runs
  every variant for a block of consecutive steps (the first untimed: nothing was sent
  ahead for it), in an order that rotates between rounds;
* ``betakd cache-teacher`` in-process and from the server (chat and token-in
  requests; same k), alternated: samples per second.

Every variant asks for the same top-k where it has one (cache and server). On a CPU
machine the server shares the cores with the training process.

    python benchmarks/served_teacher.py                 # about three minutes on 2 CPU cores
    python benchmarks/served_teacher.py --student large  # a student slower than the server
    python benchmarks/served_teacher.py --steps 12 --top-k 20   # the options of teacher_cache.py

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from teacher_cache import STUDENT, TEACHER, parameters, parser, step, write_data

from betakd import config as cfg
from betakd import models
from betakd.build import build_trainer, training_arguments
from betakd.cache_cli import cache_teacher
from betakd.data import KDCollator
from betakd.teachers.build import build_teacher
from betakd.testing.tiny_models import TinyDims, save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer
from betakd.testing.vllm_server import VLLMServer, ensure_environment, servable_copy

# A student whose step outlasts the server's answer to a batch (on this CPU): the regime
# where requests sent ahead can hide the server's time.
LARGE_STUDENT = TinyDims(
    hidden=512, layers=8, heads=8, vision_hidden=32, vision_layers=1, patch_size=8
)


def make_config(root: Path, data: Path, images: Path, args, teacher: dict) -> cfg.TrainConfig:
    """JSD on the answers' top-k only: what every teacher source here can give."""
    return cfg.validate(
        {
            "student": {"path": str(root / "student")},
            "teacher": teacher,
            "data": {"train_file": str(data), "image_folder": str(images)},
            "channels": {"logits": [{"energy": "jsd"}]},
            "weighting": {"name": "task"},
            "training": {
                "output_dir": str(root / "out"),
                "per_device_train_batch_size": args.batch_size,
                "use_cpu": True,
                "report_to": "none",
                "disable_tqdm": True,
            },
        }
    )


VARIANTS = ("online", "cached", "served", "prefetch", "tokens")
BLOCK = 4  # consecutive steps of one variant per round; the first is untimed
CACHE_ROUNDS = 2


def parse_args(argv: list[str] | None = None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--student",
        choices=("tiny", "large"),
        default="tiny",
        help="tiny: the teacher_cache.py student; large: one whose step outlasts the "
        "server's answer to a batch here",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ensure_environment()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer()
        student = LARGE_STUDENT if args.student == "large" else STUDENT
        params = (
            parameters(save_tiny_model("llava", root / "student", tokenizer, size=student)),
            parameters(save_tiny_model("llava", root / "teacher", tokenizer, size=TEACHER)),
        )
        data, images = write_data(root, args.samples)
        local = {"path": str(root / "teacher"), "cache_dir": str(root / "cache"),
                 "cache_top_k": args.top_k}  # fmt: skip
        online_config = make_config(root, data, images, args, local)
        served_dir = servable_copy(root / "teacher", root / "served-teacher")
        with VLLMServer(served_dir, images=True, max_logprobs=args.top_k,
                        log_file=root / "vllm.log") as server:  # fmt: skip
            remote = {"source": "served", "cache_top_k": args.top_k,
                      "server": {"url": server.url, "model": server.model, "top_k": args.top_k}}  # fmt: skip
            sources = {"online": local, "served": remote,
                       "tokens": _with_server(remote, token_api=True)}  # fmt: skip
            build_s = cache_builds(root, lambda name, cache: make_config(
                root, data, images, args, {**sources[name], "cache_dir": str(cache)}))  # fmt: skip
            cache_teacher(online_config, progress=False)
            times = step_times(root, data, images, args, online_config, local, remote)
    # Means: with requests sent ahead, a long wait and a short one alternate, and the
    # training time is their sum (a median would pick one of them).
    mean = {name: statistics.fmean(values) for name, values in times.items()}
    samples = args.samples
    return {
        "student": args.student,
        "student_params": params[0],
        "teacher_params": params[1],
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": len(times["online"]),
        "top_k": args.top_k,
        **{f"{name}_step_s": value for name, value in mean.items()},
        **{f"{name}_step_min_s": min(values) for name, values in times.items()},
        **{f"{name}_step_max_s": max(values) for name, values in times.items()},
        "served_over_online": mean["served"] / mean["online"],
        "prefetch_over_online": mean["prefetch"] / mean["online"],
        "prefetch_over_served": mean["prefetch"] / mean["served"],
        "tokens_over_online": mean["tokens"] / mean["online"],
        "tokens_over_served": mean["tokens"] / mean["served"],
        "served_over_cached": mean["served"] / mean["cached"],
        "cache_samples": samples,
        **{
            f"cache_build_{n}_samples_per_s": samples / statistics.median(v)
            for n, v in build_s.items()
        },  # fmt: skip
        **{
            f"cache_build_{n}_over_online": statistics.median(build_s["online"])
            / statistics.median(build_s[n])
            for n in ("served", "tokens")
        },
    }


def cache_builds(root: Path, config_for) -> dict[str, list[float]]:
    """Seconds per full `cache-teacher` run, in-process and from the server (chat and
    token-in requests), alternated (each into a fresh folder)."""
    seconds: dict[str, list[float]] = {"online": [], "served": [], "tokens": []}
    for round_ in range(CACHE_ROUNDS):
        for name in seconds:
            config = config_for(name, root / f"{name}-cache-{round_}")
            start = time.perf_counter()
            cache_teacher(config, progress=False)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def step_times(root, data, images, args, online_config, local, remote) -> dict[str, list[float]]:
    trainer = build_trainer(online_config, training_arguments(online_config))
    optimizer = trainer.create_optimizer()
    module = trainer.model
    student = models.LoadedModel(module.student, trainer.processing_class, module.adapter)
    sources = {
        "cached": build_teacher(
            make_config(root, data, images, args, {**local, "source": "cache"}), student
        ).source,
        "served": build_teacher(
            make_config(root, data, images, args, _with_server(remote, prefetch_batches=0)),
            student,
        ).source,
        "prefetch": build_teacher(make_config(root, data, images, args, remote), student).source,
        "tokens": build_teacher(
            make_config(root, data, images, args, _with_server(remote, token_api=True)), student
        ).source,
    }
    student_collator = KDCollator(trainer.data_collator.student)
    dataset = trainer.train_dataset
    batches = [
        [dataset[(i * args.batch_size + j) % len(dataset)] for j in range(args.batch_size)]
        for i in range(len(dataset) // args.batch_size)
    ]
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rounds = max(1, -(-args.steps // (BLOCK - 1)))
    for round_ in range(args.warmup + rounds):
        order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
        for name in order:
            for i in range(BLOCK):
                conversations = batches[(round_ * BLOCK + i) % len(batches)]
                following = batches[(round_ * BLOCK + i + 1) % len(batches)]
                if name == "online":
                    seconds = step(trainer, optimizer, trainer.data_collator, conversations)
                else:
                    source = sources[name]
                    ahead = None
                    if name in ("prefetch", "tokens"):  # as the loader's collator announces it
                        ahead = lambda s=source, f=following: s.prefetch(  # noqa: E731
                            f, student_collator(f)
                        )
                    seconds = step(trainer, optimizer, student_collator, conversations, source,
                                   before=ahead)  # fmt: skip
                if round_ >= args.warmup and i > 0:
                    times[name].append(seconds)
    return times


def _with_server(remote: dict, **settings) -> dict:
    return {**remote, "server": {**remote["server"], **settings}}


def report(result: dict) -> None:
    print(
        f"student {result['student_params']:,} / teacher {result['teacher_params']:,} "
        f"parameters, batch {result['batch_size']}, top-k {result['top_k']}, "
        f"{result['steps']} timed steps each (mean; min and max in brackets)"
    )
    for name in VARIANTS:
        print(
            f"  {name:8s} step {result[f'{name}_step_s'] * 1000:8.1f} ms "
            f"[{result[f'{name}_step_min_s'] * 1000:.1f}, "
            f"{result[f'{name}_step_max_s'] * 1000:.1f}]"
        )
    print(
        f"served / online: {result['served_over_online']:.2f}x, prefetch / online: "
        f"{result['prefetch_over_online']:.2f}x, prefetch / served: "
        f"{result['prefetch_over_served']:.2f}x, tokens / online: "
        f"{result['tokens_over_online']:.2f}x, tokens / served: "
        f"{result['tokens_over_served']:.2f}x, served / cached: "
        f"{result['served_over_cached']:.2f}x"
    )
    print(
        f"cache-teacher, {result['cache_samples']} samples: in-process "
        f"{result['cache_build_online_samples_per_s']:.1f} samples/s, served "
        f"{result['cache_build_served_samples_per_s']:.1f} samples/s (chat; "
        f"{result['cache_build_served_over_online']:.2f}x), token-in "
        f"{result['cache_build_tokens_samples_per_s']:.1f} samples/s "
        f"({result['cache_build_tokens_over_online']:.2f}x)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
