"""One interface for the `betakd demo` scenarios, and the driver every scenario runs through.

A :class:`Scenario` says what differs from one scenario to the next: its name and output
folder, its design (from the demo's, ``defaults.yaml`` with ``--set``), where its seeds
come from, its runs, its teachers, what it prepares before the runs (teacher scores,
offline caches, an audit, the jobs and its own results.json entries), how one run goes
(``run_job``, in a worker process) and its report. :func:`run_scenario` does the rest,
once for every scenario: the settings, the output folder, the data, the teachers, the
test questions, one untrained student per seed, the runs in a worker pool, results.json,
the report, and one error naming the runs that failed.

The settings of a demo invocation (:class:`DemoSettings`, quick or not) and the worker
pool live here too; what one run trains (``betakd train``'s config) is
:mod:`betakd.demo.run`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from betakd.demo import report
from betakd.demo.config import DemoConfig, load_demo_config
from betakd.demo.easyvqa_data import DemoData
from betakd.demo.evaluation import test_samples
from betakd.demo.teacher import ensure_teacher, prepare_data, save_student_init

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DemoSettings:
    """How one `betakd demo` invocation runs (the design itself is the DemoConfig)."""

    seeds: tuple[int, ...] = (0, 1)
    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 1e-3
    weighting_learning_rate: float = 0.02
    test_questions: int = 1000
    eval_batch_size: int = 128
    logging_steps: int = 10
    train_limit: int | None = None  # first N student training questions (None: all)
    jobs: int = 2
    diagnose: bool = False


def settings_from(config: DemoConfig, **changes) -> DemoSettings:
    """The student runs as ``defaults.yaml`` (``student_training``) describes them."""
    student = config.student_training
    settings = DemoSettings(
        seeds=tuple(student.seeds),
        steps=student.steps,
        batch_size=student.batch_size,
        learning_rate=student.learning_rate,
        weighting_learning_rate=student.weighting_learning_rate,
    )
    return replace(settings, **changes)


QUICK = dict(seeds=(0,), steps=12, test_questions=64, logging_steps=4, train_limit=384)
QUICK_TEACHER_STEPS = 40


def scenario_settings(
    config: DemoConfig,
    scenario_seeds,
    *,
    quick: bool,
    seeds=None,
    jobs: int | None = None,
    **changes,
) -> DemoSettings:
    """A scenario's settings: its own seeds (``scenario_seeds``), or the quick ones, or
    those given, and ``jobs`` when given; ``changes``: other settings of the scenario
    (a quick run's settings win over them)."""
    changes.update(dict(QUICK) if quick else {"seeds": tuple(scenario_seeds)})
    if seeds:
        changes["seeds"] = tuple(seeds)
    if jobs:
        changes["jobs"] = jobs
    return settings_from(config, **changes)


def demo_config(quick: bool, overrides=()) -> DemoConfig:
    config = load_demo_config(overrides=overrides)
    if quick:
        # A smoke run: the same models and data, a teacher trained for a few steps only
        # (cached under its own key), so the pipeline runs end to end in about a minute.
        config = replace(
            config,
            data=replace(config.data, teacher_max_train=512, max_test=200),
            teacher_training=replace(config.teacher_training, steps=QUICK_TEACHER_STEPS),
        )
    return config


@contextlib.contextmanager
def one_thread():
    """Tiny models: one thread each (runs go to ``jobs`` processes); the caller's thread
    count comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def student_init(config: DemoConfig, out: Path, seed: int) -> Path:
    """The untrained student of a seed (every run starts from the same weights)."""
    path = out / "init" / f"student-seed{seed}"
    if not (path / "config.json").exists():
        save_student_init(config, seed, path)
    return path


# ----------------------------------------------------------------------------- the pool


class DemoRunError(RuntimeError):
    """Some runs of a demo failed; the other runs' results and report were written."""


@dataclass
class FailedRun:
    run: str  # <run>-seed<k>, the name of its folder and log under runs/
    error: str
    log: str


def run_in_pool(function, jobs: list, workers: int, name, out: Path) -> tuple[list, list]:
    """``function(job)`` for every job in ``workers`` spawned processes, with a progress
    bar. Returns the results of the runs that finished, in the order of ``jobs``, and a
    :class:`FailedRun` for each that raised: one run's failure does not lose the others.
    ``name(job)``: the run's name (its log is ``out/runs/<name>.log``)."""
    from tqdm.auto import tqdm

    results: dict[int, object] = {}
    failures: list[FailedRun] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(function, job): i for i, job in enumerate(jobs)}
        progress = tqdm(as_completed(futures), total=len(futures), desc="betakd demo", unit="run")
        for future in progress:
            index = futures[future]
            run = name(jobs[index])
            try:
                results[index] = future.result()
            # Any run error: recorded, and raised after the others (raise_for_failures).
            except Exception as err:  # noqa: BLE001
                log = out / "runs" / f"{run}.log"
                error = " ".join(line.strip() for line in str(err).splitlines())
                failures.append(FailedRun(run, f"{type(err).__name__}: {error}", str(log)))
                logger.error("run %s failed: %s (log: %s)", run, err, log)
            progress.set_postfix(last=run)
    return [results[i] for i in sorted(results)], failures


def raise_for_failures(failures: list, total: int, out: Path) -> None:
    """After the report of the finished runs is written: one error naming the others."""
    if failures:
        first = failures[0]
        raise DemoRunError(
            f"{len(failures)} of {total} runs failed ({', '.join(f.run for f in failures)}); "
            f"first: {first.error} (log: {first.log}). {out}/results.json "
            "and report.md hold the other runs"
        )


# ----------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Context:
    """What the driver has ready when a scenario prepares its runs."""

    config: DemoConfig  # the scenario's design
    settings: DemoSettings
    runs: list  # the scenario's runs (Scenario.runs)
    designs: Mapping[str, DemoConfig]  # teacher name -> its design (Scenario.teachers)
    teachers: Mapping[str, Path]  # teacher name -> its trained folder
    teacher_seconds: float  # finding (or training) the teachers in this invocation
    data: DemoData  # the student's data
    tests: list  # the test questions every run and teacher answers
    inits: Mapping[int, Path]  # seed -> the untrained student of that seed
    out: Path


@dataclass(frozen=True)
class Prepared:
    """What a scenario prepared: its jobs and its own results.json entries."""

    jobs: list  # one per run and seed, picklable: each goes to a worker process
    entries: dict  # after "overrides": its design, runs and teachers
    findings: dict = field(default_factory=dict)  # after "data": measured before the runs


def _unchanged(config: DemoConfig) -> DemoConfig:
    return config


def _one_teacher(config: DemoConfig) -> dict[str, DemoConfig]:
    return {"teacher": config}


@dataclass(frozen=True)
class Scenario:
    """What differs from one `betakd demo` scenario to the next (see the module's doc)."""

    name: str | None  # results.json's "scenario"; None: the default one (no such entry)
    output_dir: str  # its output folder unless one is given
    seeds: Callable[[DemoConfig], Sequence[int]]  # its seeds (not quick, none given)
    runs: Callable[[DemoConfig], list]  # its runs; raises on a bad design, before any work
    prepare: Callable[[Context], Prepared]
    run_job: Callable[[Any], Any]  # one job -> its record (a dataclass); module-level
    job_name: Callable[[Any], str]  # a job's <run>-seed<k> (its folder and log)
    write_report: Callable[[dict, Path], Any]  # results.json's content, the output folder
    configure: Callable[[DemoConfig], DemoConfig] = _unchanged  # its design from the demo's
    teachers: Callable[[DemoConfig], Mapping[str, DemoConfig]] = _one_teacher  # name -> design
    settings: Mapping[str, Any] = field(default_factory=dict)  # its other DemoSettings


def run_scenario(
    scenario: Scenario,
    output_dir: str | Path | None = None,
    *,
    quick: bool = False,
    seeds=None,
    overrides=(),
    jobs: int | None = None,
) -> dict:
    """Run ``scenario`` for every seed; write results.json, then its report (and plots),
    then raise :class:`DemoRunError` if some runs failed. Returns results.json's content.

    ``quick``: a smoke run (a 40-step teacher, one seed, a few steps); ``seeds``: the
    seeds to run instead of the scenario's; ``overrides``: ``--set`` changes of the
    design; ``jobs``: runs in parallel, one thread each.
    """
    with one_thread():
        started = time.time()
        config = scenario.configure(demo_config(quick, overrides))
        settings = scenario_settings(
            config, scenario.seeds(config), quick=quick, seeds=seeds, jobs=jobs,
            **scenario.settings,
        )  # fmt: skip
        runs = scenario.runs(config)
        designs = dict(scenario.teachers(config))
        out = Path(output_dir if output_dir is not None else scenario.output_dir)
        out.mkdir(parents=True, exist_ok=True)

        data = prepare_data(config)  # the student's data, whichever teachers
        teacher_start = time.time()
        teachers = {name: ensure_teacher(design, progress=True) for name, design in designs.items()}
        teacher_seconds = time.time() - teacher_start
        tests = test_samples(data.test, settings.test_questions)
        inits = {seed: student_init(config, out, seed) for seed in settings.seeds}
        context = Context(
            config, settings, runs, designs, teachers, teacher_seconds, data, tests, inits, out
        )
        prepared = scenario.prepare(context)
        records, failures = run_in_pool(
            scenario.run_job, prepared.jobs, settings.jobs, scenario.job_name, out
        )
        failed = {f.run for f in failures}
        finished = [n for n in map(scenario.job_name, prepared.jobs) if n not in failed]
        for name, record in zip(finished, records):
            logger.info("%s: %s", name, record.accuracy)

        results: dict[str, Any] = {} if scenario.name is None else {"scenario": scenario.name}
        results["settings"] = asdict(settings)
        results["quick"] = quick
        results["overrides"] = list(overrides)
        results.update(prepared.entries)
        results["data"] = data.manifest
        results.update(prepared.findings)
        results["runs"] = [asdict(r) for r in records]
        results["failed"] = [asdict(f) for f in failures]
        results["wall_seconds"] = round(time.time() - started, 1)
        results["machine"] = report.machine_description()
        (out / "results.json").write_text(json.dumps(results, indent=2))
        scenario.write_report(results, out)
        raise_for_failures(failures, len(prepared.jobs), out)
        return results
