"""What the commands that read a training config share: ``--set`` overrides, loading."""

from __future__ import annotations

import click

config_overrides = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set training.max_steps=10 --set weighting.name=task.",
)


def load_config(path: str, overrides: tuple[str, ...]):
    """The validated config, or a usage error that names the key."""
    from betakd.config import ConfigError, load_config

    try:
        return load_config(path, list(overrides))
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
