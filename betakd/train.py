"""The training recipe behind ``betakd train``: config -> models, data, trainer -> saved student.

Thin on purpose: every piece lives in its own module (config, models, data, align,
teachers, distill, trainer); this file only wires them in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import TrainerCallback, TrainingArguments, set_seed

from betakd import config as cfg
from betakd import models
from betakd.align import representation_dim
from betakd.cache import CachedTeacher, build_cached_teacher
from betakd.data import KDCollator, SampleEncoder, SkipReport, build_dataset
from betakd.distill import DistillationHead, DistillationModule
from betakd.teachers import OnlineTeacher
from betakd.trainer import BetaKDTrainer, is_complete

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "betakd_config.yaml"


class OutputDirError(RuntimeError):
    """The output directory holds another run."""


@dataclass
class TrainResult:
    output_dir: Path
    skips: SkipReport
    log_history: list[dict]
    trainer: BetaKDTrainer


def training_arguments(config: cfg.TrainConfig) -> TrainingArguments:
    """TrainingArguments from the config's pass-through block, with betakd's needs."""
    args = dict(config.training)
    args.setdefault("output_dir", "runs/betakd")
    args.setdefault("report_to", "none")
    # Our data set yields raw conversations; the collator needs every field.
    args["remove_unused_columns"] = False
    return TrainingArguments(**args)


def check_output_dir(output_dir: Path, config: cfg.TrainConfig, resume: bool) -> None:
    """Refuse to mix two runs in one folder; only the same run may be resumed there."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        if resume:
            raise OutputDirError(f"--resume: {output_dir} holds no run to resume")
        return
    resolved = output_dir / RESOLVED_CONFIG
    if not resume:
        raise OutputDirError(
            f"output directory {output_dir} is not empty (it holds another run); pass --resume "
            "to continue a run there, or choose another training.output_dir"
        )
    if not resolved.is_file():
        raise OutputDirError(f"--resume: {output_dir} holds no betakd run ({RESOLVED_CONFIG})")
    previous = cfg.validate(yaml.safe_load(resolved.read_text()), source=str(resolved))
    if previous.model_dump() != config.model_dump():
        raise OutputDirError(
            f"--resume: {output_dir} holds a run with another config ({resolved}); resume it "
            "with the same config or choose another training.output_dir"
        )


def check_model_paths(config: cfg.TrainConfig) -> None:
    """A model path that looks local must exist; hub ids are left to transformers."""
    for key, path in (("student.path", config.student.path), ("teacher.path", config.teacher.path)):
        if path is None:
            continue
        local = Path(path)
        looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") > 1
        if looks_local and not local.expanduser().is_dir():
            raise FileNotFoundError(f"{key}: no model directory at {path}")
        if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"{key}: {path!r} is not a local directory and HF_HUB_OFFLINE=1 forbids downloads"
            )


@dataclass
class TeacherSide:
    """What the trainer needs from the teacher, whichever its source."""

    source: OnlineTeacher | CachedTeacher
    encoder: SampleEncoder | None  # None for a cache: no teacher batch is built
    visual_dim: int | None
    representation_dim: int


def build_trainer(
    config: cfg.TrainConfig,
    args: TrainingArguments,
    *,
    sample_groups: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> BetaKDTrainer:
    """Load models and data and assemble the trainer (no training yet).

    ``sample_groups`` maps sample ids to group names; the trainer then logs every
    channel's energy, beta and weighted term per group as well. ``callbacks`` are
    ``transformers`` trainer callbacks.
    """
    check_model_paths(config)
    student_processor = models.load_processor(
        config.student.path, trust_remote_code=config.student.trust_remote_code
    )
    student = models.load_model(
        config.student.path,
        dtype=config.student.dtype,
        trust_remote_code=config.student.trust_remote_code,
    )
    student_adapter = models.get_adapter(student, student_processor)
    student_encoder = SampleEncoder(student_processor, student_adapter, config.data.max_length)
    representation = (
        config.weighting.representation if config.weighting.needs_representation else None
    )
    if config.teacher.source == "cache":
        vocab = models.vocab_rows(student_processor, student)
        teacher = _cached_teacher(config, student_processor, student_adapter, vocab, representation)
    else:
        teacher, vocab = _online_teacher(config, student_processor, student, representation)
    encoders = {"student": student_encoder}
    if teacher.encoder is not None:
        encoders["teacher"] = teacher.encoder
    dataset = build_dataset(
        config.data.train_file,
        config.data.image_folder,
        encoders,
        max_skip_fraction=config.data.max_skip_fraction,
        limit=config.data.limit,
    )
    logger.info("training samples: %d (%s)", len(dataset), dataset.report.summary())
    if isinstance(teacher.source, CachedTeacher):
        teacher.source.check_covers(dataset)
    # The head (adapters, weighting network) initialises from the global RNG: seed it so
    # that a run is reproducible and equal configs start from equal heads.
    set_seed(args.seed)
    head = DistillationHead.from_config(
        config,
        teacher_dim=teacher.visual_dim,
        student_dim=_visual_dim(student) if student_adapter.multimodal else None,
        rep_dim=teacher.representation_dim,
    )
    if config.weighting.init_from:
        head.load(config.weighting.init_from)
    if config.student.lora is not None:
        student = _with_lora(student, config.student.lora)
    return BetaKDTrainer(
        model=DistillationModule(
            student,
            head,
            student_adapter,
            vocab,
            chunk_size=config.channels.chunk_size,
            chunk_compile=config.channels.chunk_compile,
        ),
        args=args,
        train_dataset=dataset,
        data_collator=KDCollator(student_encoder, teacher.encoder),
        processing_class=student_processor,
        teacher=teacher.source,
        head_learning_rate=config.weighting.learning_rate,
        head_weight_decay=config.weighting.weight_decay,
        adapter_weight_decay=config.weighting.adapter_weight_decay,
        calibration_samples=config.weighting.calibration_samples,
        sample_groups=sample_groups,
        include_prompt=any(c.positions != "answer" for c in config.channels.logits),
        non_finite=config.non_finite.action,
        callbacks=list(callbacks),
    )


def _online_teacher(config, student_processor, student, representation) -> tuple[TeacherSide, int]:
    teacher_processor = models.load_processor(
        config.teacher.path, trust_remote_code=config.teacher.trust_remote_code
    )
    models.check_same_vocabulary(student_processor, teacher_processor)
    teacher = models.load_model(
        config.teacher.path,
        dtype=config.teacher.dtype,
        trust_remote_code=config.teacher.trust_remote_code,
        frozen=True,
    )
    vocab = models.vocab_rows(student_processor, student, teacher)
    adapter = models.get_adapter(teacher, teacher_processor)
    source = OnlineTeacher(
        teacher,
        adapter,
        vocab_rows=vocab,
        need_logits=bool(config.channels.logits),
        need_visual=bool(config.channels.features),
        representation=representation,
        chunked=config.channels.chunk_size is not None,
    )
    side = TeacherSide(
        source=source,
        encoder=SampleEncoder(teacher_processor, adapter, config.data.max_length),
        visual_dim=_visual_dim(teacher) if adapter.multimodal else None,
        representation_dim=representation_dim(config.weighting.representation, teacher.config),
    )
    return side, vocab


def _cached_teacher(config, student_processor, student_adapter, vocab, representation):
    """teacher.source: cache -- no teacher model is loaded."""
    cached = build_cached_teacher(
        config, student_adapter, vocab, representation, tokenizer=student_processor
    )
    return TeacherSide(
        source=cached,
        encoder=None,
        visual_dim=cached.teacher_visual_dim,
        representation_dim=cached.representation_dim or 1,
    )


def _visual_dim(model) -> int:
    """Width of the projected visual tokens: the language model's hidden size."""
    text = model.config.get_text_config()
    return int(text.hidden_size)


def _with_lora(student, lora: cfg.LoraSettings):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return get_peft_model(student, peft_config)


def run_training(
    config: cfg.TrainConfig,
    *,
    resume: bool = False,
    sample_groups: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train, save the student (standard format) and the head, return the log history."""
    args = training_arguments(config)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, config, resume)
    trainer = build_trainer(config, args, sample_groups=sample_groups, callbacks=callbacks)
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_world_process_zero():
        cfg.dump(config, output_dir / RESOLVED_CONFIG)
    resume_from = _last_complete_checkpoint(output_dir) if resume else None
    trainer.train(resume_from_checkpoint=resume_from)
    save_final(trainer, output_dir)
    return TrainResult(output_dir, trainer.train_dataset.report, trainer.state.log_history, trainer)


def save_final(trainer: BetaKDTrainer, output_dir: Path) -> None:
    """The student as a standard model (LoRA merged), its processor, and the head."""
    module = trainer._module
    student = module.student
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if trainer.is_world_process_zero():
        student.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
        module.head.save(output_dir)


def _last_complete_checkpoint(output_dir: Path) -> str | None:
    """Newest checkpoint that finished saving (its completion marker is written last)."""
    candidates = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in reversed(candidates):
        if is_complete(path):
            return str(path)
        logger.warning("ignoring incomplete checkpoint %s", path)
    return None
