"""The ``betakd`` command line: train, eval, cache-teacher, audit, demo."""

from __future__ import annotations

import logging
import sys

import click

from betakd import __version__
from betakd.cli_options import config_overrides, load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="betakd")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Uncertainty-aware knowledge distillation (Beta-KD) for VLMs and LLMs."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@config_overrides
@click.option("--resume", is_flag=True, help="Continue the run in training.output_dir.")
@click.option(
    "--check",
    is_flag=True,
    help="Validate the config and the files and folders it names, and exit (loads no model).",
)
def train(config: str, overrides: tuple[str, ...], resume: bool, check: bool) -> None:
    """Distill a student from a teacher as the YAML CONFIG says.

    \b
    CONFIG keys (see README, "Config schema"):
      student:   path, dtype, trust_remote_code, lora
      teacher:   path, dtype, trust_remote_code, source (online|cache), cache_dir
      teachers:  several: [{name, <teacher keys>, channels: {logits, features}}]
      data:      train_file (LLaVA JSON/JSONL), image_folder, max_length,
                 max_skip_fraction, limit
      channels:  logits: [{energy, name, positions, options}],
                 features: [{name, energy (mse|cosine)}]
      weighting: name (equal|fixed|task|instance|closed_form|reference),
                 options, learning_rate, representation, reduction, init_from
      non_finite: action (stop|skip)
      policy:    mode (off_policy|on_policy|mixed), student_fraction, per,
                 start_step, ce (data|none), generation
      training:  any transformers.TrainingArguments field
    """
    cfg = load_config(config, overrides)
    if check:
        from betakd.build import path_problems

        problems = path_problems(cfg)
        if problems:
            raise click.ClickException(
                f"{config}: the settings are valid, but " + "; ".join(problems)
            )
        click.echo(f"{config}: valid")
        return
    from betakd.data import DataError
    from betakd.engines import EngineError
    from betakd.models import ModelError
    from betakd.runs import (
        SKIPPED_FILE,
        OutputDirError,
        exit_process,
        release_processes,
        run_training,
    )
    from betakd.teachers import CacheError, ServedTeacherError

    try:
        result = run_training(cfg, resume=resume)
    except (
        OutputDirError,
        FileNotFoundError,
        CacheError,
        DataError,
        ModelError,
        EngineError,
        ServedTeacherError,
    ) as err:
        # What a user must fix in their files or settings: one line, no traceback.
        raise click.ClickException(str(err)) from err
    finally:
        distributed = release_processes()
    skips = result.skips
    skipped = (
        f"; {skips.count} of {skips.total} samples skipped, listed in "
        f"{result.output_dir / SKIPPED_FILE}"
        if skips.count
        else f"; all {skips.total} samples used"
    )
    click.echo(f"student saved to {result.output_dir}{skipped}")
    if distributed:
        exit_process()


def _register_subcommands() -> None:
    from betakd.audit.cli import audit_command
    from betakd.cache_cli import cache_teacher_command
    from betakd.eval.cli import eval_command

    main.add_command(eval_command, "eval")
    main.add_command(cache_teacher_command, "cache-teacher")
    main.add_command(audit_command, "audit")


_register_subcommands()


@main.command()
@click.option("--quick", is_flag=True, help="Smoke run (one seed, a few steps): about a minute.")
@click.option("--seeds", type=click.IntRange(1), default=None, help="Seeds per strategy [3].")
@click.option(
    "--strategies",
    default=None,
    metavar="NAMES",
    help="Comma-separated strategy names from defaults.yaml's catalogue, or 'all' "
    "[its `run` list]. A sweep's name runs every weight of it.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override the demo design (defaults.yaml), e.g. --set data.blind_value=red "
    "--set data.noise_rate=0.3 --set channels.logit_energy=fkl "
    "--set strategies.robust_task.weighting.options.trust.threshold=2.",
)
@click.option(
    "--jobs",
    type=click.IntRange(1),
    default=None,
    help="Runs in parallel, one CPU thread each [2].",
)
@click.option(
    "--diagnose",
    is_flag=True,
    help="Also record per-slice gradient norms of every channel (slower).",
)
@click.option(
    "--scenario",
    type=click.Choice(
        ["default", "two-teachers", "on-policy", "feature-channel", "cross-tokenizer"]
    ),
    default="default",
    show_default=True,
    help="two-teachers: a student distilled from two teachers blind on different slices "
    "(defaults.yaml's two_teachers section); on-policy: sentence answers, the recommended "
    "weighting off-policy, on-policy and mixed (its on_policy section); feature-channel: "
    "the default runs with a visual feature channel added (its feature_channel section); "
    "cross-tokenizer: sentence answers, a teacher with the student's tokenizer and one with "
    "another (its cross_tokenizer section). "
    "--strategies and --diagnose apply to the default scenario.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for report.md, results.json, plots and runs [betakd-demo, or "
    "betakd-demo-<scenario> for the others].",
)
def demo(quick, seeds, strategies, overrides, jobs, diagnose, scenario, output) -> None:
    """Distill an easy-VQA student with several weightings and report which won.

    Converts easy-VQA (from the easy-vqa package) to LLaVA format with 20% noisy
    answers and a slice the teacher never saw, trains the teacher once (cached in
    ~/.cache/betakd), then distills the student with the selected strategies through
    `betakd train`, evaluates each by generation, and writes report.md, results.json
    and PNG plots to OUTPUT. Every setting of the study comes from
    betakd/demo/defaults.yaml and can be changed with --set.
    """
    from betakd.eval.easyvqa import import_easy_vqa

    try:
        import_easy_vqa()
    except ModuleNotFoundError as err:
        raise click.ClickException(str(err)) from err
    from functools import partial

    from betakd.demo import cross_tokenizer, on_policy, two_teachers
    from betakd.demo.config import DemoConfigError
    from betakd.demo.feature_channel import run_feature_channel
    from betakd.demo.run import run_demo
    from betakd.demo.scenario import DemoRunError, run_scenario

    names = [n.strip() for n in strategies.split(",") if n.strip()] if strategies else None
    scenarios = {
        "two-teachers": partial(run_scenario, two_teachers.SCENARIO),
        "on-policy": partial(run_scenario, on_policy.SCENARIO),
        "feature-channel": run_feature_channel,
        "cross-tokenizer": partial(run_scenario, cross_tokenizer.SCENARIO),
    }
    try:
        if scenario in scenarios:
            if names or diagnose:
                raise click.UsageError("--strategies and --diagnose apply to the default scenario")
            output = output or f"betakd-demo-{scenario}"
            results = scenarios[scenario](
                output,
                quick=quick,
                seeds=range(seeds) if seeds else None,
                overrides=list(overrides),
                jobs=jobs,
            )
        else:
            output = output or "betakd-demo"
            results = run_demo(
                output,
                quick=quick,
                seeds=range(seeds) if seeds else None,
                strategies=names,
                overrides=list(overrides),
                jobs=jobs,
                diagnose=diagnose,
            )
    except (DemoConfigError, DemoRunError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"report: {output}/report.md ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
