"""``betakd demo --scenario cross-tokenizer``: how much of a teacher's gain survives a
teacher with another tokenizer?

The on-policy scenario's sentence answers ("large blue shape on the right"; clean, no
blind slice). Teacher a is trained with the student's tokenizer; teacher b is the same
teacher (same data, size, training) with another tokenizer, trained here with fewer
merges (``cross_tokenizer.teacher_vocab_size``), so it spells the answers' words in other
pieces. Students learn with the recommended weighting from teacher a (the reference),
from teacher b aligned by text (``teacher.cross_tokenizer``) with each loss (prefix,
GOLD's hybrid, plain ULD), and from CE only; the report gives the share of teacher a's gain over CE
that teacher b keeps, per seed.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from pathlib import Path

from betakd.demo import report
from betakd.demo.config import DemoConfig
from betakd.demo.evaluation import predict
from betakd.demo.on_policy import (
    ACCURACY_KEYS,
    SENTENCE_COLUMNS,
    PolicyRun,
    accuracy,
    job_name,
    policy_jobs,
    run_job,
)
from betakd.demo.scenario import Context, Prepared, Scenario
from betakd.demo.strategies import catalogue
from betakd.demo.teacher import teacher_info

REFERENCE = "same_tokenizer"


def scenario_config(config: DemoConfig) -> DemoConfig:
    """The demo's design with sentence answers, clean labels and no blind slice."""
    data = replace(
        config.data,
        answer_format="sentence",
        noise_rate=0.0,
        teacher_noisy=False,
        blind_value=None,
    )
    return replace(config, data=data)


def other_tokenizer_config(config: DemoConfig) -> DemoConfig:
    """Teacher b's design: teacher a's, with the other tokenizer."""
    return replace(config, vocab_size=config.cross_tokenizer.teacher_vocab_size)


def scenario_runs(config: DemoConfig) -> list[PolicyRun]:
    settings = config.cross_tokenizer
    strategies = catalogue(config)
    strategy = strategies.get(settings.strategy)
    if strategy is None or not strategy.uses_teacher:
        raise ValueError(f"cross_tokenizer.strategy: {settings.strategy!r} is not a KD strategy")
    runs = [
        PolicyRun("ce_only", "CE only", strategies["ce_only"], "off_policy", teacher="a"),
        PolicyRun(
            REFERENCE,
            f"teacher a (same tokenizer), {strategy.label}",
            strategy,
            "off_policy",
            teacher="a",
        ),
    ]
    for loss in settings.losses:
        runs.append(
            PolicyRun(
                f"cross_{loss}",
                f"teacher b (another tokenizer, {loss}), {strategy.label}",
                strategy,
                "off_policy",
                teacher="b",
                cross_tokenizer={"loss": loss},
            )
        )
    return runs


def teacher_designs(config: DemoConfig) -> dict[str, DemoConfig]:
    """Teacher name -> its design: a has the student's tokenizer, b another one."""
    return {"a": config, "b": other_tokenizer_config(config)}


def prepare(context: Context) -> Prepared:
    """The teachers' scores on the test questions and a job per run and seed."""
    config, settings, data, tests = context.config, context.settings, context.data, context.tests
    teachers = dict(context.teachers)
    max_new = config.on_policy.max_new_tokens
    teacher_accuracy = {
        name: accuracy(
            predict(
                path, tests, data.image_folder, settings.eval_batch_size, max_new_tokens=max_new
            ),
            tests,
        )
        for name, path in teachers.items()
    }
    jobs = policy_jobs(context)
    entries = {
        "design": asdict(config.cross_tokenizer),
        "runs_catalogue": [
            {"name": r.name, "label": r.label, "teacher": r.teacher, "strategy": r.strategy.name}
            for r in context.runs
        ],
        "teachers": {
            name: {
                "path": str(path),
                "vocab_size": context.designs[name].vocab_size,
                "accuracy": teacher_accuracy[name],
                "info": teacher_info(path),
            }
            for name, path in teachers.items()
        },
    }
    return Prepared(jobs, entries)


# ----------------------------------------------------------------------------- the report


def kept_gain(results: dict, run: str, key: str = "all") -> dict | None:
    """The share of the reference student's gain over CE only that ``run`` keeps, per
    seed ((run - CE) / (reference - CE), on accuracy ``key``), with its mean and worst."""
    by = {
        name: {r["seed"]: r["accuracy"][key] for r in results["runs"] if r["run"] == name}
        for name in ("ce_only", REFERENCE, run)
    }
    seeds = sorted(set(by["ce_only"]) & set(by[REFERENCE]) & set(by[run]))
    shares = []
    for seed in seeds:
        gain = by[REFERENCE][seed] - by["ce_only"][seed]
        if gain > 0:
            shares.append((by[run][seed] - by["ce_only"][seed]) / gain)
    if not shares:
        return None
    return {
        "per_seed": [round(s, 3) for s in shares],
        "mean": round(statistics.fmean(shares), 3),
        "worst": round(min(shares), 3),
    }


def accuracy_table(results: dict, stats: dict) -> str:
    columns = [*SENTENCE_COLUMNS, "worst seed (sentence)", "train s / run"]
    teachers = {
        f"teacher {name} (vocabulary {teacher['vocab_size']})": teacher["accuracy"]
        for name, teacher in results["teachers"].items()
    }
    return report.runs_table(results, stats, ACCURACY_KEYS, columns, teachers, seconds=True)


def gain_lines(results: dict) -> list[str]:
    lines = []
    for run in results["runs_catalogue"]:
        if run["teacher"] != "b":
            continue
        for key in ("all", "colour"):
            kept = kept_gain(results, run["name"], key)
            if kept is None:
                lines.append(f"- {run['label']}, {key}: teacher a's student gained nothing over CE")
                continue
            per_seed = " / ".join(f"{s:.0%}" for s in kept["per_seed"])
            lines.append(
                f"- {run['label']}, {'sentence' if key == 'all' else key}: keeps "
                f"{kept['mean']:.0%} of teacher a's gain over CE only (per seed {per_seed}; "
                f"worst {kept['worst']:.0%})"
            )
    return lines


def write_report(results: dict, out: Path) -> Path:
    stats = report.scenario_summaries(results, ACCURACY_KEYS)
    settings, design = results["settings"], results["design"]
    lines = [
        "# betakd demo: a teacher with another tokenizer",
        "",
        "Answers are sentences read from the pixels (for example 'large blue shape on the "
        "right'). Teacher a has the student's tokenizer; teacher b is the same teacher with "
        f"another one ({design['teacher_vocab_size']} tokens), aligned by text "
        "(`teacher.cross_tokenizer`). "
        f"{len(settings['seeds'])} seeds, {settings['steps']} steps of batch "
        f"{settings['batch_size']}, {settings['test_questions']} test questions answered "
        f"greedily. {results['wall_seconds']:.0f} s on {results['machine']}.",
        "",
        *report.quick_note(results),
        *report.failed_runs(results),
        "## Accuracy (test exact match %, mean ± std over seeds)",
        "",
        accuracy_table(results, stats),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## What teacher b keeps of teacher a's gain",
        "",
        *gain_lines(results),
        "",
    ]
    report.plot_scenario_accuracy(
        results,
        stats,
        ACCURACY_KEYS,
        out / "accuracy.png",
        title="cross-tokenizer demo",
        tick="name",
    )
    return report.save_report(out, lines)


# ----------------------------------------------------------------------------- the scenario

SCENARIO = Scenario(  # name, output folder, seeds, runs, prepare, run, job name, report
    "cross-tokenizer", "betakd-demo-cross-tokenizer", lambda config: config.cross_tokenizer.seeds,
    scenario_runs, prepare, run_job, job_name, write_report,
    configure=scenario_config, teachers=teacher_designs,
)  # fmt: skip
