"""Served teacher (vLLM) vs in-process teacher vs offline cache: training step time.

Builds a tiny LLaVA student and a larger teacher (head sizes vLLM's CPU attention
takes), the synthetic data of ``teacher_cache.py``, writes the teacher's cache
in-process, starts ``vllm serve`` on the teacher (``betakd.testing.vllm_server``: its own
environment, created on first use) and times training steps three ways on the same
student, head and optimizer, alternating the three on the same batches so that the
ratios compare like with like on a shared machine. Every variant asks for the same
top-k where it has one (cache and server).

On a CPU machine the server shares the cores with the training process: the served
step then pays for the teacher's forward pass on the same cores, plus HTTP and JSON. On
a GPU, with the server on its own device, the teacher's time overlaps nothing yet (a
batch's requests go out at the start of its step), so the served step costs about the
server's latency for one batch.

    python benchmarks/served_teacher.py                 # about two minutes on 2 CPU cores
    python benchmarks/served_teacher.py --steps 12 --top-k 20   # the options of teacher_cache.py

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
from teacher_cache import STUDENT, parameters, parse_args, step, write_data

from betakd import config as cfg
from betakd import models
from betakd.cache_cli import cache_teacher
from betakd.data import KDCollator
from betakd.teachers.build import build_teacher
from betakd.testing.tiny import TinyDims, save_tiny_model, train_tokenizer
from betakd.testing.vllm_server import VLLMServer, ensure_environment, servable_copy
from betakd.train import build_trainer, training_arguments

TEACHER = TinyDims(hidden=128, layers=3, heads=4, vision_hidden=64, vision_layers=2, patch_size=4)


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ensure_environment()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer()
        params = (
            parameters(save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)),
            parameters(save_tiny_model("llava", root / "teacher", tokenizer, size=TEACHER)),
        )
        data, images = write_data(root, args.samples)
        local = {"path": str(root / "teacher"), "cache_dir": str(root / "cache"),
                 "cache_top_k": args.top_k}  # fmt: skip
        online_config = make_config(root, data, images, args, local)
        cache_teacher(online_config, progress=False)
        trainer = build_trainer(online_config, training_arguments(online_config))
        optimizer = trainer.create_optimizer()
        module = trainer.model
        student = models.LoadedModel(module.student, trainer.processing_class, module.adapter)
        cached = build_teacher(
            make_config(root, data, images, args, {**local, "source": "cache"}), student
        ).source
        served_dir = servable_copy(root / "teacher", root / "served-teacher")
        with VLLMServer(served_dir, images=True, max_logprobs=args.top_k,
                        log_file=root / "vllm.log") as server:  # fmt: skip
            remote = {"source": "served",
                      "server": {"url": server.url, "model": server.model, "top_k": args.top_k}}  # fmt: skip
            served = build_teacher(make_config(root, data, images, args, remote), student).source
            student_collator = KDCollator(trainer.data_collator.student)
            dataset = trainer.train_dataset
            batches = [
                [dataset[(i * args.batch_size + j) % len(dataset)] for j in range(args.batch_size)]
                for i in range(args.warmup + args.steps)
            ]
            times = {"online": [], "cached": [], "served": []}
            for i, conversations in enumerate(batches):
                measured = {
                    "online": step(trainer, optimizer, trainer.data_collator, conversations),
                    "cached": step(trainer, optimizer, student_collator, conversations, cached),
                    "served": step(trainer, optimizer, student_collator, conversations, served),
                }
                if i >= args.warmup:
                    for name, seconds in measured.items():
                        times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "student_params": params[0],
        "teacher_params": params[1],
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "top_k": args.top_k,
        **{f"{name}_step_s": value for name, value in median.items()},
        **{f"{name}_step_min_s": min(values) for name, values in times.items()},
        "served_over_online": median["served"] / median["online"],
        "served_over_cached": median["served"] / median["cached"],
    }


def report(result: dict) -> None:
    print(
        f"student {result['student_params']:,} / teacher {result['teacher_params']:,} "
        f"parameters, batch {result['batch_size']}, top-k {result['top_k']}, "
        f"{result['steps']} timed steps each (median; min in brackets)"
    )
    for name in ("online", "cached", "served"):
        print(
            f"  {name:7s} step {result[f'{name}_step_s'] * 1000:8.1f} ms "
            f"[{result[f'{name}_step_min_s'] * 1000:.1f}]"
        )
    print(
        f"served / online: {result['served_over_online']:.2f}x, "
        f"served / cached: {result['served_over_cached']:.2f}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
