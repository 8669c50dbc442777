"""The demo's report: results table, plots, and a plain statement of what won."""

from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path

NAMES = {
    "ce_only": "CE only",
    "equal": "equal",
    "fixed": "fixed (initial scales)",
    "task": "Beta-KD task",
    "instance": "Beta-KD instance",
    "closed_form": "closed form",
}


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
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def summarize(runs: list[dict], key: str = "all") -> dict[str, dict]:
    """Mean and spread (sample std, min, max) of an accuracy field per strategy."""
    by_strategy: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        value = run["accuracy"].get(key)
        if value is not None:
            by_strategy[run["strategy"]].append(value)
    table = {}
    for strategy, values in by_strategy.items():
        table[strategy] = {
            "mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    return table


def verdict(summary: dict[str, dict]) -> str:
    """Which strategy won, by how much, and whether that exceeds the seed spread."""
    if not summary:
        return "No runs."
    ranked = sorted(summary.items(), key=lambda kv: kv[1]["mean"], reverse=True)
    best, best_stats = ranked[0]
    lines = [f"Best mean accuracy: **{NAMES.get(best, best)}** ({best_stats['mean']:.2f}%)."]
    if len(ranked) > 1:
        second, second_stats = ranked[1]
        gap = best_stats["mean"] - second_stats["mean"]
        spread = max(best_stats["std"], second_stats["std"])
        runner_up = (
            f"Runner-up: {NAMES.get(second, second)} ({second_stats['mean']:.2f}%), "
            f"{gap:.2f} points behind"
        )
        if best_stats["n"] < 2:
            lines.append(runner_up + "; one seed only, so no seed spread was measured.")
        else:
            solid = gap > 2 * spread
            lines.append(
                runner_up + f"; the larger seed spread (std) of the two is {spread:.2f} "
                "points, so the gap is "
                + ("larger than twice the seed spread." if solid else "within the seed noise.")
            )
    beta_kd = [s for s in ("task", "instance", "closed_form") if s in summary]
    baselines = [s for s in ("equal", "fixed") if s in summary]
    if beta_kd and baselines:
        best_beta = max(beta_kd, key=lambda s: summary[s]["mean"])
        best_base = max(baselines, key=lambda s: summary[s]["mean"])
        diff = summary[best_beta]["mean"] - summary[best_base]["mean"]
        word = "beats" if diff > 0 else "does not beat"
        lines.append(
            f"The best Beta-KD weighting ({NAMES[best_beta]}) {word} the best fixed-weight "
            f"baseline ({NAMES[best_base]}): {diff:+.2f} points."
        )
    return " ".join(lines)


def _table(runs: list[dict], teacher: dict) -> str:
    columns = [("all", "all"), ("outside_blind", "outside blind"), ("blind", "blind slice")]
    qtypes = sorted(
        {k for r in runs for k in r["accuracy"] if k not in {"all", "outside_blind", "blind"}}
    )
    columns += [(q, q) for q in qtypes]
    head = "| strategy | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = [head, rule]
    teacher_cells = [
        f"{teacher[key]:.1f}" if teacher.get(key) is not None else "-" for key, _ in columns
    ]
    rows.append("| teacher | " + " | ".join(teacher_cells) + " |")
    summaries = {key: summarize(runs, key) for key, _ in columns}
    for strategy in NAMES:
        if strategy not in summaries["all"]:
            continue
        cells = []
        for key, _ in columns:
            stats = summaries[key].get(strategy)
            cells.append("-" if stats is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}")
        rows.append(f"| {NAMES[strategy]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot_accuracy(runs: list[dict], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    order = [s for s in NAMES if s in summary]
    means = [summary[s]["mean"] for s in order]
    errors = [summary[s]["std"] for s in order]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([NAMES[s] for s in order], means, yerr=errors, capsize=4, color="#4C72B0")
    for x, s in enumerate(order):
        seeds = [r["accuracy"]["all"] for r in runs if r["strategy"] == s]
        ax.scatter([x] * len(seeds), seeds, color="black", s=12, zorder=3)
    if teacher.get("all") is not None:
        ax.axhline(teacher["all"], color="#C44E52", linestyle="--", label="teacher")
        ax.legend()
    ax.set_ylabel("test exact match (%)")
    ax.set_title("easy-VQA student accuracy (mean ± std over seeds; dots = seeds)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_betas(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [r for r in runs if r["strategy"] in ("task", "instance", "closed_form")]
    channels = sorted({c for r in learned for c in r["beta_history"]})
    if not channels:
        return
    fig, axes = plt.subplots(1, len(channels), figsize=(6 * len(channels), 4), squeeze=False)
    for ax, channel in zip(axes[0], channels):
        for run in learned:
            rows = run["beta_history"].get(channel)
            if not rows:
                continue
            steps = [r[0] for r in rows]
            label = f"{NAMES[run['strategy']]} (seed {run['seed']})"
            line = ax.plot(steps, [r[1] for r in rows], label=label)[0]
            if run["strategy"] != "task":  # per-sample betas: show their range
                ax.fill_between(
                    steps, [r[2] for r in rows], [r[3] for r in rows], alpha=0.12,
                    color=line.get_color(),
                )  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("beta (mean; band = min..max)")
        ax.set_title(f"channel {channel}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_instance(runs: list[dict], path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    instance = [r for r in runs if r["strategy"] == "instance" and r["separation"]]
    if not instance:
        return {}
    channel = "cosine_probs" if "cosine_probs" in instance[0]["separation"] else None
    channel = channel or next(iter(instance[0]["separation"]))
    table = instance[0]["separation"][channel]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (a, b, auc_key, title) in zip(
        axes,
        [
            ("clean", "noisy", "auc_noisy_lower", "noisy vs clean labels"),
            ("rest", "blind", "auc_blind_lower", "teacher's blind slice vs rest"),
        ],
    ):
        bins = 40
        ax.hist(table[a], bins=bins, alpha=0.6, density=True, label=f"{a} (n={len(table[a])})")
        ax.hist(table[b], bins=bins, alpha=0.6, density=True, label=f"{b} (n={len(table[b])})")
        ax.set_xscale("log") if min(table[a] + table[b], default=1) > 0 else None
        ax.set_xlabel(f"predicted beta, channel {channel}")
        ax.set_title(f"{title}: AUC(lower beta) = {table[auc_key]}")
        ax.legend()
    fig.suptitle(
        f"instance Beta-KD (seed {instance[0]['seed']}): final network on every training sample"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {
        f"seed {r['seed']}": {
            ch: {k: v[k] for k in ("auc_blind_lower", "auc_noisy_lower")}
            for ch, v in r["separation"].items()
        }
        for r in instance
    }


def write_report(results: dict, out: Path) -> Path:
    """report.md plus PNG plots in ``out``."""
    runs = results["runs"]
    teacher = results["teacher"]["accuracy"]
    _plot_accuracy(runs, teacher, out / "accuracy.png")
    _plot_betas(runs, out / "betas.png")
    aucs = _plot_instance(runs, out / "instance_betas.png")
    summary = summarize(runs)
    ce = summary.get("ce_only", {}).get("mean")
    outside = summarize(runs, "outside_blind").get("ce_only", {}).get("mean")
    manifest = results["data"]
    lines = [
        "# betakd demo: easy-VQA distillation",
        "",
        f"Machine: {results['machine']}. Wall time: {results['wall_seconds']:.0f} s "
        f"(teacher {'trained' if results['teacher']['seconds_this_run'] > 5 else 'cached'}: "
        f"{results['teacher']['seconds_this_run']:.0f} s this run)."
        + (" **Quick smoke run: numbers are not meaningful.**" if results["quick"] else ""),
        "",
        "## Setup",
        f"- Student training data: {manifest['counts']['train_student']} "
        f"{'/'.join(manifest['config']['qtypes'])} questions"
        + (
            f" (runs use the first {results['settings']['train_limit']})"
            if results["settings"]["train_limit"]
            else ""
        )
        + f", {manifest['noisy']} of them with a wrong (noisy) answer of the same type.",
        f"- Teacher blind slice: {manifest['config']['blind_attribute']} = "
        f"{manifest['config']['blind_value']}; the teacher never saw it, the student's data "
        "keeps it.",
        f"- Teacher: {results['teacher']['info']['parameters']:,} parameters; "
        f"channels CE + cosine_probs + visual feature KD (MSE through a linear adapter).",
        f"- Each run: {results['settings']['steps']} steps of batch "
        f"{results['settings']['batch_size']}, seeds {results['settings']['seeds']}; "
        f"evaluated by greedy generation on {results['settings']['test_questions']} test "
        "questions (exact match).",
        "",
        "## Results (test exact match %, mean ± std over seeds)",
        "",
        _table(runs, teacher),
        "",
        "## Verdict",
        "",
        verdict(summary),
    ]
    if ce is not None and teacher.get("outside_blind") is not None and outside is not None:
        lines += [
            "",
            f"Teacher vs CE-only student outside the blind slice: "
            f"{teacher['outside_blind']:.1f}% vs {outside:.1f}% "
            f"({teacher['outside_blind'] - outside:+.1f} points); inside the blind slice the "
            f"teacher gets {teacher['blind']:.1f}%.",
        ]
    if aucs:
        lines += [
            "",
            "## Do instance betas find the unreliable samples?",
            "",
            "ROC AUC of 'lower predicted beta' (0.5 = no separation, 1.0 = perfect):",
            "",
            "```",
            *(f"{seed}: {values}" for seed, values in aucs.items()),
            "```",
            "",
            "The instance weighting sees only the teacher's pooled visual tokens, so it can "
            "react to the blind slice (an image property) but cannot know which labels are "
            "noisy (noise is random per question); an AUC near 0.5 for noise is expected.",
        ]
    lines += [
        "",
        "## Plots",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![betas](betas.png)",
        "",
        "![instance betas](instance_betas.png)" if aucs else "",
        "",
        "Raw numbers: `results.json`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
