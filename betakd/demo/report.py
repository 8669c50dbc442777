"""The demo's reports: the default scenario's (tables, plots, its comparisons stated
plainly) and the helpers every scenario's report shares (summaries over seeds,
comparisons, tables, plots, failed runs, the audit)."""

from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

SLICE_NAMES = {"clean": "clean labels", "noisy": "noisy labels", "blind": "teacher's blind slice"}


def roc_auc(negatives: list[float], positives: list[float]) -> float | None:
    """P(a positive scores lower than a negative), ties count half (Mann-Whitney).

    Used as "how well does a low beta pick out the positives" (blind or noisy samples).
    """
    if not negatives or not positives:
        return None
    pairs = sorted([(v, 1) for v in positives] + [(v, 0) for v in negatives])
    # Average ranks over ties, then the U statistic of the positives.
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, (_, is_pos) in zip(ranks, pairs) if is_pos)
    n_pos, n_neg = len(positives), len(negatives)
    u_higher = rank_sum - n_pos * (n_pos + 1) / 2  # positives ranked above negatives
    return round(1.0 - u_higher / (n_pos * n_neg), 4)


def machine_description() -> str:
    import torch
    import transformers

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def summarize(runs: list[dict], key: str = "all") -> dict[str, dict]:
    """Mean, spread (sample std), worst and best seed of an accuracy field per strategy."""
    by_strategy: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        value = run["accuracy"].get(key)
        if value is not None:
            by_strategy[run["strategy"]].append(value)
    table = {}
    for strategy, values in by_strategy.items():
        mean = statistics.fmean(values)
        table[strategy] = {
            "mean": round(mean, 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    return table


def labels(results: dict) -> dict[str, str]:
    return {s["name"]: s["label"] for s in results["strategies"]}


def best_of(names, summary: dict) -> str | None:
    """The one of ``names`` with the best mean in ``summary`` (None: none is in it)."""
    return max((n for n in names if n in summary), key=lambda n: summary[n]["mean"], default=None)


def versus(mine: dict, theirs: dict) -> str:
    """Two :func:`summarize` rows compared: the difference of the means, the means, and
    each one's worst seed."""
    return (
        f"{mine['mean'] - theirs['mean']:+.1f} points (mean {mine['mean']:.1f} vs "
        f"{theirs['mean']:.1f}), worst seed {mine['min']:.1f} vs {theirs['min']:.1f}"
    )


def best_fixed(results: dict, summary: dict) -> str | None:
    """The fixed weighting with the best mean accuracy in ``summary`` (of any accuracy
    field) over the sweep and plain fixed: a weight tuned on the test set, the strongest
    baseline a practitioner could pick."""
    fixed = [
        s["name"]
        for s in results["strategies"]
        if s["weighting"]
        and s["weighting"].get("name") == "fixed"
        and not {"trust", "reliability"} & set(s["weighting"].get("options") or {})
    ]
    return best_of(fixed, summary)


def comparisons(results: dict) -> list[str]:
    """The recommended strategy against the best fixed weight (tuned on the test set):
    overall, outside the blind slice (against the best fixed weight there) and on it,
    and its worst seed against its mean. No lines without a recommended strategy or a
    fixed weight among the runs."""
    runs = results["runs"]
    summary, outside, blind = (summarize(runs, k) for k in ("all", "outside_blind", "blind"))
    chosen = next((s["name"] for s in results["strategies"] if s["recommended"]), None)
    best = best_fixed(results, summary)
    if chosen is None or chosen not in summary or best is None:
        return []
    name = labels(results)
    lines = [
        f"- {name[chosen]} vs the best fixed weight ({name[best]}), whole test set: "
        f"{versus(summary[chosen], summary[best])}."
    ]
    if chosen in blind:
        best_outside = best_fixed(results, outside)
        if chosen in outside and best_outside is not None:
            lines.append(
                f"- Outside the blind slice, vs the best fixed weight there "
                f"({name[best_outside]}): {versus(outside[chosen], outside[best_outside])}."
            )
        if best in blind:
            lines.append(
                f"- On the blind slice, vs {name[best]}: {versus(blind[chosen], blind[best])}."
            )
    else:
        lines.append(
            "- The data has no blind slice (`data.blind_value` null): the whole test set is "
            "the comparison."
        )
    mine = summary[chosen]
    lines.append(
        f"- Seeds of {name[chosen]}: worst {mine['min']:.1f}, mean {mine['mean']:.1f} "
        f"({mine['min'] - mine['mean']:+.1f}), over {mine['n']} seed(s)."
    )
    return lines


def ranking(results: dict) -> str:
    """The best mean accuracy, the runner-up, the gap, and each one's seed spread."""
    summary = summarize(results["runs"])
    if not summary:
        return "No runs."
    name = labels(results)
    ranked = sorted(summary.items(), key=lambda kv: kv[1]["mean"], reverse=True)
    best, best_stats = ranked[0]
    lines = [f"Best mean accuracy: **{name.get(best, best)}** ({best_stats['mean']:.2f}%)."]
    if len(ranked) > 1:
        second, second_stats = ranked[1]
        gap = best_stats["mean"] - second_stats["mean"]
        runner_up = (
            f"Runner-up: {name.get(second, second)} ({second_stats['mean']:.2f}%), "
            f"{gap:.2f} points behind"
        )
        if best_stats["n"] < 2:
            lines.append(runner_up + "; one seed only, so no seed spread was measured.")
        else:
            lines.append(
                runner_up + f"; seed spread (std over {best_stats['n']} seeds) "
                f"{best_stats['std']:.2f} and {second_stats['std']:.2f} points."
            )
    return " ".join(lines)


def cell(stats: dict | None) -> str:
    """A table cell: mean ± std over seeds, or "-"."""
    return "-" if stats is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def mean_of(values) -> str:
    """A table cell: the mean of the values that are not None (3 digits), or "-"."""
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3g}" if values else "-"


def runs_table(
    results: dict,
    stats: dict,
    keys: Sequence[str],
    columns: Sequence[str],
    teachers: Mapping[str, dict],
    *,
    seconds: bool = False,
) -> str:
    """A scenario's accuracy table. ``columns``: the headers after "student" (one per
    accuracy key, the worst seed on the first key, then the training seconds when
    ``seconds``). A row per teacher (its row label -> its accuracy), then a row per
    finished run in ``runs_catalogue`` order: mean ± std over seeds per key, the worst
    seed, and the mean training seconds per run."""
    header = ["student", *columns]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blanks = " | -" * (2 if seconds else 1) + " |"
    for label, accuracy in teachers.items():
        rows.append(f"| {label} | " + " | ".join(f"{accuracy[k]:.1f}" for k in keys) + blanks)
    for run in results["runs_catalogue"]:
        name = run["name"]
        if name not in stats[keys[0]]:
            continue
        cells = [cell(stats[k].get(name)) for k in keys] + [f"{stats[keys[0]][name]['min']:.1f}"]
        if seconds:
            times = [r["train_seconds"] for r in results["runs"] if r["run"] == name]
            cells.append(f"{statistics.fmean(times):.0f}")
        rows.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def quick_note(results: dict, detail: str = "") -> list[str]:
    """A scenario report's lines on a quick smoke run (none for a full run)."""
    if not results["quick"]:
        return []
    return [f"**Quick smoke run**: {detail}the numbers mean nothing.", ""]


def save_report(out: Path, lines: Sequence[str]) -> Path:
    """``out/report.md`` from its lines."""
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def scenario_summaries(results: dict, keys: Sequence[str]) -> dict[str, dict[str, dict]]:
    """A scenario's runs (``run`` names, ``accuracy`` fields): per accuracy key, the
    :func:`summarize` table per run."""
    runs = [{"strategy": r["run"], "accuracy": r["accuracy"]} for r in results["runs"]]
    return {key: summarize(runs, key) for key in keys}


def plot_scenario_accuracy(
    results: dict, stats: dict, keys: Sequence[str], path: Path, *, title: str, tick: str
) -> None:
    """One panel per accuracy key: each run's mean (bar), std (error bar) and seeds
    (dots), in ``runs_catalogue`` order, labelled by the runs' ``tick`` field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [r for r in results["runs_catalogue"] if r["name"] in stats[keys[0]]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys) + 2, 4.5), sharey=True)
    for ax, key in zip(axes, keys, strict=True):
        xs = list(range(len(order)))
        ax.bar(xs, [stats[key][r["name"]]["mean"] for r in order],
               yerr=[stats[key][r["name"]]["std"] for r in order], capsize=3, color="#4C72B0")  # fmt: skip
        for x, r in zip(xs, order):
            seeds = [run["accuracy"][key] for run in results["runs"] if run["run"] == r["name"]]
            ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.set_xticks(xs, [r[tick] for r in order], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(key.replace("_", " "))
    axes[0].set_ylabel("test exact match (%)")
    fig.suptitle(f"{title}: student accuracy (mean ± std over seeds; dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict) -> str:
    runs, teacher = results["runs"], results["teacher"]["accuracy"]
    summaries = {key: summarize(runs, key) for key in ("all", "outside_blind", "blind")}
    best = best_fixed(results, summaries["all"])
    rows = [
        "| strategy | all | outside blind slice | blind slice | worst seed (all) |",
        "|---|---|---|---|---|",
        "| teacher | "
        + " | ".join(_percent(teacher.get(k)) for k in ("all", "outside_blind", "blind"))
        + " | - |",
    ]
    for strategy in results["strategies"]:
        name = strategy["name"]
        if name not in summaries["all"]:
            continue
        stats = summaries["all"][name]
        label = strategy["label"]
        if strategy["recommended"]:
            label = f"**{label}** (recommended)"
        if name == best:
            label += " = best fixed (tuned on test)"
        rows.append(
            f"| {label} | {cell(stats)} | {cell(summaries['outside_blind'].get(name))} | "
            f"{cell(summaries['blind'].get(name))} | {stats['min']:.1f} |"
        )
    return "\n".join(rows)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _betas_table(results: dict) -> str:
    """Final betas per slice (mean over seeds of each slice's mean), and ROC AUCs."""
    rows = [
        "| strategy | channel | clean | noisy | blind | AUC blind (lower beta) | AUC noisy |",
        "|---|---|---|---|---|---|---|",
    ]
    name = labels(results)
    per: dict = defaultdict(lambda: defaultdict(list))
    for run in results["runs"]:
        for channel, table in run["separation"].items():
            per[(run["strategy"], channel)]["runs"].append(table)
    for (strategy, channel), group in per.items():
        tables = group["runs"]
        slices = [mean_of([t["mean"].get(s) for t in tables]) for s in ("clean", "noisy", "blind")]
        aucs = [mean_of([t[k] for t in tables]) for k in ("auc_blind_lower", "auc_noisy_lower")]
        rows.append(
            f"| {name.get(strategy, strategy)} | {channel} | " + " | ".join(slices + aucs) + " |"
        )
    return "\n".join(rows)


def _plot_accuracy(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, teacher = results["runs"], results["teacher"]["accuracy"]
    name = labels(results)
    keys = [("all", "all"), ("outside_blind", "outside blind slice"), ("blind", "blind slice")]
    # Without a blind slice (data.blind_value null) its panel has no values: left out.
    keys = [(key, title) for key, title in keys if summarize(runs, key)]
    if not keys:  # every run failed: nothing to plot
        return
    order = [
        s["name"] for s in results["strategies"] if any(r["strategy"] == s["name"] for r in runs)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.5), sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        summary = summarize(runs, key)
        xs = list(range(len(order)))
        ax.bar(xs, [summary[s]["mean"] for s in order], yerr=[summary[s]["std"] for s in order],
               capsize=3, color="#4C72B0")  # fmt: skip
        for x, s in zip(xs, order):
            seeds = [r["accuracy"][key] for r in runs if r["strategy"] == s]
            ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        if teacher.get(key) is not None:
            ax.axhline(teacher[key], color="#C44E52", linestyle="--", label="teacher")
            ax.legend(loc="lower left")
        ax.set_xticks(xs, [name[s] for s in order], rotation=35, ha="right", fontsize=7)
        ax.set_title(title)
    axes[0][0].set_ylabel("test exact match (%)")
    fig.suptitle("easy-VQA student accuracy (mean ± std over seeds; dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_slice_betas(results: dict, path: Path) -> bool:
    """Betas per slice over training for each per-sample strategy (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = labels(results)
    first_seed = min((r["seed"] for r in results["runs"]), default=0)
    shown = [
        r
        for r in results["runs"]
        if r["seed"] == first_seed
        and r["slice_history"]
        and r["family"] in ("beta_kd", "reference")
    ]
    if not shown:
        return False
    channels = sorted({c for r in shown for c in r["slice_history"] if c != "ce"})
    fig, axes = plt.subplots(
        len(shown), len(channels), figsize=(5 * len(channels), 2.6 * len(shown)), squeeze=False
    )
    colours = {"clean": "#4C72B0", "noisy": "#DD8452", "blind": "#C44E52"}
    for row, run in zip(axes, shown):
        for ax, channel in zip(row, channels):
            for slice_name, points in run["slice_history"].get(channel, {}).items():
                ax.plot([p[0] for p in points], [p[1] for p in points],
                        color=colours[slice_name], label=SLICE_NAMES[slice_name])  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{name[run['strategy']]}: {channel}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("mean beta", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"betas per slice over training (seed {first_seed})")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_gradients(results: dict, path: Path) -> bool:
    """Per-slice gradient norms of each channel's term into the student (--diagnose)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = labels(results)
    first_seed = min((r["seed"] for r in results["runs"]), default=0)
    shown = [r for r in results["runs"] if r["seed"] == first_seed and r["diagnostics"]]
    if not shown:
        return False
    channels = sorted({k.split("/")[1] for r in shown for k in r["diagnostics"][0] if "/" in k})
    fig, axes = plt.subplots(
        len(shown), len(channels), figsize=(5 * len(channels), 2.6 * len(shown)), squeeze=False
    )
    colours = {"clean": "#4C72B0", "noisy": "#DD8452", "blind": "#C44E52"}
    for row, run in zip(axes, shown):
        steps = [d["step"] for d in run["diagnostics"]]
        for ax, channel in zip(row, channels):
            for slice_name in colours:
                key = f"{slice_name}/{channel}/grad_norm"
                if key in run["diagnostics"][0]:
                    ax.plot(steps, [d[key] for d in run["diagnostics"]],
                            color=colours[slice_name], label=SLICE_NAMES[slice_name])  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{name[run['strategy']]}: {channel}", fontsize=9)
            ax.set_ylabel("grad norm (student)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def failed_runs(results: dict) -> list[str]:
    """The report's lines on runs that failed (none: no lines)."""
    failed = results.get("failed") or []
    if not failed:
        return []
    return [
        f"## Failed runs ({len(failed)}; every table below leaves them out)",
        "",
        *[f"- {f['run']}: {f['error']} (log: {f['log']})" for f in failed],
        "",
    ]


def audit_lines(audit: dict | None) -> list[str]:
    """What `betakd audit` found in the training data before the runs, against what the
    demo planted (its report's section)."""
    if not audit:
        return []

    def found(pr: dict, what: str) -> str:
        if pr["precision"] is None or pr["recall"] is None:
            return f"{pr['flagged']} samples flagged as {what} ({pr['planted']} planted)"
        return (
            f"{pr['flagged']} flagged as {what}: precision {pr['precision']:.1%}, recall "
            f"{pr['recall']:.1%} of the {pr['planted']} planted"
        )

    lines = [
        "",
        "## Audit of the training data",
        "",
        f"`betakd audit` ([report]({audit['report']}); {audit['samples']} samples, "
        f"{audit['seconds']:.0f} s, forward passes only) with the recommended strategy's "
        "config, without the demo's ground-truth fields. At posterior 0.5: "
        f"{found(audit['label_errors'], 'wrong labels')}.",
        "",
    ]
    for name, t in audit["teachers"].items():
        top = t["top_slice"]
        lines.append(
            f"- Teacher `{name}` (blind slice {t['blind']}): worst slice {top['field']} = "
            f"{top['value']} ({top['samples']} samples, P(teacher right) "
            f"{top['p_teacher_right']:.2f})"
            + (", the planted one" if t["blind_slice_named_first"] else ", not the planted one")
            + f"; {found(t['teacher_errors'], 'its errors')} (its blind slice)."
        )
    if "disagreement" in audit:
        d = audit["disagreement"]
        lines.append(
            f"- The teachers' answers differ on {d['disagree']} of {d['samples']} samples; "
            "there the label agrees with: "
            + ", ".join(f"{k} {v}" for k, v in d["label_agrees_with"].items())
            + "."
        )
    return lines


def write_report(results: dict, out: Path) -> Path:
    """report.md plus PNG plots in ``out``."""
    runs = results["runs"]
    teacher = results["teacher"]["accuracy"]
    _plot_accuracy(results, out / "accuracy.png")
    has_slices = _plot_slice_betas(results, out / "betas_by_slice.png")
    has_gradients = _plot_gradients(results, out / "gradients_by_slice.png")
    summary = summarize(runs)
    manifest = results["data"]
    settings = results["settings"]
    seeds = settings["seeds"]
    lines = [
        "# betakd demo: easy-VQA distillation",
        "",
        f"Machine: {results['machine']}. Wall time: {results['wall_seconds']:.0f} s "
        f"({settings['jobs']} parallel runs; teacher "
        f"{'trained' if results['teacher']['seconds_this_run'] > 5 else 'cached'}: "
        f"{results['teacher']['seconds_this_run']:.0f} s this run)."
        + (" **Quick smoke run: numbers are not meaningful.**" if results["quick"] else ""),
        "",
        *failed_runs(results),
        "## Setup",
        f"- Student training data: {manifest['counts']['train_student']} "
        f"{'/'.join(manifest['config']['qtypes'])} questions"
        + (f" (runs use the first {settings['train_limit']})" if settings["train_limit"] else "")
        + f", {manifest['noisy']} of them with a wrong (noisy) answer of the same type.",
        f"- Teacher blind slice: {manifest['config']['blind_attribute']} = "
        f"{manifest['config']['blind_value']}; the teacher never saw it, the student's data "
        "keeps it.",
        f"- Teacher: {results['teacher']['info']['parameters']:,} parameters. Channels: CE + "
        f"{results['channels']['logit_energy']} + "
        + (
            f"visual feature KD ({results['channels']['feature']})"
            if results["channels"]["feature"]
            else "no feature channel"
        )
        + " (a strategy may override the feature channel: see results.json).",
        f"- Each run: {settings['steps']} steps of batch {settings['batch_size']}, seeds "
        f"{list(seeds)}; evaluated by greedy generation on {settings['test_questions']} test "
        "questions (exact match).",
        *([f"- Overrides: `{' '.join(results['overrides'])}`"] if results["overrides"] else []),
        "",
        f"## Results (test exact match %, mean ± std over {len(seeds)} seed(s))",
        "",
        _table(results),
        "",
        "## Best mean accuracy",
        "",
        ranking(results),
    ]
    compared = comparisons(results)
    if compared:
        lines += ["", "## The recommended strategy against the best fixed weight", ""]
        lines += [
            "The best fixed weight is chosen on the test set: the strongest baseline a "
            "practitioner could pick.",
            "",
            *compared,
        ]
    nll = results["teacher"].get("answer_nll") or {}
    if nll:
        lines += [
            "",
            "The teacher's NLL of the training answers (nats; what the data trust reads), "
            "median [10%, 90%]: "
            + "; ".join(
                f"{SLICE_NAMES[name]} {v['q50']:.3g} [{v['q10']:.3g}, {v['q90']:.3g}]"
                for name, v in nll.items()
            )
            + ".",
        ]
    outside = summarize(runs, "outside_blind").get("ce_only", {}).get("mean")
    if "ce_only" in summary and outside is not None:
        inside = (
            f"; inside the blind slice the teacher gets {teacher['blind']:.1f}%"
            if teacher.get("blind") is not None
            else ""
        )
        lines += [
            "",
            f"Teacher vs CE-only student outside the blind slice: "
            f"{teacher['outside_blind']:.1f}% vs {outside:.1f}% "
            f"({teacher['outside_blind'] - outside:+.1f} points){inside}.",
        ]
    if any(r["separation"] for r in runs):
        lines += [
            "",
            "## Where the weights go",
            "",
            "Final per-sample betas of every training sample under the trained student "
            "(mean per slice, averaged over seeds; fixed weights are constant unless a trust or the "
            "reliability re-weights them; the CE row, when shown, is the factor the reliability "
            "puts on the CE), and the ROC AUC of 'lower beta' for the blind slice and for "
            "noisy labels (0.5: no separation, 1.0: perfect):",
            "",
            _betas_table(results),
        ]
    lines += audit_lines(results.get("audit"))
    lines += ["", "## Plots", "", "![accuracy](accuracy.png)", ""]
    if has_slices:
        lines += ["![betas per slice over training](betas_by_slice.png)", ""]
    if has_gradients:
        lines += ["![gradient norms per slice](gradients_by_slice.png)", ""]
    lines += ["Raw numbers: `results.json`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
