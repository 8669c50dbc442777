"""Config -> the parts of a training run: models, data, teachers, head and trainer.

The one reader of the config's training sections: each component takes plain arguments
and this module maps the config onto them and wires them in order. Used by ``betakd
train`` (through :mod:`betakd.runs`), ``betakd audit`` and the benchmarks; nothing is
trained here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments, set_seed

from betakd import config as cfg
from betakd import models, weighting
from betakd.align import representation_dim
from betakd.config_sections import LoraSettings
from betakd.data import DataCache, KDCollator, SampleEncoder, build_dataset
from betakd.distill import DistillationHead, DistillationModule, LogitChannelSpec
from betakd.features import FeatureChannel
from betakd.objective import DistillationObjective
from betakd.onpolicy import GenerationSettings, PolicyMix
from betakd.teachers import CachedTeacher, ServedTeacher
from betakd.teachers.build import build_teacher, weighting_representation
from betakd.teachers.protocol import TeacherSource, prefetch_hook
from betakd.trainer import BetaKDTrainer

logger = logging.getLogger(__name__)


def training_arguments(config: cfg.TrainConfig) -> TrainingArguments:
    """TrainingArguments from the config's pass-through block, with betakd's needs."""
    args = dict(config.training)
    args.setdefault("output_dir", "runs/betakd")
    args.setdefault("report_to", "none")
    # Our data set yields raw conversations; the collator needs every field.
    args["remove_unused_columns"] = False
    return TrainingArguments(**args)


def path_problems(config: cfg.TrainConfig) -> list[str]:
    """Every file and folder the config names that is not there, each as ``key: what``,
    without loading a model: the data file, the image folder, the models (local paths;
    hub ids only when ``HF_HUB_OFFLINE=1``), teacher caches and ``init_from``."""
    problems = []
    models_by_key = {"student.path": config.student.path} | {
        f"{plan.key}.path": plan.settings.path
        for plan in config.teacher_plans()
        if plan.settings.path is not None
    }
    for key, path in models_by_key.items():
        try:
            models.check_model_path(key, path)
        except FileNotFoundError as err:
            problems.append(str(err))
    data = config.data
    if not Path(data.train_file).is_file():
        problems.append(f"data.train_file: no file at {data.train_file}")
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        problems.append(f"data.image_folder: no folder at {data.image_folder}")
    for plan in config.teacher_plans():
        cache = plan.settings.cache_dir
        if plan.settings.source == "cache" and not Path(cache).is_dir():
            problems.append(f"{plan.key}.cache_dir: no teacher cache at {cache}")
    init_from = config.weighting.init_from
    if init_from is not None and not Path(init_from).exists():
        problems.append(f"weighting.init_from: nothing at {init_from}")
    return problems


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
    problems = path_problems(config)
    if problems:
        raise FileNotFoundError("; ".join(problems))
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
    encoders = {"student": student_encoder} | {
        teacher_label(name): e for name, e in teacher.encoders.items()
    }
    # Several teachers supervise the same student tokens: no answer may be cut for one
    # (a teacher of another tokenizer has other answer tokens; its alignment is surveyed).
    same_answers = []
    if config.teachers is not None:
        plans = config.teacher_plans()
        other = {teacher_label(p.name) for p in plans if p.settings.cross_tokenizer is not None}
        same_answers = [name for name in encoders if name not in other]
    dataset = build_dataset(
        config.data.train_file,
        config.data.image_folder,
        encoders,
        max_skip_fraction=config.data.max_skip_fraction,
        limit=config.data.limit,
        cache=data_cache,
        equal_answers=same_answers,
    )
    # The skips themselves were logged once by build_dataset (and go to SKIPPED_FILE).
    logger.info("training samples: %d of %d records", len(dataset), dataset.report.total)
    conversations = dataset.conversations
    for source in teacher.members.values():
        if isinstance(source, CachedTeacher):
            source.cache.check_covers(
                [c.index for c in conversations], [c.id for c in conversations]
            )
        elif isinstance(source, ServedTeacher):
            # One sample scored before training: a server of another tokenizer or chat
            # template stops the run here, naming the sample.
            source.check_template(conversations[:1], student_encoder)
    for plan in config.teacher_plans():
        if plan.settings.cross_tokenizer is not None:
            source = teacher.members[plan.name]
            encoder = teacher.encoders.get(plan.name)
            survey = source.survey(conversations, student_encoder, encoder)
            logger.info("%s: %s", plan.key, survey.summary())
            survey.enforce(
                plan.settings.cross_tokenizer.max_unaligned, f"{plan.key}.cross_tokenizer"
            )
    # The head (adapters, weighting network) initialises from the global RNG: seed it so
    # that a run is reproducible and equal configs start from equal heads.
    set_seed(args.seed)
    student_representation = _student_representation(config)
    rep_dim = teacher.representation_dim
    if student_representation is not None:
        rep_dim += representation_dim(student_representation, student.model.config)
    head = build_head(
        config,
        teacher_dims=teacher.visual_dims,
        student_dim=student.visual_width,
        rep_dim=max(rep_dim, 1),
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
            student_representation=student_representation,
            generated_ce=config.policy.ce,
        ),
        args=args,
        train_dataset=dataset,
        data_collator=KDCollator(
            student_encoder, teacher.encoders, on_collate=_prefetch(config, args, teacher.source)
        ),
        processing_class=student.processor,
        teacher=teacher.source,
        head_learning_rate=config.weighting.learning_rate,
        head_weight_decay=config.weighting.weight_decay,
        adapter_weight_decay=config.weighting.adapter_weight_decay,
        calibration_samples=config.weighting.calibration_samples,
        reliability_samples=config.weighting.reliability_samples,
        sample_groups=sample_groups,
        non_finite=config.non_finite.action,
        schedule_restart_at=config.schedule.restart_at,
        callbacks=list(callbacks),
        policy=policy_mix(config, args.seed),
        generation=GenerationSettings(**config.policy.generation.model_dump()),
    )


def teacher_label(name: str | None) -> str:
    """A teacher's name in data-validation messages (skips name the encoder)."""
    return "teacher" if name is None else f"teacher {name}"


def _prefetch(config: cfg.TrainConfig, args, source: TeacherSource):
    """The teacher's prefetch hook for the collator (see
    :func:`~betakd.teachers.protocol.prefetch_hook`), or None: not with data-loader
    workers (the collator then runs in other processes, where requests would be lost)
    and not on-policy (the rows are the student's answers, known at the step only)."""
    if args.dataloader_num_workers > 0 or config.policy.mode == "on_policy":
        return None
    return prefetch_hook(source)


def policy_mix(config: cfg.TrainConfig, seed: int) -> PolicyMix:
    """Which rows the student answers, drawn from the run's seed."""
    policy = config.policy
    return PolicyMix(policy.mode, policy.student_fraction, policy.per, seed, policy.start_step)


def build_head(
    config: cfg.TrainConfig,
    *,
    teacher_dims: Mapping[str | None, int | None],
    student_dim: int | None,
    rep_dim: int,
) -> DistillationHead:
    """The weighting and feature adapters the config's channels and weighting ask for
    (``teacher_dims``: each teacher's visual width, None for a text-only one)."""
    specs = []
    feats = {}
    feature_teachers = {}
    anneal_steps = {}
    for plan in config.teacher_plans():
        specs += [
            LogitChannelSpec(
                plan.channel(c.channel),
                c.energy,
                dict(c.options),
                c.positions == "answer",
                plan.name,
            )
            for c in plan.logits
        ]
        teacher_dim = teacher_dims.get(plan.name)
        for f in plan.features:
            name = plan.channel(f.name)
            if teacher_dim is None or student_dim is None:
                raise ValueError(
                    f"feature channel {name!r} needs visual tokens, but a model has none "
                    "(text-only student or teacher)"
                )
            feats[name] = FeatureChannel(
                teacher_dim,
                student_dim,
                f.energy,
                adapter=f.adapter,
                normalize=f.normalize,
                rank=f.rank,
            )
            feature_teachers[name] = plan.name
            if f.anneal_steps is not None:
                anneal_steps[name] = f.anneal_steps
    options = config.weighting_options(rep_dim)
    built = weighting.build(config.weighting.name, ["ce", *config.channel_names()], **options)
    objective = DistillationObjective(built, reduction=config.weighting.reduction)
    return DistillationHead(objective, specs, feats, feature_teachers, anneal_steps)


def _student_representation(config: cfg.TrainConfig) -> str | None:
    """The kind of the student's own part of ``h(x)``, when the weighting has one."""
    wanted = cfg.STUDENT in config.representation_sources()
    return weighting_representation(config) if wanted else None


def _with_lora(student, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return get_peft_model(student, peft_config)
