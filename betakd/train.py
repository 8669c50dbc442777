"""The training recipe behind ``betakd train``: config -> models, data, trainer -> saved student.

Thin on purpose: every piece lives in its own module (config, models, data, teachers,
distill, trainer) and takes plain arguments; this file maps the config onto them and
wires them in order. It is, with the command line, the only reader of the config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import TrainerCallback, TrainingArguments, set_seed

from betakd import config as cfg
from betakd import models, weighting
from betakd.align import representation_dim
from betakd.data import DataCache, KDCollator, SampleEncoder, SkipReport, build_dataset
from betakd.distill import DistillationHead, DistillationModule, LogitChannelSpec
from betakd.features import FeatureChannel
from betakd.objective import DistillationObjective
from betakd.teachers import (
    CacheContents,
    CachedTeacher,
    CacheError,
    OnlineTeacher,
    TeacherCache,
    TeacherSource,
)
from betakd.teachers.cache_format import data_fingerprint
from betakd.trainer import BetaKDTrainer, is_complete

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "betakd_config.yaml"
# What a resumed run may change: how long it runs and what it logs or saves, never what
# it learns from (models, data, channels, weighting, optimisation).
RESUMABLE_KEYS = frozenset(
    f"training.{key}"
    for key in (
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "logging_strategy",
        "logging_dir",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "report_to",
        "run_name",
        "disable_tqdm",
    )
)


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
    refused = [
        key
        for key in changed_keys(previous.model_dump(), config.model_dump())
        if key not in RESUMABLE_KEYS
    ]
    if refused:
        raise OutputDirError(
            f"--resume: {output_dir} holds a run with another config ({resolved}): "
            f"{', '.join(refused)} changed; a resumed run may change only "
            f"{', '.join(sorted(RESUMABLE_KEYS))}: resume it with the same settings or "
            "choose another training.output_dir"
        )


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (lists compared whole)."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += changed_keys(a, b, prefix=f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


def check_model_paths(config: cfg.TrainConfig) -> None:
    """A model path that looks local must exist; hub ids are left to transformers."""
    for key, path in (("student.path", config.student.path), ("teacher.path", config.teacher.path)):
        if path is not None:
            models.check_model_path(key, path)


@dataclass
class TeacherSide:
    """What the recipe builds for the teacher, whichever its source."""

    source: TeacherSource
    encoder: SampleEncoder | None  # None for a cache: no teacher batch is built
    vocab_rows: int  # the shared vocabulary (logit columns beyond it are padding)
    visual_dim: int | None
    representation_dim: int


def build_teacher(
    config: cfg.TrainConfig, student: models.LoadedModel, data_cache: DataCache | None = None
) -> TeacherSide:
    """The config's teacher source (``teacher.source``: online or cache) for ``student``."""
    if config.teacher.source == "cache":
        return _cached_teacher(config, student)
    return _online_teacher(config, student, data_cache)


def build_trainer(
    config: cfg.TrainConfig,
    args: TrainingArguments,
    *,
    sample_groups: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    data_cache: DataCache | None = None,
) -> BetaKDTrainer:
    """Load models and data and assemble the trainer (no training yet).

    ``sample_groups`` maps sample ids to group names; the trainer then logs every
    channel's energy, beta and weighted term per group as well. ``callbacks`` are
    ``transformers`` trainer callbacks. ``data_cache`` keeps encodings and validation
    passes; pass one to share them between runs in a process (default: one per run).
    """
    check_model_paths(config)
    data_cache = data_cache if data_cache is not None else DataCache()
    student = models.load(
        config.student.path,
        dtype=config.student.dtype,
        trust_remote_code=config.student.trust_remote_code,
        key="student.path",
    )
    student_encoder = SampleEncoder(
        student.processor, student.adapter, config.data.max_length, data_cache
    )
    teacher = build_teacher(config, student, data_cache)
    encoders = {"student": student_encoder}
    if teacher.encoder is not None:
        encoders["teacher"] = teacher.encoder
    dataset = build_dataset(
        config.data.train_file,
        config.data.image_folder,
        encoders,
        max_skip_fraction=config.data.max_skip_fraction,
        limit=config.data.limit,
        cache=data_cache,
    )
    logger.info("training samples: %d (%s)", len(dataset), dataset.report.summary())
    if isinstance(teacher.source, CachedTeacher):
        conversations = dataset.conversations
        teacher.source.cache.check_covers(
            [c.index for c in conversations], [c.id for c in conversations]
        )
    # The head (adapters, weighting network) initialises from the global RNG: seed it so
    # that a run is reproducible and equal configs start from equal heads.
    set_seed(args.seed)
    head = build_head(
        config,
        teacher_dim=teacher.visual_dim,
        student_dim=student.visual_width,
        rep_dim=teacher.representation_dim,
    )
    if config.weighting.init_from:
        head.load(config.weighting.init_from)
    student_model = student.model
    if config.student.lora is not None:
        student_model = _with_lora(student_model, config.student.lora)
    return BetaKDTrainer(
        model=DistillationModule(
            student_model,
            head,
            student.adapter,
            teacher.vocab_rows,
            chunk_size=config.channels.chunk_size,
            chunk_compile=config.channels.chunk_compile,
        ),
        args=args,
        train_dataset=dataset,
        data_collator=KDCollator(student_encoder, teacher.encoder),
        processing_class=student.processor,
        teacher=teacher.source,
        head_learning_rate=config.weighting.learning_rate,
        head_weight_decay=config.weighting.weight_decay,
        adapter_weight_decay=config.weighting.adapter_weight_decay,
        calibration_samples=config.weighting.calibration_samples,
        sample_groups=sample_groups,
        non_finite=config.non_finite.action,
        callbacks=list(callbacks),
    )


def build_head(
    config: cfg.TrainConfig, *, teacher_dim: int | None, student_dim: int | None, rep_dim: int
) -> DistillationHead:
    """The weighting and feature adapters the config's channels and weighting ask for."""
    channels = config.channels
    specs = [
        LogitChannelSpec(c.channel, c.energy, dict(c.options), c.positions == "answer")
        for c in channels.logits
    ]
    feats = {}
    for f in channels.features:
        if teacher_dim is None or student_dim is None:
            raise ValueError(
                f"feature channel {f.name!r} needs visual tokens, but a model has none "
                "(text-only student or teacher)"
            )
        feats[f.name] = FeatureChannel(
            teacher_dim,
            student_dim,
            f.energy,
            adapter=f.adapter,
            normalize=f.normalize,
            rank=f.rank,
        )
    options = dict(config.weighting.options)
    if config.weighting.needs_representation:
        options.setdefault("input_dim", rep_dim)
    built = weighting.build(config.weighting.name, ["ce", *channels.names()], **options)
    objective = DistillationObjective(built, reduction=config.weighting.reduction)
    return DistillationHead(objective, specs, feats)


def instance_representation(config: cfg.TrainConfig) -> str | None:
    """The weighting's ``h(x)``, when it has one."""
    return config.weighting.representation if config.weighting.needs_representation else None


def teacher_contents(config: cfg.TrainConfig) -> CacheContents:
    """What the config's channels and weighting need from the teacher."""
    return CacheContents(
        logits=bool(config.channels.logits),
        visual=bool(config.channels.features),
        representation=instance_representation(config),
    )


def cache_contents(config: cfg.TrainConfig) -> CacheContents:
    """What a teacher cache for the config holds; prompt positions cannot be cached."""
    for i, channel in enumerate(config.channels.logits):
        if channel.positions != "answer":
            raise CacheError(
                f"channels.logits.{i}.positions: {channel.positions!r} needs the teacher at "
                "prompt positions; the cache holds answer tokens only (use an online teacher)"
            )
    return teacher_contents(config)


def config_data_fingerprint(config: cfg.TrainConfig, tokenizer) -> dict:
    """The run's data and tokenizer fields of a cache fingerprint."""
    data = config.data
    return data_fingerprint(data.train_file, data.image_folder, tokenizer, data.max_length)


def _online_teacher(
    config: cfg.TrainConfig, student: models.LoadedModel, data_cache: DataCache | None
) -> TeacherSide:
    teacher = models.load(
        config.teacher.path,
        dtype=config.teacher.dtype,
        trust_remote_code=config.teacher.trust_remote_code,
        frozen=True,
        key="teacher.path",
    )
    models.check_same_vocabulary(student.processor, teacher.processor)
    vocab = models.vocab_rows(student.processor, student.model, teacher.model)
    return TeacherSide(
        source=online_source(
            config, teacher, vocab, config.channels.chunk_size, student_adapter=student.adapter
        ),
        encoder=SampleEncoder(
            teacher.processor, teacher.adapter, config.data.max_length, data_cache
        ),
        vocab_rows=vocab,
        visual_dim=teacher.visual_width,
        representation_dim=representation_dim(
            config.weighting.representation, teacher.model.config
        ),
    )


def online_source(
    config: cfg.TrainConfig,
    teacher: models.LoadedModel,
    vocab: int,
    chunk_size: int | None,
    *,
    student_adapter: models.FamilyAdapter | None = None,
) -> OnlineTeacher:
    """The loaded teacher as an online source of what the config's channels and
    weighting need (``chunk_size``: see :class:`~betakd.teachers.OnlineTeacher`)."""
    needs = teacher_contents(config)
    return OnlineTeacher(
        teacher.model,
        teacher.adapter,
        vocab_rows=vocab,
        need_logits=needs.logits,
        need_visual=needs.visual,
        representation=needs.representation,
        chunk_size=chunk_size,
        student_adapter=student_adapter,
        include_prompt=any(c.positions != "answer" for c in config.channels.logits),
    )


def _cached_teacher(config: cfg.TrainConfig, student: models.LoadedModel) -> TeacherSide:
    """teacher.source: cache -- no teacher model is loaded. The cache must have been
    written for this data, tokenizer (the student's: both share one vocabulary), teacher
    and top k, and hold what the channels and weighting need."""
    needs = cache_contents(config)
    if needs.visual and not student.adapter.multimodal:
        raise CacheError("channels.features: the student is text-only, it has no visual tokens")
    cache = TeacherCache(config.teacher.cache_dir)
    cache.check_fingerprint(
        config_data_fingerprint(config, student.processor),
        teacher_path=config.teacher.path,
        top_k=config.teacher.cache_top_k if needs.logits else None,
    )
    vocab = models.vocab_rows(student.processor, student.model)
    source = CachedTeacher(
        cache,
        vocab_rows=vocab,
        need_logits=needs.logits,
        need_visual=needs.visual,
        representation=needs.representation,
    )
    return TeacherSide(
        source=source,
        encoder=None,
        vocab_rows=vocab,
        visual_dim=cache.teacher_visual_dim,
        representation_dim=cache.representation_dim or 1,
    )


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
    data_cache: DataCache | None = None,
) -> TrainResult:
    """Train, save the student (standard format) and the head, return the log history.

    ``data_cache``: see :func:`build_trainer`."""
    args = training_arguments(config)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, config, resume)
    trainer = build_trainer(
        config, args, sample_groups=sample_groups, callbacks=callbacks, data_cache=data_cache
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_world_process_zero():
        cfg.dump(config, output_dir / RESOLVED_CONFIG)
    resume_from = _last_complete_checkpoint(output_dir) if resume else None
    trainer.train(resume_from_checkpoint=resume_from)
    save_final(trainer, output_dir)
    return TrainResult(output_dir, trainer.train_dataset.report, trainer.state.log_history, trainer)


def save_final(trainer: BetaKDTrainer, output_dir: Path) -> None:
    """The student as a standard model (LoRA merged), its processor, and the head."""
    student = trainer.distillation_module.student
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if trainer.is_world_process_zero():
        student.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
        trainer.head.save(output_dir)


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
