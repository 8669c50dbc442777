"""``betakd cache-teacher CONFIG``: write the offline teacher cache for a training config.

:func:`cache_teacher` is the recipe (config -> teacher, data, cache writer), the
counterpart of :func:`betakd.runs.run_training`; the command is registered on the
``betakd`` group in ``betakd.cli``, with the same ``--set`` overrides as ``betakd train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from betakd.cli_options import config_overrides, load_config
from betakd.teachers.cache_defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
    DEFAULT_VISUAL_TOKENS,
)

if TYPE_CHECKING:
    import torch

    from betakd import config as cfg
    from betakd.data import DataCache


def cache_teacher(
    config: cfg.TrainConfig,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int | None = None,
    visual_tokens: int = DEFAULT_VISUAL_TOKENS,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_cache: DataCache | None = None,
    teacher_name: str | None = None,
) -> Path:
    """Run the config's teacher over its training data once and write its ``cache_dir``
    with what its channels and the weighting need; returns the folder. Resumable (see
    :func:`betakd.teachers.write_cache`). With several teachers, ``teacher_name`` says
    which one. ``batch_size``: samples per teacher forward pass (default
    ``DEFAULT_BATCH_SIZE``); a served teacher (``source: served``) is asked that many
    samples at a time (default four rounds of its ``server.concurrency``), at most
    ``server.concurrency`` requests in flight."""
    # Here, not at the top: the command line imports this module for its options only.
    from betakd import models
    from betakd.data import SampleEncoder, build_dataset
    from betakd.teachers import CacheError, ServedTeacher, write_cache
    from betakd.teachers.build import cache_contents, config_data_fingerprint, select_teacher

    plan = select_teacher(config, teacher_name)
    teacher = plan.settings
    if not teacher.cache_dir:
        raise CacheError(
            f"{plan.key}.cache_dir: set where the cache goes (--set {plan.key}.cache_dir=)"
        )
    if teacher.source != "served" and not teacher.path:
        raise CacheError(f"{plan.key}.path: writing the cache needs the teacher model")
    contents = cache_contents(config, plan)  # refuses what a cache cannot hold, early
    device = models.default_device(device)
    if teacher.source == "served":
        source, processor, adapter, identity = _served_cache_source(config, plan, contents)
    else:
        source, processor, adapter, identity = _online_cache_source(config, plan, contents, device)
    encoder = SampleEncoder(processor, adapter, config.data.max_length, data_cache)
    dataset = build_dataset(
        config.data.train_file,
        config.data.image_folder,
        {"teacher": encoder},
        max_skip_fraction=config.data.max_skip_fraction,
        limit=config.data.limit,
        cache=data_cache,
    )
    if isinstance(source.source, ServedTeacher):
        # As before training: another tokenizer or chat template stops here.
        source.source.check_template(dataset.conversations[:1], encoder)
    fingerprint = {
        **config_data_fingerprint(config, processor),
        **identity,
        "data_limit": config.data.limit,
    }
    if batch_size is None:
        served = teacher.source == "served"
        batch_size = 4 * teacher.server.concurrency if served else DEFAULT_BATCH_SIZE
    return write_cache(
        teacher.cache_dir,
        source,
        encoder,
        dataset,
        fingerprint=fingerprint,
        top_k=teacher.cache_top_k,
        shard_size=shard_size,
        batch_size=batch_size,
        visual_tokens=visual_tokens,
        device=device,
        progress=progress,
    )


def _online_cache_source(config: cfg.TrainConfig, plan: cfg.TeacherPlan, contents, device):
    """The teacher model loaded here; the cache stores its own tokens."""
    from betakd import chunked, models
    from betakd.align import representation_dim
    from betakd.teachers import CacheSource
    from betakd.teachers.build import load_teacher_model, online_source
    from betakd.teachers.cache_format import teacher_identity

    loaded = load_teacher_model(plan)
    loaded.model.to(device)
    vocab = models.vocab_rows(loaded.processor, loaded.model)
    # The teacher's logits exist a chunk of answer tokens at a time, as in training.
    chunk = chunked.default_chunk_size(vocab, device)
    source = CacheSource(
        online_source(config, plan, loaded, vocab, chunk),
        contents,
        vocab,
        visual_dim=loaded.visual_width,
        representation_dim=contents.representation
        and representation_dim(contents.representation, loaded.model.config),
        chunk_size=chunk,
    )
    settings = plan.settings
    identity = {"teacher": teacher_identity(settings.path), "teacher_dtype": settings.dtype}
    return source, loaded.processor, loaded.adapter, identity


def _served_cache_source(config: cfg.TrainConfig, plan: cfg.TeacherPlan, contents):
    """The plan's vLLM server; it shares the student's tokenizer, so the data is encoded
    with the student's processor (no model weights are loaded here)."""
    from betakd import models
    from betakd.teachers import CacheSource
    from betakd.teachers.build import served_source

    student = config.student
    processor, adapter = models.load_interface(
        student.path, trust_remote_code=student.trust_remote_code, key="student.path"
    )
    vocab = models.vocab_rows(processor)
    served = served_source(config, plan, processor, adapter, vocab, on_policy=False)
    source = CacheSource(
        served,
        contents,
        vocab,
        visual_dim=None,
        representation_dim=2 if contents.representation else None,
        top_k_given=plan.settings.server.top_k,
    )
    return source, processor, adapter, {"teacher": {"served_model": plan.settings.server.model}}


@click.command("cache-teacher")
@click.argument("config", type=click.Path(dir_okay=False))
@config_overrides
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Samples per shard file (the unit of resuming).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=f"Samples per teacher forward pass [default: {DEFAULT_BATCH_SIZE}; a served "
    "teacher: samples asked at a time, default 4 x teacher.server.concurrency].",
)
@click.option(
    "--visual-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_VISUAL_TOKENS,
    show_default=True,
    help="Teacher visual tokens kept per sample (average-pooled; a square keeps the grid).",
)
@click.option("--teacher", "teacher_name", default=None, help="Which teacher, with several.")
@click.option(
    "--device",
    default=None,
    help="Teacher device (default: cuda if available; unused when served).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher_command(
    config: str,
    overrides: tuple[str, ...],
    shard_size: int,
    batch_size: int | None,
    visual_tokens: int,
    teacher_name: str | None,
    device: str | None,
    no_progress: bool,
) -> None:
    """Run the teacher of CONFIG once over its training data and cache its outputs.

    \b
    Stores per answer token the top-k log-probabilities (k = teacher.cache_top_k),
    their token ids and the tail mass, and per sample the pooled teacher visual
    tokens and the instance-weighting representation, as the config's channels
    and weighting need them, in teacher.cache_dir (safetensors shards + index.json).
    Rerunning an interrupted command resumes it. Train from it with
    --set teacher.source=cache. With several teachers, cache each one with
    --teacher NAME and set teachers.N.source=cache. A served teacher
    (teacher.source: served) is asked by its vLLM server, many requests at once;
    the cache keeps at most teacher.server.top_k tokens per position.
    """
    from betakd.models import ModelError
    from betakd.teachers import CacheError, ServedTeacherError

    try:
        path = cache_teacher(
            load_config(config, overrides),
            shard_size=shard_size,
            batch_size=batch_size,
            visual_tokens=visual_tokens,
            device=device,
            progress=not no_progress,
            teacher_name=teacher_name,
        )
    except (CacheError, FileNotFoundError, ModelError) as err:
        raise click.ClickException(str(err)) from err
    except ServedTeacherError as err:
        raise click.ClickException(
            f"{err}. The shards written so far are kept: rerun the command to resume"
        ) from err
    # Sizes and the top-k's captured mass were logged by the writer (with a warning
    # when the mass is low).
    click.echo(f"teacher cache written to {path}")
