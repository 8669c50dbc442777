"""``betakd audit CONFIG``: score the training data with the teachers, report where they
and the labels are probably wrong (docs/audit.md)."""

from __future__ import annotations

import click

from betakd.cli_options import config_overrides, load_config


@click.command("audit")
@click.argument("config", type=click.Path(dir_okay=False))
@config_overrides
@click.option("--output", default="betakd-audit", show_default=True, type=click.Path(file_okay=False), help="Folder for report.md, audit.json, the plot and the resumable scores.")  # fmt: skip
@click.option("--ignore-field", "ignore_fields", multiple=True, metavar="FIELD", help="A metadata field not to slice by (and those below it, e.g. meta.noisy); repeat for several.")  # fmt: skip
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Slices and samples kept per list.")  # fmt: skip
@click.option("--part-size", type=click.IntRange(min=1), default=256, show_default=True, help="Samples per scores file (the unit of resuming).")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def audit_command(
    config: str,
    overrides: tuple[str, ...],
    output: str,
    ignore_fields: tuple[str, ...],
    top: int,
    part_size: int,
    no_progress: bool,
) -> None:
    """Score CONFIG's training data with its teachers, without training a student.

    \b
    Per teacher: the NLL of the data's answers, the trust the configured weighting
    would give, the teacher reliability's P(teacher right) per sample and per slice
    of every metadata field of the records; the samples most likely to be teacher
    errors and label errors; with several teachers, where they disagree. Writes
    OUTPUT/report.md, audit.json and teachers.png. A killed audit continues where it
    stopped when rerun with the same OUTPUT.
    """
    from betakd.audit.run import AuditOptions, run_audit
    from betakd.audit.scores import AuditError
    from betakd.data import DataError
    from betakd.models import ModelError
    from betakd.teachers import CacheError

    settings = load_config(config, overrides)
    try:
        options = AuditOptions(ignore_fields, top, part_size, progress=not no_progress)
        result = run_audit(settings, output, options)
    except (AuditError, CacheError, DataError, FileNotFoundError, ModelError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"audit of {result['samples_scored']} samples in {result['seconds']:.0f} s: "
        f"{output}/report.md"
    )
