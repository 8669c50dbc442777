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

The report checks the design first (do the fixed and task students lose accuracy on a
teacher's blind slice, against what the other teacher's student reaches there?) and
then the targets of issue 11 for the instance student.
"""

from __future__ import annotations

import json
import statistics
import time
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
    test_samples,
    training_betas,
)
from betakd.demo.run import (
    DemoSettings,
    data_block,
    demo_config,
    ensure_teacher_cache,
    one_thread,
    prepare_worker,
    raise_for_failures,
    run_in_pool,
    scenario_settings,
    student_init,
    train_logged,
    training_block,
)
from betakd.demo.strategies import catalogue
from betakd.demo.teacher import ensure_teacher, prepare_data, teacher_info

TEACHERS = ("a", "b")
# Training-sample slices: each teacher's blind slice, then noisy labels, then the rest.
SLICES = ("blind_a", "blind_b", "noisy", "clean")
ACCURACY_KEYS = ("all", "blind_a", "blind_b", "rest")
# Issue 11's targets for the instance student.
WITHIN_POINTS = 5.0
MIN_AUC = 0.9


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


def run_two_teachers(
    output_dir: str | Path = "betakd-demo-two-teachers",
    *,
    quick: bool = False,
    seeds=None,
    overrides=(),
    jobs: int | None = None,
) -> dict:
    """Run the scenario for every seed; write results.json, report.md and a plot."""
    with one_thread():
        started = time.time()
        config = demo_config(quick, overrides)
        settings = scenario_settings(
            config, config.two_teachers.seeds, quick=quick, seeds=seeds, jobs=jobs
        )
        runs = scenario_runs(config)
        designs = {"a": config, "b": second_teacher_config(config)}
        blind = {t: designs[t].data.blind_value for t in TEACHERS}
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)

        data = prepare_data(config)  # the student's data: the same for both teachers
        teachers = {t: ensure_teacher(designs[t], progress=True) for t in TEACHERS}
        tests = test_samples(data.test, settings.test_questions)
        teacher_accuracy = {
            t: accuracy(
                predict(path, tests, data.image_folder, settings.eval_batch_size), tests, blind
            )
            for t, path in teachers.items()
        }
        inits = {seed: student_init(config, out, seed) for seed in settings.seeds}
        kind = _representation(runs)
        caches = {
            t: ensure_teacher_cache(
                config, teachers[t], inits[settings.seeds[0]], data, settings, kind,
                teacher_key=designs[t].teacher_key(),
            )
            for t in TEACHERS
        }  # fmt: skip
        audit = _audit(runs, config, settings, inits, teachers, caches, blind, data, out)
        job_list = [
            ScenarioJob(run, seed, config, settings, inits[seed], teachers, caches, blind, data,
                        out, tests)
            for seed in settings.seeds
            for run in runs
        ]  # fmt: skip
        records, failures = run_in_pool(run_job, job_list, settings.jobs, job_name, out)
        results = {
            "scenario": "two-teachers",
            "settings": asdict(settings),
            "quick": quick,
            "overrides": list(overrides),
            "design": asdict(config.two_teachers),
            "blind": blind,
            "runs_catalogue": [asdict(r) for r in runs],
            "teachers": {
                t: {"path": str(p), "accuracy": teacher_accuracy[t], "info": teacher_info(p)}
                for t, p in teachers.items()
            },
            "data": data.manifest,
            "audit": audit,
            "runs": [asdict(r) for r in records],
            "failed": [asdict(f) for f in failures],
            "wall_seconds": round(time.time() - started, 1),
            "machine": report.machine_description(),
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_report(results, out)
        raise_for_failures(failures, len(job_list), out)
        return results


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


def design_check(results: dict, stats: dict) -> list[str]:
    """Do the fixed and task students lose a blind slice? A student "loses" teacher t's
    blind slice when it is more than WITHIN_POINTS below what the other teacher's
    student alone reaches there (the accuracy a student can have on that slice)."""
    lines = []
    reference = {"a": "b_only", "b": "a_only"}
    for run in results["runs_catalogue"]:
        if run["family"] not in ("fixed", "beta_kd") or run["name"] == "instance":
            continue
        losses = []
        for t in TEACHERS:
            mine = stats[f"blind_{t}"].get(run["name"])
            other = stats[f"blind_{t}"].get(reference[t])
            if mine and other and mine["mean"] < other["mean"] - WITHIN_POINTS:
                losses.append(
                    f"blind slice of {t} ({results['blind'][t]}): {mine['mean']:.1f} vs "
                    f"{other['mean']:.1f} for {reference[t]}"
                )
        verdict = "loses " + "; ".join(losses) if losses else "**loses no blind slice**"
        lines.append(f"- {run['label']}: {verdict}")
    return lines


def targets(results: dict, stats: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 11's targets for the instance student: (name, met, the numbers)."""
    rows: list[tuple[str, bool | None, str]] = []
    mine = stats["all"].get("instance")
    if mine is None:
        return rows
    for family, what in (("single", "best single-teacher student"), ("fixed", "best fixed")):
        names = [r["name"] for r in results["runs_catalogue"] if r["family"] == family]
        best = max((n for n in names if n in stats["all"]), key=lambda n: stats["all"][n]["mean"])
        theirs = stats["all"][best]["mean"]
        rows.append(
            (f"instance >= {what} overall", mine["mean"] >= theirs,
             f"{mine['mean']:.1f} vs {theirs:.1f} ({best})")
        )  # fmt: skip
    for t, other in (("a", "b_only"), ("b", "a_only")):
        ours = stats[f"blind_{t}"].get("instance")
        theirs = stats[f"blind_{t}"].get(other)
        if ours and theirs:
            rows.append(
                (f"instance within {WITHIN_POINTS:g} points of {other} on {t}'s blind slice",
                 ours["mean"] >= theirs["mean"] - WITHIN_POINTS,
                 f"{ours['mean']:.1f} vs {theirs['mean']:.1f}")
            )  # fmt: skip
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
            rows.append(
                (f"instance betas of {t} pick out {t}'s blind slice (AUC >= {MIN_AUC:g})",
                 min(aucs) >= MIN_AUC,
                 "per seed " + ", ".join(f"{a:.3f}" for a in aucs))
            )  # fmt: skip
    return rows


def accuracy_table(results: dict, stats: dict) -> str:
    rows = [
        "| student | all | blind slice of a ({a}) | blind slice of b ({b}) | rest | worst seed "
        "(all) |".format(**results["blind"]),
        "|---|---|---|---|---|---|",
    ]
    for t, teacher in results["teachers"].items():
        acc = teacher["accuracy"]
        rows.append(
            f"| teacher {t} | " + " | ".join(f"{acc[k]:.1f}" for k in ACCURACY_KEYS) + " | - |"
        )
    for run in results["runs_catalogue"]:
        if run["name"] not in stats["all"]:
            continue
        cells = [report.cell(stats[k].get(run["name"])) for k in ACCURACY_KEYS]
        rows.append(
            f"| {run['label']} | "
            + " | ".join(cells)
            + f" | {stats['all'][run['name']]['min']:.1f} |"
        )
    return "\n".join(rows)


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

    def mean_of(values) -> str:
        values = [v for v in values if v is not None]
        return f"{statistics.fmean(values):.3g}" if values else "-"

    for (name, channel), group in tables.items():
        cells = [mean_of([t["mean"].get(s) for t in group]) for s in SLICES]
        cells += [mean_of([t[f"auc_blind_{x}_lower"] for t in group]) for x in TEACHERS]
        rows.append(f"| {labels[name]} | {channel} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_accuracy(results: dict, stats: dict, path: Path) -> None:
    report.plot_scenario_accuracy(
        results, stats, ACCURACY_KEYS, path, title="two teachers", tick="label"
    )


def write_report(results: dict, out: Path) -> Path:
    stats = summaries(results)
    met = targets(results, stats)
    lines = [
        "# betakd demo: two teachers",
        "",
        f"Teacher a never saw {results['blind']['a']} images, teacher b never saw "
        f"{results['blind']['b']} ones. {len(results['settings']['seeds'])} seeds, "
        f"{results['settings']['steps']} steps, {results['settings']['test_questions']} test "
        f"questions; {results['wall_seconds']:.0f} s on {results['machine']}.",
        "",
        *(
            [
                "**Quick smoke run**: 40-step teachers, a few student steps; the numbers mean "
                "nothing.",
                "",
            ]
            if results["quick"]
            else []
        ),
        *report.failed_runs(results),
        "## Accuracy (test exact match %, mean ± std over seeds)",
        "",
        accuracy_table(results, stats),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Design check: does a constant weight per teacher lose a blind slice?",
        "",
        f"A student loses teacher t's blind slice when it is more than {WITHIN_POINTS:g} "
        "points below the other teacher's single-teacher student there (the accuracy a "
        "student can reach on that slice). If the fixed weights and the task-level betas "
        "all lose one, no constant weight per teacher is right on both slices.",
        "",
        *design_check(results, stats),
        "",
        "## Targets (instance student)",
        "",
        *[f"- {'met' if ok else '**not met**'}: {name} ({numbers})" for name, ok, numbers in met],
        "",
        *report.audit_lines(results.get("audit")),
        "",
        "## Betas per slice at the end of training (mean over seeds)",
        "",
        betas_table(results),
        "",
    ]
    plot_accuracy(results, stats, out / "accuracy.png")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
