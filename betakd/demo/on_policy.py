"""``betakd demo --scenario on-policy``: does the student learning on its own answers help?

Every answer is a short sentence read from the image's pixels, "<size> <colour> shape on
the <side>" (``data.answer_format: sentence``; about 18 tokens with the demo tokenizer,
which spells the size and side words in pieces): a student that starts an answer wrong
continues from a prefix off-policy training never showed it (exposure bias). A teacher is
trained on these answers; each student then learns with the recommended weighting
(``defaults.yaml``, ``on_policy.strategy``) off-policy (the data's answers), on-policy (its
own answers, sampled at ``temperature``, scored by the teacher) and mixed (a
``student_fraction`` of the batches its own), plus a CE-only student. The CE channel of
a student-answered sample is CE on the data's answer to the same prompt (``ce``).

Students answer the test questions greedily; the report gives the exact match of the
whole sentence and of each content word (size, colour, side), the share of answers of
the right form, each over seeds (mean, spread, worst seed), and what training cost.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from betakd.demo import report
from betakd.demo.config import DemoConfig
from betakd.demo.easyvqa_data import DemoData
from betakd.demo.evaluation import predict
from betakd.demo.run import prepare_worker, train_config, train_logged
from betakd.demo.scenario import Context, DemoSettings, Prepared, Scenario
from betakd.demo.strategies import Strategy, catalogue
from betakd.demo.teacher import teacher_info
from betakd.eval.normalize import normalize_answer

ACCURACY_KEYS = ("all", "size", "colour", "side", "well_formed")
# What a well-formed answer looks like once normalised (VQA normalisation drops "the"),
# and where its content words are.
SENTENCE = re.compile(r"^(?P<size>\w+) (?P<colour>\w+) shape on (?P<side>\w+)$")
WORDS = ("size", "colour", "side")


@dataclass(frozen=True)
class PolicyRun:
    """One student of a sentence-answer scenario: its weighting (a strategy), policy
    mode and teacher (the cross-tokenizer scenario's teachers differ in tokenizer)."""

    name: str
    label: str
    strategy: Strategy
    mode: str  # off_policy | on_policy | mixed
    start_step: int = 0  # off-policy steps before the student answers any
    teacher: str = "teacher"  # which of the job's teachers
    cross_tokenizer: dict | None = None  # its teacher.cross_tokenizer block, if any


def scenario_config(config: DemoConfig) -> DemoConfig:
    """The demo's design with sentence answers, no noisy labels, and the scenario's
    blind slice (none by default)."""
    data = replace(
        config.data,
        answer_format="sentence",
        noise_rate=0.0,
        teacher_noisy=False,
        blind_value=config.on_policy.blind_value,
    )
    return replace(config, data=data)


def scenario_runs(config: DemoConfig) -> list[PolicyRun]:
    settings = config.on_policy
    strategies = catalogue(config)
    strategy = strategies.get(settings.strategy)
    if strategy is None or not strategy.uses_teacher:
        raise ValueError(f"on_policy.strategy: {settings.strategy!r} is not a KD strategy")
    runs = [PolicyRun("ce_only", "CE only", strategies["ce_only"], "off_policy")]
    for mode in settings.modes:
        label = f"{strategy.label}, {mode.replace('_', '-')}"
        if mode == "mixed":
            label += f" (lambda {settings.student_fraction:g} per {settings.per})"
        runs.append(PolicyRun(mode, label, strategy, mode))
    warm = settings.warm_start_step
    if warm is not None:
        label = f"{strategy.label}, on-policy after {warm} off-policy steps"
        runs.append(PolicyRun("on_policy_warm", label, strategy, "on_policy", warm))
    return runs


def policy_block(config: DemoConfig, run: PolicyRun) -> dict:
    """The ``policy`` block of ``betakd train`` for a run."""
    settings, mode = config.on_policy, run.mode
    block = {
        "mode": mode,
        "ce": settings.ce,
        "start_step": run.start_step,
        "generation": {
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
        },
    }
    if mode == "mixed":
        block.update(student_fraction=settings.student_fraction, per=settings.per)
    return block


def accuracy(predictions: dict[str, str], records: list[dict]) -> dict[str, float]:
    """Exact match (%) of the whole sentence, of each content word, and the share of
    answers of the right form."""
    hits = {key: 0 for key in ACCURACY_KEYS}
    for record in records:
        predicted = normalize_answer(predictions[record["id"]])
        expected = normalize_answer(record["conversations"][1]["value"])
        hits["all"] += predicted == expected
        match = SENTENCE.match(predicted)
        if match is None:
            continue
        hits["well_formed"] += 1
        for word in WORDS:
            hits[word] += match[word] == record["meta"][word]
    return {key: round(100.0 * n / max(len(records), 1), 2) for key, n in hits.items()}


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class PolicyJob:
    """Everything one run needs (picklable: runs go to worker processes)."""

    run: PolicyRun
    seed: int
    config: DemoConfig
    settings: DemoSettings
    student_init: Path
    teachers: dict[str, Path]
    data: DemoData
    out: Path
    tests: list


@dataclass
class PolicyRecord:
    run: str
    label: str
    mode: str
    seed: int
    accuracy: dict
    train_seconds: float
    on_policy_share: float | None = None  # share of training samples the student answered
    mean_generated_tokens: float | None = None  # of its answers in training
    ended_share: float | None = None  # of its answers that reached the end of turn
    final_loss: dict = field(default_factory=dict)


def run_job(job: PolicyJob) -> PolicyRecord:
    """Train one student with one seed and evaluate it."""
    run_dir = job.out / "runs" / job_name(job)
    prepare_worker(run_dir)
    policy = policy_block(job.config, job.run) if job.run.strategy.uses_teacher else None
    config = train_config(
        job.run.strategy,
        job.seed,
        config=job.config,
        student=job.student_init,
        teacher=job.teachers[job.run.teacher],
        data=job.data,
        out=run_dir,
        settings=job.settings,
        policy=policy,
        cross_tokenizer=job.run.cross_tokenizer,
    )
    result, seconds = train_logged(config, run_dir, {})
    history = [h for h in result.log_history if "loss" in h]
    predictions = predict(
        run_dir,
        job.tests,
        job.data.image_folder,
        job.settings.eval_batch_size,
        max_new_tokens=job.config.on_policy.max_new_tokens,
    )
    return PolicyRecord(
        run=job.run.name,
        label=job.run.label,
        mode=job.run.mode,
        seed=job.seed,
        accuracy=accuracy(predictions, job.tests),
        train_seconds=round(seconds, 1),
        on_policy_share=_mean_of(history, "on_policy/share"),
        mean_generated_tokens=_mean_of(history, "on_policy/mean_generated_tokens"),
        ended_share=_mean_of(history, "on_policy/ended_share"),
        final_loss={k: v for k, v in history[-1].items() if k.endswith("/energy")}
        if history
        else {},
    )


def _mean_of(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return round(statistics.fmean(values), 4) if values else None


def job_name(job: PolicyJob) -> str:
    return f"{job.run.name}-seed{job.seed}"


# ----------------------------------------------------------------------------- the scenario


def policy_jobs(context: Context) -> list[PolicyJob]:
    """A job per seed and run (seeds outer), with every teacher of the scenario."""
    return [
        PolicyJob(run, seed, context.config, context.settings, context.inits[seed],
                  dict(context.teachers), context.data, context.out, context.tests)
        for seed in context.settings.seeds
        for run in context.runs
    ]  # fmt: skip


def prepare(context: Context) -> Prepared:
    """The teacher's answers to the test questions (scored, and a few as examples) and a
    job per run and seed."""
    config, settings, data, tests = context.config, context.settings, context.data, context.tests
    teacher = context.teachers["teacher"]
    teacher_predictions = predict(
        teacher, tests, data.image_folder, settings.eval_batch_size,
        max_new_tokens=config.on_policy.max_new_tokens,
    )  # fmt: skip
    jobs = policy_jobs(context)
    entries = {
        "design": asdict(config.on_policy),
        "runs_catalogue": [
            {
                "name": r.name,
                "label": r.label,
                "mode": r.mode,
                "strategy": r.strategy.name,
                "start_step": r.start_step,
            }
            for r in context.runs
        ],
        "teacher": {
            "path": str(teacher),
            "accuracy": accuracy(teacher_predictions, tests),
            "info": teacher_info(teacher),
        },
    }
    return Prepared(jobs, entries, {"examples": _examples(tests, teacher_predictions)})


def _examples(tests: list[dict], predictions: dict[str, str], n: int = 3) -> list[dict]:
    return [
        {
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": r["conversations"][1]["value"],
            "teacher": predictions[r["id"]],
        }
        for r in tests[:n]
    ]


# ----------------------------------------------------------------------------- the report


def summaries(results: dict) -> dict[str, dict[str, dict]]:
    """Per accuracy key: mean, std, worst and best seed per run."""
    return report.scenario_summaries(results, ACCURACY_KEYS)


SENTENCE_COLUMNS = ("sentence", "size", "colour", "side", "well formed")


def accuracy_table(results: dict, stats: dict) -> str:
    columns = [*SENTENCE_COLUMNS, "worst seed (sentence)", "train s / run"]
    teachers = {"teacher": results["teacher"]["accuracy"]}
    return report.runs_table(results, stats, ACCURACY_KEYS, columns, teachers, seconds=True)


def training_table(results: dict) -> str:
    rows = [
        "| student | share of samples answered by the student | mean answer length "
        "(tokens) | answers that reached the end of turn |",
        "|---|---|---|---|",
    ]
    for run in results["runs_catalogue"]:
        mine = [r for r in results["runs"] if r["run"] == run["name"]]
        if not mine or mine[0]["on_policy_share"] is None:
            continue
        cells = []
        for key, spec in (
            ("on_policy_share", ".2f"),
            ("mean_generated_tokens", ".1f"),
            ("ended_share", ".2f"),
        ):
            values = [r[key] for r in mine if r[key] is not None]
            cells.append(format(statistics.fmean(values), spec) if values else "-")
        rows.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def comparison(results: dict, stats: dict) -> list[str]:
    """On-policy and mixed against off-policy: the difference of the means and whether
    it is larger than the seeds' spread."""
    off = stats["all"].get("off_policy")
    if off is None:
        return ["- no off-policy run finished: nothing to compare"]
    lines = []
    for name in ("mixed", "on_policy", "on_policy_warm"):
        mine = stats["all"].get(name)
        if mine is None:
            continue
        difference = mine["mean"] - off["mean"]
        spread = max(mine["std"], off["std"])
        verdict = (
            "inside the seed spread: no difference shown"
            if abs(difference) <= spread
            else ("better" if difference > 0 else "worse") + " by more than the seed spread"
        )
        lines.append(
            f"- {name.replace('_', '-')} vs off-policy (sentence exact match): "
            f"{difference:+.1f} points (spread {spread:.1f}); {verdict}; worst seed "
            f"{mine['min']:.1f} vs {off['min']:.1f}"
        )
    return lines


def plot_accuracy(results: dict, stats: dict, path: Path) -> None:
    report.plot_scenario_accuracy(
        results, stats, ACCURACY_KEYS, path, title="on-policy demo", tick="name"
    )


def write_report(results: dict, out: Path) -> Path:
    stats = summaries(results)
    settings, design = results["settings"], results["design"]
    example = results["examples"][0] if results["examples"] else None
    lines = [
        "# betakd demo: on-policy distillation",
        "",
        f"Answers are sentences read from the pixels (for example {example['answer']!r} to "
        f"{example['question']!r}). "
        if example
        else "",
        f"{len(settings['seeds'])} seeds, {settings['steps']} steps of batch "
        f"{settings['batch_size']}, {settings['test_questions']} test questions answered "
        f"greedily (at most {design['max_new_tokens']} tokens); training answers sampled at "
        f"temperature {design['temperature']:g}; CE of student-answered samples: "
        f"{design['ce']}. {results['wall_seconds']:.0f} s on {results['machine']}.",
        "",
        *report.quick_note(results, "a 40-step teacher, a few student steps; "),
        *report.failed_runs(results),
        "## Accuracy (test exact match %, mean ± std over seeds)",
        "",
        "Sentence: the whole answer; size, colour, side: that word of a well-formed answer; "
        "well formed: answers of the form '<size> <colour> shape on the <side>'.",
        "",
        accuracy_table(results, stats),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## On-policy and mixed against off-policy",
        "",
        *comparison(results, stats),
        "",
        "## What the student answered in training",
        "",
        training_table(results),
        "",
    ]
    plot_accuracy(results, stats, out / "accuracy.png")
    return report.save_report(out, lines)


SCENARIO = Scenario(  # name, output folder, seeds, runs, prepare, run, job name, report
    "on-policy", "betakd-demo-on-policy", lambda config: config.on_policy.seeds,
    scenario_runs, prepare, run_job, job_name, write_report,
    configure=scenario_config,
)  # fmt: skip
