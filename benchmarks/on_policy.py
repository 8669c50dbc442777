"""On-policy distillation's cost: the student's generation against the training step
(issue 12).

A tiny LLaVA student and a teacher about 4x its size (``teacher_cache.py``'s sizes and
data: multi-token answers), ``cosine_probs`` + a visual feature channel, the task
weighting. Variants, their steps alternating on the same batches in one process (so a
busy machine slows all alike; medians of the timed steps):

* ``off_policy``: the data's answers (one student pass, one teacher pass);
* ``on_policy``: every row answered by the student (sampling, temperature 1), with
  ``ce: data`` (the default: a second student pass on the data's answers for CE);
* ``on_policy_ce_none``: the same with ``ce: none`` (GKD's loss): with the task
  weighting (no data trust) nothing is read of the data's answers, so the step runs one
  student and one teacher pass, on the student's answers.

Generation alone is timed on the same batches with ``betakd.onpolicy.sample_answers``
(the student in eval mode, ``no_grad``, KV cache, left padding): tokens per second over
the rows' generated tokens, and its share of the on-policy step.

    python benchmarks/on_policy.py          # about a minute on 2 CPU cores

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
from common import fmt, ratio
from teacher_cache import STUDENT, TEACHER, step, write_data

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.onpolicy import GenerationSettings, sample_answers
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

VARIANTS = {
    "off_policy": {},
    "on_policy": {"mode": "on_policy"},
    "on_policy_ce_none": {"mode": "on_policy", "ce": "none"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=48, help="samples in the data set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    return p.parse_args(argv)


def make_config(root: Path, variant: str, args: argparse.Namespace) -> cfg.TrainConfig:
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    return cfg.validate(
        {
            "student": {"path": str(root / "student")},
            "teacher": {"path": str(root / "teacher")},
            "data": {"train_file": str(root / "data.json"), "image_folder": str(root / "images")},
            "channels": {
                "logits": [{"energy": "cosine_probs"}],
                "features": [{"name": "visual", "energy": "mse"}],
            },
            "weighting": {"name": "task"},
            "policy": {**VARIANTS[variant], "generation": generation},
            "training": {
                "output_dir": str(root / f"out-{variant}"),
                "per_device_train_batch_size": args.batch_size,
                "use_cpu": True,
                "report_to": "none",
                "disable_tqdm": True,
            },
        }
    )


def generation_seconds(trainer, conversations, args) -> tuple[float, int]:
    """Seconds and generated tokens of the student answering one batch."""
    batch = trainer.data_collator(conversations)
    collator = trainer.data_collator
    start = time.perf_counter()
    answers = sample_answers(
        trainer.model.student,
        trainer.model.adapter,
        batch,
        GenerationSettings(args.max_new_tokens, temperature=1.0),
        pad_token_id=collator.student.pad_token_id,
        eos_token_id=sorted(trainer.student_answers.stop_ids),
        seed=0,
        suppress_tokens=trainer.student_answers.image_token_ids,
    )
    return time.perf_counter() - start, sum(a.numel() for a in answers)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer()
        save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)
        save_tiny_model("llava", root / "teacher", tokenizer, size=TEACHER)
        write_data(root, args.samples)
        trainers = {}
        for variant in VARIANTS:
            config = make_config(root, variant, args)
            trainers[variant] = build_trainer(config, training_arguments(config))
        optimizers = {v: t.create_optimizer() for v, t in trainers.items()}
        dataset = trainers["off_policy"].train_dataset
        size = args.batch_size
        seconds: dict[str, list[float]] = {v: [] for v in (*VARIANTS, "generation")}
        tokens = 0
        for i in range(args.warmup + args.steps):
            conversations = [dataset[(i * size + j) % len(dataset)] for j in range(size)]
            for variant, trainer in trainers.items():
                spent = step(trainer, optimizers[variant], trainer.data_collator, conversations)
                if i >= args.warmup:
                    seconds[variant].append(spent)
            spent, generated = generation_seconds(trainers["on_policy"], conversations, args)
            if i >= args.warmup:
                seconds["generation"].append(spent)
                tokens += generated
    median = {k: statistics.median(v) for k, v in seconds.items()}
    generation_total = sum(seconds["generation"])
    return {
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "step_s": median,
        "generated_tokens_per_s": tokens / generation_total,
        "generated_tokens_per_row": tokens / (args.steps * args.batch_size),
        "on_vs_off_step": ratio(median["on_policy"], median["off_policy"]),
        "ce_none_vs_off_step": ratio(median["on_policy_ce_none"], median["off_policy"]),
        "generation_share_of_on_policy_step": ratio(median["generation"], median["on_policy"]),
    }


def report(result: dict) -> None:
    step_ms = {k: f"{v * 1e3:.0f} ms" for k, v in result["step_s"].items()}
    print(f"median step (batch {result['batch_size']}, {result['steps']} steps): {step_ms}")
    print(
        f"generation: {result['generated_tokens_per_s']:.0f} tokens/s, "
        f"{result['generated_tokens_per_row']:.1f} tokens per row (max "
        f"{result['max_new_tokens']}), {fmt(result['generation_share_of_on_policy_step'], '.2f')}"
        " of the on-policy step"
    )
    print(
        f"on-policy / off-policy step: {fmt(result['on_vs_off_step'], '.2f')} (ce: data), "
        f"{fmt(result['ce_none_vs_off_step'], '.2f')} (ce: none)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
