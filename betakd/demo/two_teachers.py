"""``betakd demo --scenario two-teachers``: one student, two teachers blind on different slices.

Teacher ``a`` is the default demo's teacher: it never saw images of ``data.blind_value``
(blue). Teacher ``b`` is trained the same way but never saw images of
``two_teachers.second_blind_value`` (green). Each is right where the other is blind, so
no constant weight per teacher can be right on both slices: a weight that lets ``a``
teach blue answers pulls the student towards ``a``'s mistakes there, and likewise for
``b`` on green. A per-sample weighting can trust each teacher where it is right.

Students learn from CE plus one logit channel per teacher they use (``a/<energy>``,
``b/<energy>``; no feature channel: the default demo found that a feature channel carries
a teacher's visual blind spot whatever its weight). Runs (``defaults.yaml``,
``two_teachers``): CE only; each teacher alone with the ``single`` strategy's weighting;
both teachers with equal fixed weights (``fixed_sweep``, in units of the initial loss
scales); both with the ``task`` and ``instance`` strategies' weightings (``instance``
sees both teachers' representations, ``representation_from``). Every run reads the
teachers from their offline caches (one per teacher, on the student's training data).

The report compares, plainly: the fixed and task students on each teacher's blind slice
against what the other teacher's student reaches there (the design check), then the
instance student against the best single-teacher student, the best fixed weight and, on
each blind slice, the other teacher's student, with how well its betas pick out each
teacher's blind slice.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from betakd import config as cfg
from betakd.demo import report
from betakd.demo.audit import audit_demo_data
from betakd.demo.config import DemoConfig
from betakd.demo.easyvqa_data import DemoData, read_jsonl
from betakd.demo.evaluation import (
    beta_history,
    percent_correct,
    predict,
    slice_history,
    training_betas,
)
from betakd.demo.run import (
    data_block,
    ensure_teacher_cache,
    prepare_worker,
    train_logged,
    training_block,
)
from betakd.demo.scenario import Context, DemoSettings, Prepared, Scenario
from betakd.demo.strategies import catalogue
from betakd.demo.teacher import teacher_info

TEACHERS = ("a", "b")
# Training-sample slices: each teacher's blind slice, then noisy labels, then the rest.
SLICES = ("blind_a", "blind_b", "noisy", "clean")
ACCURACY_KEYS = ("all", "blind_a", "blind_b", "rest")


@dataclass(frozen=True)
class ScenarioRun:
    """One student of the scenario: the teachers it learns from and its weighting."""

    name: str
    label: str
    family: str  # baseline | single | fixed | beta_kd
    teachers: tuple[str, ...] = ()
    weighting: Mapping[str, Any] | None = None  # betakd train's block; None: CE only


def scenario_runs(config: DemoConfig) -> list[ScenarioRun]:
    """The runs ``defaults.yaml``'s ``two_teachers`` section describes."""
    two = config.two_teachers
    strategies = catalogue(config)
    for key in ("single", "task", "instance"):
        name = getattr(two, key)
        if name not in strategies or strategies[name].weighting is None:
            raise ValueError(f"two_teachers.{key}: {name!r} is not a strategy with a weighting")
    logit = config.channels.logit_name
    single = strategies[two.single]
    runs = [ScenarioRun("ce_only", "CE only", "baseline")]
    runs += [
        ScenarioRun(f"{t}_only", f"teacher {t} alone ({single.label})", "single", (t,),
                    single.weighting)
        for t in TEACHERS
    ]  # fmt: skip
    for weight in two.fixed_sweep:
        runs.append(
            ScenarioRun(f"fixed_x{weight:g}", f"both, fixed x{weight:g}", "fixed", TEACHERS,
                        _equal_weights({"name": "fixed"}, weight, logit))
        )  # fmt: skip
    if two.ablation is not None:
        ablation = strategies.get(two.ablation)
        if ablation is None or ablation.kd_weight is None:
            raise ValueError(f"two_teachers.ablation: {two.ablation!r} is not a fixed strategy")
        runs.append(
            ScenarioRun(two.ablation, f"both, {ablation.label}", "ablation", TEACHERS,
                        _equal_weights(ablation.weighting, ablation.kd_weight, logit))
        )  # fmt: skip
    for key in ("task", "instance"):
        strategy = strategies[getattr(two, key)]
        weighting = dict(strategy.weighting)
        if weighting.get("name") == "instance":
            weighting["representation_from"] = list(two.representation_from)
        runs.append(ScenarioRun(key, f"both, {strategy.label}", "beta_kd", TEACHERS, weighting))
    return runs


def _equal_weights(weighting: Mapping[str, Any], weight: float, logit: str) -> dict:
    """A fixed weighting with ``weight`` for every teacher's logit channel, in units of
    the initial loss scales, its other options kept."""
    options = {**(weighting.get("options") or {}), "scale_relative": True}
    options["weights"] = {f"{t}/{logit}": weight for t in TEACHERS}
    return {**weighting, "options": options}


def slice_of(record: dict, blind: Mapping[str, str]) -> str:
    """A training sample's slice: a teacher's blind slice first, then noisy, then clean."""
    colour = record["meta"]["colour"]
    for teacher in TEACHERS:
        if colour == blind[teacher]:
            return f"blind_{teacher}"
    return "noisy" if record["meta"]["noisy"] else "clean"


def accuracy(predictions: dict[str, str], records: list[dict], blind: Mapping[str, str]) -> dict:
    """Exact match (%) overall, on each teacher's blind slice, and on the rest."""
    colour = {r["id"]: r["meta"]["colour"] for r in records}
    in_slice = {t: [r for r in records if colour[r["id"]] == blind[t]] for t in TEACHERS}
    rest = [r for r in records if colour[r["id"]] not in blind.values()]
    return {
        "all": percent_correct(predictions, records),
        **{f"blind_{t}": percent_correct(predictions, rows) for t, rows in in_slice.items()},
        "rest": percent_correct(predictions, rest),
    }


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class ScenarioJob:
    """Everything one run needs (picklable: runs go to worker processes)."""

    run: ScenarioRun
    seed: int
    config: DemoConfig
    settings: DemoSettings
    student_init: Path
    teachers: Mapping[str, Path]
    caches: Mapping[str, Path]  # teacher -> its offline cache on the student's data
    blind: Mapping[str, str]  # teacher -> the colour it never saw
    data: DemoData
    out: Path
    tests: list


@dataclass
class ScenarioRecord:
    run: str
    label: str
    family: str
    seed: int
    accuracy: dict
    train_seconds: float
    beta_history: dict = field(default_factory=dict)
    slice_history: dict = field(default_factory=dict)
    separation: dict = field(default_factory=dict)  # channel -> AUCs and slice means


def train_config(job: ScenarioJob, out: Path) -> cfg.TrainConfig:
    """The ``betakd train`` config of one run: its teachers, each from its cache."""
    run, channels = job.run, job.config.channels
    logit = {"energy": channels.logit_energy, "options": dict(channels.logit_options)}
    # CE only still names a teacher (the config needs one); it feeds no channel.
    names = run.teachers or TEACHERS[:1]
    teachers = [
        {
            "name": t,
            "path": str(job.teachers[t]),
            "source": "cache",
            "cache_dir": str(job.caches[t]),
            "channels": {"logits": [logit] if run.teachers else []},
        }
        for t in names
    ]
    weighting = {"name": "equal"}
    if run.weighting is not None:
        weighting = {"learning_rate": job.settings.weighting_learning_rate, **run.weighting}
    raw = {
        "student": {"path": str(job.student_init)},
        "teachers": teachers,
        "data": data_block(job.data, job.settings),
        "weighting": weighting,
        "training": training_block(job.settings, job.seed, out),
    }
    return cfg.validate(raw, source=f"two-teacher run {run.name} seed {job.seed}")


def run_job(job: ScenarioJob) -> ScenarioRecord:
    """Train one run with one seed, evaluate it, and summarise its betas per slice."""
    run_dir = job.out / "runs" / job_name(job)
    prepare_worker(run_dir)
    config = train_config(job, run_dir)
    records = read_jsonl(job.data.train_student)
    if job.settings.train_limit:
        records = records[: job.settings.train_limit]
    groups = {r["id"]: slice_of(r, job.blind) for r in records}
    result, seconds = train_logged(config, run_dir, groups)
    channels = config.channel_names()
    predictions = predict(run_dir, job.tests, job.data.image_folder, job.settings.eval_batch_size)
    record = ScenarioRecord(
        run=job.run.name,
        label=job.run.label,
        family=job.run.family,
        seed=job.seed,
        accuracy=accuracy(predictions, job.tests, job.blind),
        train_seconds=round(seconds, 1),
        beta_history=beta_history(result.log_history, channels),
        slice_history=slice_history(result.log_history, channels, SLICES),
    )
    if job.run.teachers:
        record.separation = separation(result.trainer, groups)
    return record


def separation(trainer, groups: Mapping[str, str]) -> dict:
    """Per teacher channel: mean final beta per slice and the ROC AUC with which a lower
    beta picks out each teacher's blind slice from every other sample."""
    channels, betas, ids = training_betas(trainer)
    slices = [groups[i] for i in ids]
    table = {}
    for k, channel in enumerate(channels):
        if channel == "ce":
            continue
        values = betas[:, k].tolist()
        by_slice = {s: [v for v, g in zip(values, slices) if g == s] for s in SLICES}
        table[channel] = {
            "mean": {s: statistics.fmean(v) for s, v in by_slice.items() if v},
            **{
                f"auc_blind_{t}_lower": report.roc_auc(
                    [v for v, g in zip(values, slices) if g != f"blind_{t}"],
                    by_slice[f"blind_{t}"],
                )
                for t in TEACHERS
            },
        }
    return table


# ----------------------------------------------------------------------------- the scenario


def second_teacher_config(config: DemoConfig) -> DemoConfig:
    """The design of teacher b: the demo's, blind on the second value."""
    blind = config.two_teachers.second_blind_value
    if blind == config.data.blind_value:
        raise ValueError(
            f"two_teachers.second_blind_value must differ from data.blind_value ({blind!r})"
        )
    return replace(config, data=replace(config.data, blind_value=blind))


def teacher_designs(config: DemoConfig) -> dict[str, DemoConfig]:
    """Teacher name -> its design: a is the demo's teacher, b is blind elsewhere."""
    return {"a": config, "b": second_teacher_config(config)}


def prepare(context: Context) -> Prepared:
    """The teachers' scores per slice, each teacher's offline cache on the student's
    data, the two-teacher audit of that data, and a job per run and seed."""
    config, settings, data, out = context.config, context.settings, context.data, context.out
    runs, teachers, tests, inits = context.runs, context.teachers, context.tests, context.inits
    blind = {t: context.designs[t].data.blind_value for t in TEACHERS}
    teacher_accuracy = {
        t: accuracy(predict(path, tests, data.image_folder, settings.eval_batch_size), tests, blind)
        for t, path in teachers.items()
    }
    kind = _representation(runs)
    caches = {
        t: ensure_teacher_cache(
            config, teachers[t], inits[settings.seeds[0]], data, settings, kind,
            teacher_key=context.designs[t].teacher_key(),
        )
        for t in TEACHERS
    }  # fmt: skip
    audit = _audit(runs, config, settings, inits, teachers, caches, blind, data, out)
    jobs = [
        ScenarioJob(run, seed, config, settings, inits[seed], teachers, caches, blind, data,
                    out, tests)
        for seed in settings.seeds
        for run in runs
    ]  # fmt: skip
    entries = {
        "design": asdict(config.two_teachers),
        "blind": blind,
        "runs_catalogue": [asdict(r) for r in runs],
        "teachers": {
            t: {"path": str(p), "accuracy": teacher_accuracy[t], "info": teacher_info(p)}
            for t, p in teachers.items()
        },
    }
    return Prepared(jobs, entries, {"audit": audit})


def _audit(runs, config, settings, inits, teachers, caches, blind, data, out: Path) -> dict:
    """`betakd audit` of the student's data with the instance run's two-teacher config."""
    seed = settings.seeds[0]
    instance = next(r for r in runs if r.name == "instance")
    job = ScenarioJob(instance, seed, config, settings, inits[seed], teachers, caches, blind,
                      data, out, [])  # fmt: skip
    planted = {t: (config.data.blind_attribute, blind[t]) for t in TEACHERS if blind[t]}
    return audit_demo_data(train_config(job, out / "audit" / "run"), out, planted)


def job_name(job: ScenarioJob) -> str:
    return f"{job.run.name}-seed{job.seed}"


def _representation(runs: list[ScenarioRun]) -> str:
    """The instance representation the runs read (each teacher's cache stores one)."""
    kinds = {
        (r.weighting or {}).get("representation", "teacher_visual")
        for r in runs
        if (r.weighting or {}).get("name") == "instance"
    }
    if len(kinds) > 1:
        raise ValueError(f"the two-teacher runs ask for several representations: {sorted(kinds)}")
    return kinds.pop() if kinds else "teacher_visual"


# ----------------------------------------------------------------------------- the report


def summaries(results: dict) -> dict[str, dict[str, dict]]:
    """Per accuracy key: mean, std, worst and best seed per run."""
    return report.scenario_summaries(results, ACCURACY_KEYS)


# The other teacher: its student alone shows what a student can reach on a teacher's
# blind slice (run ``<other>_only``).
OTHER = {"a": "b", "b": "a"}


def design_check(results: dict, stats: dict) -> list[str]:
    """Each constant weight per teacher (the fixed weights and the task-level betas) on
    each teacher's blind slice, against the other teacher's single-teacher student
    there."""
    lines = []
    for run in results["runs_catalogue"]:
        if run["family"] not in ("fixed", "beta_kd") or run["name"] == "instance":
            continue
        parts = []
        for t in TEACHERS:
            mine = stats[f"blind_{t}"].get(run["name"])
            other = stats[f"blind_{t}"].get(f"{OTHER[t]}_only")
            if mine and other:
                parts.append(
                    f"blind slice of {t} ({results['blind'][t]}) vs teacher {OTHER[t]} "
                    f"alone: {report.versus(mine, other)}"
                )
        if parts:
            lines.append(f"- {run['label']}: " + "; ".join(parts) + ".")
    return lines


def instance_comparisons(results: dict, stats: dict) -> list[str]:
    """The instance student against the best single-teacher student and the best fixed
    weight (whole test set), against the other teacher's student on each teacher's
    blind slice, and how well its betas of each teacher pick out that teacher's blind
    slice (ROC AUC per seed)."""
    mine = stats["all"].get("instance")
    if mine is None:
        return []
    catalogue = results["runs_catalogue"]
    labels = {r["name"]: r["label"] for r in catalogue}
    lines = []
    for family, what in (("single", "the best single-teacher student"), ("fixed", "the best fixed weight")):  # fmt: skip
        best = report.best_of([r["name"] for r in catalogue if r["family"] == family], stats["all"])
        if best is not None:
            lines.append(
                f"- vs {what} ({labels[best]}), whole test set: "
                f"{report.versus(mine, stats['all'][best])}."
            )
    for t in TEACHERS:
        ours = stats[f"blind_{t}"].get("instance")
        theirs = stats[f"blind_{t}"].get(f"{OTHER[t]}_only")
        if ours and theirs:
            lines.append(
                f"- On the blind slice of {t} ({results['blind'][t]}), vs teacher {OTHER[t]} "
                f"alone: {report.versus(ours, theirs)}."
            )
    for t in TEACHERS:
        aucs = [
            r["separation"][channel][f"auc_blind_{t}_lower"]
            for r in results["runs"]
            if r["run"] == "instance"
            for channel in r["separation"]
            if channel.startswith(f"{t}/")
        ]
        aucs = [a for a in aucs if a is not None]
        if aucs:
            lines.append(
                f"- Its betas of teacher {t} against {t}'s blind slice: ROC AUC of 'lower "
                "beta' per seed " + ", ".join(f"{a:.3f}" for a in aucs) + " (0.5: no "
                "separation, 1.0: perfect)."
            )
    return lines


def accuracy_table(results: dict, stats: dict) -> str:
    blind = results["blind"]
    columns = ["all", f"blind slice of a ({blind['a']})", f"blind slice of b ({blind['b']})"]
    teachers = {f"teacher {t}": teacher["accuracy"] for t, teacher in results["teachers"].items()}
    return report.runs_table(
        results, stats, ACCURACY_KEYS, [*columns, "rest", "worst seed (all)"], teachers
    )


def betas_table(results: dict) -> str:
    """Final betas per slice (mean over seeds) and the blind-slice AUCs, per channel."""
    rows = [
        "| student | channel | blind a | blind b | noisy | clean | AUC blind a | AUC blind b |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {r["name"]: r["label"] for r in results["runs_catalogue"]}
    tables: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        for channel, table in run["separation"].items():
            tables.setdefault((run["run"], channel), []).append(table)
    for (name, channel), group in tables.items():
        cells = [report.mean_of([t["mean"].get(s) for t in group]) for s in SLICES]
        cells += [report.mean_of([t[f"auc_blind_{x}_lower"] for t in group]) for x in TEACHERS]
        rows.append(f"| {labels[name]} | {channel} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_accuracy(results: dict, stats: dict, path: Path) -> None:
    report.plot_scenario_accuracy(
        results, stats, ACCURACY_KEYS, path, title="two teachers", tick="label"
    )


def write_report(results: dict, out: Path) -> Path:
    stats = summaries(results)
    lines = [
        "# betakd demo: two teachers",
        "",
        f"Teacher a never saw {results['blind']['a']} images, teacher b never saw "
        f"{results['blind']['b']} ones. {len(results['settings']['seeds'])} seeds, "
        f"{results['settings']['steps']} steps, {results['settings']['test_questions']} test "
        f"questions; {results['wall_seconds']:.0f} s on {results['machine']}.",
        "",
        *report.quick_note(results, "40-step teachers, a few student steps; "),
        *report.failed_runs(results),
        "## Accuracy (test exact match %, mean ± std over seeds)",
        "",
        accuracy_table(results, stats),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Design check: a constant weight per teacher on each teacher's blind slice",
        "",
        "Each student with a constant weight per teacher (fixed weights, the task-level "
        "betas) on each teacher's blind slice, against the other teacher's single-teacher "
        "student there (the accuracy a student can reach on that slice). A constant weight "
        "that lets a teacher teach its blind slice pulls the student towards its mistakes "
        "there.",
        "",
        *design_check(results, stats),
        "",
        "## The instance student",
        "",
        *instance_comparisons(results, stats),
        "",
        *report.audit_lines(results.get("audit")),
        "",
        "## Betas per slice at the end of training (mean over seeds)",
        "",
        betas_table(results),
        "",
    ]
    plot_accuracy(results, stats, out / "accuracy.png")
    return report.save_report(out, lines)


# ----------------------------------------------------------------------------- the scenario

SCENARIO = Scenario(  # name, output folder, seeds, runs, prepare, run, job name, report
    "two-teachers", "betakd-demo-two-teachers", lambda config: config.two_teachers.seeds,
    scenario_runs, prepare, run_job, job_name, write_report,
    teachers=teacher_designs,
)  # fmt: skip
