"""A run's checkpoints: a standard student (``save_pretrained``) plus the head, read
back on resume, and a marker that says a checkpoint finished saving."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor

from betakd.distill import HEAD_FILE, DistillationHead, DistillationModule
from betakd.files import write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "betakd_complete.json"
STUDENT_PREFIX = "student."


def save_student_and_head(
    student,
    head: DistillationHead,
    output_dir: Path,
    *,
    processor=None,
    arguments_json: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> None:
    """The student in the standard format, the head, the processor and the training
    arguments (as JSON, not the pickle ``Trainer`` writes by default). ``state_dict``:
    the distillation module's full state as an engine gathered it (the student's part
    is saved)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    student_state = None
    if state_dict is not None:
        student_state = {
            k[len(STUDENT_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(STUDENT_PREFIX)
        }
    student.save_pretrained(output_dir, state_dict=student_state)
    head.save(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    if arguments_json is not None:
        (output_dir / "training_args.json").write_text(arguments_json)


def load_student_and_head(
    module: DistillationModule, checkpoint: Path, load_adapter: Callable[[], None]
) -> None:
    """Restore the student and the head from ``checkpoint``; ``load_adapter()`` loads a
    LoRA student's adapter (``Trainer``'s own loader knows PEFT checkpoints)."""
    student = module.student
    if hasattr(student, "peft_config"):
        load_adapter()
    else:
        # save_pretrained may write another key layout than the module's state_dict
        # (transformers 5 converts some families back to their hub layout), so read the
        # checkpoint through from_pretrained, which knows the conversion.
        saved = type(student).from_pretrained(checkpoint, dtype=student.dtype)
        student.load_state_dict(saved.state_dict(), strict=True)
    module.head.load(checkpoint / HEAD_FILE)
    logger.info("resumed student and head from %s", checkpoint)


def mark_complete(checkpoint: Path) -> None:
    """Written last and atomically: a checkpoint without it was interrupted while saving."""
    write_json_atomic(checkpoint / COMPLETE_MARKER, {"complete": True}, indent=None)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """Newest checkpoint that finished saving (its completion marker is written last)."""
    candidates = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in reversed(candidates):
        if is_complete(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s", path)
    return None
