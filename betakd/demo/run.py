"""`betakd demo`: distill an easy-VQA student with several weightings and report what won.

The default scenario (:func:`run_demo`, through :func:`betakd.demo.scenario.run_scenario`
like every scenario), and what one run of any scenario is made of: its ``betakd train``
config (:func:`train_config`), its training in a worker (:func:`train_logged`) and the
teacher's offline cache the runs read (:func:`ensure_teacher_cache`).

Every run goes through the public path (a ``betakd train`` config -> ``run_training``)
and every accuracy through the evaluation harness (``betakd.eval.generate`` + the
easy-VQA scorer, see :mod:`betakd.demo.evaluation`), so the demo exercises what a user's
data would. Runs are independent and go to ``jobs`` worker processes (one thread each:
the models are tiny).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from betakd import config as cfg
from betakd.demo import report
from betakd.demo.audit import audit_demo_data
from betakd.demo.config import DemoConfig
from betakd.demo.easyvqa_data import DemoData, read_jsonl
from betakd.demo.evaluation import (
    SLICES,
    beta_history,
    evaluate,
    final_betas,
    slice_history,
    slice_of,
)
from betakd.demo.scenario import (
    Context,
    DemoSettings,
    Prepared,
    Scenario,
    run_scenario,
)
from betakd.demo.strategies import Strategy, catalogue, recommended, select
from betakd.demo.teacher import answer_nll, cache_root, encode_file, teacher_info

logger = logging.getLogger(__name__)


@dataclass
class RunRecord:
    strategy: str
    label: str
    family: str
    recommended: bool
    seed: int
    accuracy: dict
    train_seconds: float
    beta_history: dict = field(default_factory=dict)  # channel -> [[step, mean, min, max]]
    slice_history: dict = field(default_factory=dict)  # channel -> slice -> [[step, beta, energy]]
    separation: dict = field(default_factory=dict)  # channel -> AUCs and per-slice mean betas
    diagnostics: list = field(default_factory=list)  # per-slice gradient norms over training
    weighting: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- training


def train_config(
    strategy: Strategy,
    seed: int,
    *,
    config: DemoConfig,
    student: Path,
    teacher: Path,
    data: DemoData,
    out: Path,
    settings: DemoSettings,
    cache_dir: Path | None = None,
    policy: dict | None = None,
    cross_tokenizer: dict | None = None,
) -> cfg.TrainConfig:
    """The `betakd train` config of one demo run (what a user would write in YAML);
    ``policy``: its ``policy`` block (default: off-policy); ``cross_tokenizer``: the
    teacher's, when its tokenizer differs from the student's."""
    teacher_block: dict = {"path": str(teacher)}
    if cache_dir is not None:
        teacher_block.update(source="cache", cache_dir=str(cache_dir))
    if cross_tokenizer is not None:
        teacher_block["cross_tokenizer"] = cross_tokenizer
    raw = {
        "student": {"path": str(student)},
        "teacher": teacher_block,
        "data": data_block(data, settings),
        "channels": strategy.channels(config.channels),
        "weighting": strategy.weighting_block(config.channels, settings.weighting_learning_rate),
        "training": training_block(settings, seed, out),
    }
    if policy is not None:
        raw["policy"] = policy
    return cfg.validate(raw, source=f"demo strategy {strategy.name} seed {seed}")


def data_block(data: DemoData, settings: DemoSettings) -> dict:
    """The ``data`` block of every demo run: the student's training split."""
    return {
        "train_file": str(data.train_student),
        "image_folder": str(data.image_folder),
        "limit": settings.train_limit,
    }


def training_block(settings: DemoSettings, seed: int, out: Path) -> dict:
    """The ``training`` block of every demo run (``transformers.TrainingArguments``)."""
    return {
        "output_dir": str(out),
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "logging_steps": settings.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": seed,
        "data_seed": seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


@dataclass(frozen=True)
class Job:
    """Everything one run needs (picklable: runs go to worker processes)."""

    strategy: Strategy
    seed: int
    config: DemoConfig
    settings: DemoSettings
    student_init: Path
    teacher: Path
    data: DemoData
    cache_dir: Path | None
    out: Path
    tests: list


def train_logged(config: cfg.TrainConfig, run_dir: Path, groups: dict, callbacks=()) -> tuple:
    """``run_training`` in a worker, its log in ``<run_dir>.log`` (the demo's console
    shows progress); returns the result and the training seconds."""
    from betakd.runs import run_training

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with (
        open(run_dir.parent / f"{run_dir.name}.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        result = run_training(config, sample_groups=groups, callbacks=list(callbacks))
    return result, time.time() - start


def prepare_worker(run_dir: Path) -> None:
    """One thread, quiet libraries, and no scratch from an earlier demo in ``run_dir``."""
    torch.set_num_threads(1)
    _quiet_workers()
    shutil.rmtree(run_dir, ignore_errors=True)


def run_job(job: Job) -> RunRecord:
    """Train one strategy with one seed, evaluate it, and summarise its weights."""
    from betakd.demo.diagnostics import SliceGradients

    strategy, settings = job.strategy, job.settings
    run_dir = job.out / "runs" / job_name(job)
    prepare_worker(run_dir)
    config = train_config(
        strategy,
        job.seed,
        config=job.config,
        student=job.student_init,
        teacher=job.teacher,
        data=job.data,
        out=run_dir,
        settings=settings,
        cache_dir=job.cache_dir,
    )
    records = read_jsonl(job.data.train_student)
    if settings.train_limit:
        records = records[: settings.train_limit]
    groups = {r["id"]: slice_of(r) for r in records}
    callbacks = []
    if settings.diagnose and strategy.uses_teacher:
        probes = {
            name: [i for i, r in enumerate(records) if slice_of(r) == name][:32] for name in SLICES
        }
        callbacks.append(SliceGradients(probes, every=max(1, settings.steps // 10)))
    result, seconds = train_logged(config, run_dir, groups, callbacks)
    channels = config.channels.names()
    record = RunRecord(
        strategy=strategy.name,
        label=strategy.label,
        family=strategy.family,
        recommended=strategy.recommended,
        seed=job.seed,
        accuracy=evaluate(run_dir, job.tests, job.data.image_folder, settings.eval_batch_size),
        train_seconds=round(seconds, 1),
        beta_history=beta_history(result.log_history, channels),
        slice_history=slice_history(result.log_history, channels),
        diagnostics=callbacks[0].history if callbacks else [],
        weighting=config.weighting.model_dump(mode="json"),
    )
    if strategy.uses_teacher:
        record.separation = final_betas(result.trainer, records)
    return record


def job_name(job: Job) -> str:
    return f"{job.strategy.name}-seed{job.seed}"


def teacher_answer_nll(config: DemoConfig, teacher: Path, data: DemoData) -> dict:
    """Quantiles per slice of the teacher's NLL of the student data's answers (nats): the
    signal the data trust reads. Computed once per teacher and data, then cached."""
    path = cache_root() / f"demo-teacher-nll-{config.teacher_key()}-{config.data_key()}.json"
    if path.exists():
        return json.loads(path.read_text())
    from betakd.models import load_model, load_processor

    model = load_model(teacher, dtype="float32", frozen=True)
    (encoder, samples), records = encode_file(
        data.train_student, data.image_folder, load_processor(teacher), model
    )
    values = answer_nll(model, encoder, samples)
    result = {}
    for name in SLICES:
        rows = sorted(v for v, r in zip(values, records) if slice_of(r) == name)
        if rows:
            result[name] = {
                "n": len(rows),
                "mean": round(sum(rows) / len(rows), 4),
                **{f"q{q}": round(rows[int(q / 100 * (len(rows) - 1))], 4) for q in (10, 50, 90)},
            }
    path.write_text(json.dumps(result, indent=2))
    return result


def representation_of(strategy: Strategy) -> str:
    """The instance representation a strategy's weighting reads (the cache stores one)."""
    return (strategy.weighting or {}).get("representation", "teacher_visual")


def _quiet_workers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("betakd").setLevel(logging.WARNING)


def ensure_teacher_cache(
    config: DemoConfig,
    teacher: Path,
    student_init: Path,
    data: DemoData,
    settings,
    representation: str = "teacher_visual",
    teacher_key: str | None = None,
) -> Path:
    """The teacher's outputs on the student's training data, computed once and cached.

    Every KD run then reads the teacher from this cache (`teacher.source: cache`), which
    is what makes dozens of runs fit in minutes on a CPU. One cache per instance
    representation h(x); each holds logits and visual tokens too. ``teacher_key``: of a
    teacher other than ``config``'s (whose data ``data`` still is).
    """
    from betakd.cache_cli import cache_teacher

    limit = settings.train_limit or "all"
    suffix = "" if representation == "teacher_visual" else f"-{representation}"
    key = teacher_key or config.teacher_key()
    cache_dir = cache_root() / f"demo-teacher-cache-{key}-{config.data_key()}-{limit}{suffix}"
    writer = {
        "student": {"path": str(student_init)},
        "teacher": {"path": str(teacher), "cache_dir": str(cache_dir)},
        "data": {
            "train_file": str(data.train_student),
            "image_folder": str(data.image_folder),
            "limit": settings.train_limit,
        },
        "channels": {
            "logits": [{"energy": "cosine_probs"}],
            "features": [{"name": "visual", "energy": "mse"}],
        },
        "weighting": {"name": "instance", "representation": representation},
        "training": {"output_dir": str(cache_dir / "unused-output"), "use_cpu": True},
    }
    return cache_teacher(cfg.validate(writer), batch_size=64, progress=True)


# ----------------------------------------------------------------------------- the scenario


def prepare(context: Context) -> Prepared:
    """The teacher's scores, its offline caches (one per instance representation the
    strategies read), the audit of the data, and a job per strategy and seed."""
    config, settings, data, out = context.config, context.settings, context.data, context.out
    chosen, tests, inits = context.runs, context.tests, context.inits
    teacher = context.teachers["teacher"]
    teacher_accuracy = evaluate(teacher, tests, data.image_folder, settings.eval_batch_size)
    nll_by_slice = teacher_answer_nll(config, teacher, data)
    first = inits[settings.seeds[0]]
    caches = {
        kind: ensure_teacher_cache(config, teacher, first, data, settings, kind)
        for kind in sorted({representation_of(s) for s in chosen})
    }
    audit = audit_data(config, settings, first, teacher, data, out)
    jobs = [
        Job(s, seed, config, settings, inits[seed], teacher, data, caches[representation_of(s)],
            out, tests)
        for seed in settings.seeds
        for s in chosen
    ]  # fmt: skip
    entries = {
        "strategies": [asdict(s) for s in chosen],
        "channels": asdict(config.channels),
        "teacher": {
            "path": str(teacher),
            "accuracy": teacher_accuracy,
            "info": teacher_info(teacher),
            "seconds_this_run": round(context.teacher_seconds, 1),
            "answer_nll": nll_by_slice,
        },
    }
    return Prepared(jobs, entries, {"audit": audit})


def audit_data(config, settings, student, teacher, data, out: Path) -> dict | None:
    """`betakd audit` of the training data with the recommended strategy's config (the
    catalogue's, whichever strategies run); None when the catalogue recommends none."""
    strategy = recommended(list(catalogue(config).values()))
    if strategy is None:
        logger.info("no recommended strategy in the catalogue: the data is not audited")
        return None
    run_config = train_config(
        strategy, settings.seeds[0], config=config, student=student, teacher=teacher,
        data=data, out=out / "audit" / "run", settings=settings,
    )  # fmt: skip
    blind = config.data.blind_value
    planted = {"teacher": (config.data.blind_attribute, blind)} if blind else {}
    return audit_demo_data(run_config, out, planted)


DEFAULT_OUTPUT = "betakd-demo"


def default_scenario(strategies=None, *, diagnose: bool = False) -> Scenario:
    """The default scenario with the strategies named (None: ``defaults.yaml``'s ``run``
    list; "all": the catalogue), recording per-slice gradient norms when ``diagnose``."""
    return Scenario(
        name=None,
        output_dir=DEFAULT_OUTPUT,
        seeds=lambda config: config.student_training.seeds,
        runs=lambda config: select(config, strategies),
        prepare=prepare,
        run_job=run_job,
        job_name=job_name,
        write_report=report.write_report,
        settings={"diagnose": diagnose},
    )


def run_demo(
    output_dir: str | Path = DEFAULT_OUTPUT,
    *,
    quick: bool = False,
    seeds=None,
    strategies=None,
    overrides=(),
    jobs: int | None = None,
    diagnose: bool = False,
) -> dict:
    """Run the selected strategies for every seed, then write results.json, report.md
    and plots."""
    scenario = default_scenario(strategies, diagnose=diagnose)
    return run_scenario(
        scenario, output_dir, quick=quick, seeds=seeds, overrides=overrides, jobs=jobs
    )
