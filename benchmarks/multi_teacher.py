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

import dataclasses
from pathlib import Path

import side_by_side
from teacher_cache import STUDENT, TEACHER, write_data

from betakd import config as cfg
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

# The second teacher: the first's sizes with patch 8 (a quarter of its image tokens).
SECOND_TEACHER = dataclasses.replace(TEACHER, patch_size=8)
VARIANTS = ("one", "two")


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
            "training": side_by_side.training_block(root, variant, batch_size),
        }
    )


def main(argv: list[str] | None = None) -> dict:
    args = side_by_side.parse_args(argv, __doc__.split("\n\n")[0], batch_size=4)
    return side_by_side.main(args, prepare, make_config, VARIANTS)


if __name__ == "__main__":
    side_by_side.print_comparison(
        main(), {"one": "one teacher", "two": "two teachers"}, "two", "one"
    )
