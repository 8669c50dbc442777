"""Teachers built in one place: the config's teacher plans -> teacher sources.

`betakd train`, `betakd cache-teacher`, `betakd audit`, the demo and the benchmarks
get their teachers here: each plan (one per teacher, `teacher:` or `teachers:`)
becomes an online or cached source, with its encoder and what the student side needs
to know (vocabulary rows, visual widths, representation size). Several teachers become
one :class:`~betakd.teachers.TeacherEnsemble`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from betakd import config as cfg
from betakd import models
from betakd.align import representation_dim
from betakd.cross_tokenizer.vocabulary import SharedVocabulary
from betakd.data import DataCache, SampleEncoder
from betakd.teachers.cache_format import CacheContents, CacheError, data_fingerprint
from betakd.teachers.cache_reader import CachedTeacher, TeacherCache
from betakd.teachers.ensemble import TeacherEnsemble
from betakd.teachers.online import OnlineTeacher
from betakd.teachers.protocol import TeacherSource
from betakd.teachers.served import ServedTeacher
from betakd.teachers.text_aligned import TextAlignedTeacher
from betakd.teachers.vllm_client import ServedTeacherError, TeacherServer

logger = logging.getLogger(__name__)


@dataclass
class TeacherSide:
    """What the recipe builds for the teachers, whichever their sources."""

    source: TeacherSource  # several teachers: their ensemble
    # Each teacher's own source by name (None: the single teacher).
    members: dict[str | None, TeacherSource]
    # Each teacher's encoder by name, online teachers only (a cache or a server needs
    # no teacher batch).
    encoders: dict[str | None, SampleEncoder]
    vocab_rows: int  # the shared vocabulary (logit columns beyond it are padding)
    visual_dims: dict[str | None, int | None]  # per teacher (None: the single teacher)
    representation_dim: int


def build_teacher(
    config: cfg.TrainConfig, student: models.LoadedModel, data_cache: DataCache | None = None
) -> TeacherSide:
    """The config's teacher sources (each ``source``: online or cache) for ``student``;
    several teachers become one :class:`~betakd.teachers.TeacherEnsemble`."""
    sides = {
        plan.name: _teacher_of_plan(config, plan, student, data_cache)
        for plan in config.teacher_plans()
    }
    if config.teachers is None:
        return sides[None]
    sources = config.representation_sources() if weighting_representation(config) else []
    representation_from = [name for name in sources if name != cfg.STUDENT]
    members = {name: side.source for name, side in sides.items()}
    return TeacherSide(
        source=TeacherEnsemble(members, representation_from),
        members=members,
        encoders={name: e for side in sides.values() for name, e in side.encoders.items()},
        vocab_rows=min(side.vocab_rows for side in sides.values()),
        visual_dims={name: side.visual_dims[name] for name, side in sides.items()},
        representation_dim=sum(sides[n].representation_dim for n in representation_from),
    )


def _teacher_of_plan(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    student: models.LoadedModel,
    data_cache: DataCache | None,
) -> TeacherSide:
    if plan.settings.source == "cache":
        return _cached_teacher(config, plan, student)
    if plan.settings.source == "served":
        return _served_teacher(config, plan, student)
    return _online_teacher(config, plan, student, data_cache)


def weighting_representation(config: cfg.TrainConfig) -> str | None:
    """The weighting's ``h(x)``, when it has one."""
    return config.weighting.representation if config.weighting.needs_representation else None


def teacher_contents(config: cfg.TrainConfig, plan: cfg.TeacherPlan) -> CacheContents:
    """What one teacher's channels and the weighting need from it."""
    wants_representation = plan.name in config.representation_sources()
    return CacheContents(
        logits=bool(plan.logits),
        visual=bool(plan.features),
        representation=weighting_representation(config) if wants_representation else None,
    )


def cache_contents(config: cfg.TrainConfig, plan: cfg.TeacherPlan) -> CacheContents:
    """What a cache of one teacher holds for the config; prompt positions cannot be cached."""
    for i, channel in enumerate(plan.logits):
        if channel.positions != "answer":
            where = "channels" if plan.name is None else f"{plan.key}.channels"
            raise CacheError(
                f"{where}.logits.{i}.positions: {channel.positions!r} needs the teacher at "
                "prompt positions; the cache holds answer tokens only (use an online teacher)"
            )
    return teacher_contents(config, plan)


def config_data_fingerprint(config: cfg.TrainConfig, tokenizer) -> dict:
    """The run's data and tokenizer fields of a cache fingerprint."""
    data = config.data
    return data_fingerprint(data.train_file, data.image_folder, tokenizer, data.max_length)


def load_teacher_model(plan: cfg.TeacherPlan) -> models.LoadedModel:
    """The plan's teacher model, frozen, as its settings say; errors name its key."""
    settings = plan.settings
    return models.load(
        settings.path,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        frozen=True,
        key=f"{plan.key}.path",
    )


def _online_teacher(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    student: models.LoadedModel,
    data_cache: DataCache | None,
) -> TeacherSide:
    teacher = load_teacher_model(plan)
    if plan.settings.cross_tokenizer is None:
        models.check_same_vocabulary(student.processor, teacher.processor, teacher_name=plan.name)
        vocab = models.vocab_rows(student.processor, student.model, teacher.model)
        source = online_source(
            config,
            plan,
            teacher,
            vocab,
            config.channels.chunk_size,
            student_adapter=student.adapter,
        )
    else:
        vocab = models.vocab_rows(student.processor, student.model)
        source = _text_aligned_teacher(config, plan, teacher, student, vocab)
    encoder = SampleEncoder(teacher.processor, teacher.adapter, config.data.max_length, data_cache)
    return TeacherSide(
        source=source,
        members={plan.name: source},
        encoders={plan.name: encoder},
        vocab_rows=vocab,
        visual_dims={plan.name: teacher.visual_width},
        representation_dim=representation_dim(
            config.weighting.representation, teacher.model.config
        ),
    )


def _text_aligned_teacher(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    teacher: models.LoadedModel,
    student: models.LoadedModel,
    student_vocab: int,
) -> TextAlignedTeacher:
    """An online teacher of another tokenizer: its own online source, aligned by text."""
    teacher_vocab = models.vocab_rows(teacher.processor, teacher.model)
    chunk = config.channels.chunk_size
    own = online_source(config, plan, teacher, teacher_vocab, chunk, student_adapter=None)
    own.need_logits = True  # the groups' targets and the teacher's NLL read them
    return _aligned_by_text(config, plan, own, student.processor, teacher.processor, student_vocab)


def _aligned_by_text(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    own: OnlineTeacher | CachedTeacher,
    student_processor,
    teacher_processor,
    student_vocab: int,
) -> TextAlignedTeacher:
    """A source of the teacher's own targets (its vocabulary) aligned by text with the
    student's answers."""
    teacher_vocab = models.vocab_rows(teacher_processor)
    shared = SharedVocabulary.between(
        student_processor, teacher_processor, student_vocab, teacher_vocab
    )
    logger.info(
        "%s: aligned by text; %d of the student's %d and the teacher's %d tokens shared",
        plan.key,
        len(shared),
        student_vocab,
        teacher_vocab,
    )
    settings = plan.settings.cross_tokenizer
    return TextAlignedTeacher(
        own,
        models.tokenizer_of(student_processor),
        models.tokenizer_of(teacher_processor),
        shared,
        teacher_vocab=teacher_vocab,
        loss=settings.loss,
        chunk_size=config.channels.chunk_size,
        max_unaligned=settings.max_unaligned,
    )


def online_source(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    teacher: models.LoadedModel,
    vocab: int,
    chunk_size: int | None,
    *,
    student_adapter: models.FamilyAdapter | None = None,
) -> OnlineTeacher:
    """One loaded teacher as an online source of what its channels and the weighting
    need (``chunk_size``: see :class:`~betakd.teachers.OnlineTeacher`)."""
    needs = teacher_contents(config, plan)
    return OnlineTeacher(
        teacher.model,
        teacher.adapter,
        vocab_rows=vocab,
        need_logits=needs.logits,
        need_visual=needs.visual,
        representation=needs.representation,
        chunk_size=chunk_size,
        student_adapter=student_adapter,
        include_prompt=any(c.positions != "answer" for c in plan.logits),
        reuse_images=config.policy.on_policy,
    )


def _cached_teacher(
    config: cfg.TrainConfig, plan: cfg.TeacherPlan, student: models.LoadedModel
) -> TeacherSide:
    """source: cache -- no teacher model is loaded. The cache must have been written for
    this data, tokenizer (the student's: both share one vocabulary), teacher and top k,
    and hold what the teacher's channels and the weighting need."""
    needs = cache_contents(config, plan)
    where = "channels" if plan.name is None else f"{plan.key}.channels"
    if needs.visual and not student.adapter.multimodal:
        raise CacheError(f"{where}.features: the student is text-only, it has no visual tokens")
    settings = plan.settings
    cross = settings.cross_tokenizer is not None
    if cross and not settings.path:
        raise CacheError(
            f"{plan.key}.path: a cached teacher of another tokenizer needs its folder for the "
            "tokenizer (its weights are not loaded)"
        )
    # The cache holds the teacher's tokens: those of its own tokenizer when it differs.
    processor = models.load_processor(settings.path) if cross else student.processor
    cache = TeacherCache(settings.cache_dir)
    cache.check_fingerprint(
        config_data_fingerprint(config, processor),
        teacher_path=settings.path,
        top_k=settings.cache_top_k if needs.logits else None,
    )
    vocab = models.vocab_rows(student.processor, student.model)
    cached_vocab = models.vocab_rows(processor) if cross else vocab
    source = CachedTeacher(
        cache,
        vocab_rows=cached_vocab,
        need_logits=needs.logits or cross,
        need_visual=needs.visual,
        representation=needs.representation,
    )
    if cross:
        source = _aligned_by_text(config, plan, source, student.processor, processor, vocab)
    return TeacherSide(
        source=source,
        members={plan.name: source},
        encoders={},
        vocab_rows=vocab,
        visual_dims={plan.name: cache.teacher_visual_dim},
        representation_dim=cache.representation_dim or 1,
    )


def _served_teacher(
    config: cfg.TrainConfig, plan: cfg.TeacherPlan, student: models.LoadedModel
) -> TeacherSide:
    """source: served -- a vLLM server scores every batch."""
    vocab = models.vocab_rows(student.processor, student.model)
    source = served_source(config, plan, student.processor, student.adapter, vocab)
    return TeacherSide(
        source=source,
        members={plan.name: source},
        encoders={},
        vocab_rows=vocab,
        visual_dims={plan.name: None},
        representation_dim=2 if source.representation else 1,
    )


def served_source(
    config: cfg.TrainConfig,
    plan: cfg.TeacherPlan,
    processor,
    adapter: models.FamilyAdapter,
    vocab: int,
    *,
    on_policy: bool | None = None,
) -> ServedTeacher:
    """The plan's vLLM server as a source for a student of ``processor`` and ``adapter``
    (the teacher shares its tokenizer). The server must answer and serve the configured
    model before anything else is built, and, when it will score the student's own
    answers with images (``on_policy``; default: the config's policy), take token ids
    with images. It returns log-probabilities only: feature channels, prompt positions
    and hidden-state representations are refused."""
    where = "channels" if plan.name is None else f"{plan.key}.channels"
    if plan.features:
        raise ServedTeacherError(
            f"{where}.features: a served teacher returns log-probabilities, not the hidden "
            "states a feature channel needs (use an online or cached teacher for it)"
        )
    for i, channel in enumerate(plan.logits):
        if channel.positions != "answer":
            raise ServedTeacherError(
                f"{where}.logits.{i}.positions: a served teacher scores answer tokens only"
            )
    needs = teacher_contents(config, plan)
    if needs.representation not in (None, "teacher_confidence"):
        raise ServedTeacherError(
            f"weighting.representation {needs.representation!r} reads the teacher's hidden "
            "states, which a served teacher does not return: use teacher_confidence, or, "
            "with several teachers, weighting.representation_from naming another one"
        )
    settings = plan.settings.server
    server = TeacherServer(
        settings.url,
        settings.model,
        timeout_s=settings.timeout_s,
        retries=settings.retries,
        concurrency=settings.concurrency,
    )
    server.check()
    on_policy = config.policy.on_policy if on_policy is None else on_policy
    if settings.token_api or (on_policy and adapter.multimodal):
        server.check_token_api()
    return ServedTeacher(
        server,
        vocab_rows=vocab,
        top_k=settings.top_k,
        images=adapter.multimodal,
        tokenizer=models.tokenizer_of(processor),
        image_token_ids=adapter.image_token_ids,
        representation=needs.representation,
        chunk_size=config.channels.chunk_size,
        prefetch_batches=settings.prefetch_batches,
        token_api=settings.token_api,
    )


def select_teacher(config: cfg.TrainConfig, name: str | None) -> cfg.TeacherPlan:
    """The teacher called ``name`` (the only one when None and there is one)."""
    plans = config.teacher_plans()
    names = [p.name for p in plans]
    if config.teachers is None:
        if name is not None:
            raise CacheError(f"--teacher {name}: the config has a single, unnamed teacher")
        return plans[0]
    if name is None:
        if len(plans) == 1:
            return plans[0]
        raise CacheError(f"the config has several teachers: choose one with --teacher {names}")
    if name not in names:
        raise CacheError(f"--teacher {name}: no such teacher; the config has {names}")
    return plans[names.index(name)]
