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

from pathlib import Path

import side_by_side
from teacher_cache import ANSWERS, STUDENT, TEACHER, write_data

from betakd import config as cfg
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import DEFAULT_TEXTS, train_tokenizer

VARIANTS = ("same", "cross")


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
            "training": side_by_side.training_block(root, variant, batch_size),
        }
    )


def main(argv: list[str] | None = None) -> dict:
    args = side_by_side.parse_args(argv, __doc__.split("\n\n")[0], batch_size=8)
    return side_by_side.main(args, prepare, make_config, VARIANTS)


if __name__ == "__main__":
    side_by_side.print_comparison(
        main(), {"same": "same tokenizer", "cross": "another tokenizer"}, "cross", "same"
    )
