"""``betakd cache-teacher CONFIG``: write the offline teacher cache for a training config.

Registered on the ``betakd`` group in ``betakd.cli``; options mirror ``betakd train``.
"""

from __future__ import annotations

import click

from betakd.cache import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_VISUAL_TOKENS


@click.command("cache-teacher")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set teacher.cache_dir=cache/teacher.",
)
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
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Samples per teacher forward pass.",
)
@click.option(
    "--visual-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_VISUAL_TOKENS,
    show_default=True,
    help="Teacher visual tokens kept per sample (average-pooled; a square keeps the grid).",
)
@click.option("--device", default=None, help="Teacher device (default: cuda if available).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher_command(
    config: str,
    overrides: tuple[str, ...],
    shard_size: int,
    batch_size: int,
    visual_tokens: int,
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
    --set teacher.source=cache.
    """
    from betakd.cache import CacheError, write_teacher_cache
    from betakd.config import ConfigError, load_config

    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    try:
        path = write_teacher_cache(
            cfg,
            shard_size=shard_size,
            batch_size=batch_size,
            visual_tokens=visual_tokens,
            device=device,
            progress=not no_progress,
        )
    except (CacheError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"teacher cache written to {path}")
