"""Writing an audit: audit.json (the summary), samples.jsonl (every sample's scores),
report.md (the readable part), a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from betakd.files import write_text_atomic

JSON_FILE = "audit.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"
PLOT_FILE = "teachers.png"
SHOWN = 10  # rows of each table in report.md (audit.json has more)


def write_report(output: Path, result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """audit.json (``result``), samples.jsonl (one line per scored sample, in data order),
    the plot and report.md."""
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / JSON_FILE, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    lines = (json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    write_text_atomic(output / SAMPLES_FILE, "".join(lines))
    _plot(output / PLOT_FILE, result)
    write_text_atomic(output / REPORT_FILE, render(result))


def render(result: dict[str, Any]) -> str:
    """report.md: what was scored, per teacher its worst slices and likely errors, the
    likely label errors, and where several teachers disagree."""
    config = result["config"]
    skipped = {k: v for k, v in result["skipped"].items() if v}
    lines = [
        "# Teacher audit",
        "",
        f"Data `{config['train_file']}`: {result['samples_scored']} of {result['records']} "
        f"records scored in {result['seconds']:.1f} s"
        + (f"; skipped as in training: {_counts(skipped)}" if skipped else "")
        + ".",
        f"Teachers: {', '.join(config['teachers'])}. Configured weighting: "
        f"`{config['weighting']}`, teacher factor: {config['trust']}.",
        "",
        "How to read it: *P(teacher right)* is the teacher reliability's posterior "
        "(docs/weighting.md): a function of where the input lies, fitted on how the "
        "teacher's answers agree with the labels, so a region where the teacher disagrees "
        "systematically (a blind spot) gets a low value, and a scattered disagreement where "
        "it is otherwise right reads as a wrong label (low *P(label right)*). *Agreement*: "
        "the teacher's greedy answer is the label (it prefers the label's token at every "
        "answer position, the end of the turn included); the teacher answer shown is its "
        "greedy answer up to its first token that differs from the label. *Trust*: the factor the configured weighting "
        "puts on the teacher's channels in training. Slices group samples by each metadata "
        f"field of the records and by answer; see `{JSON_FILE}` for every table.",
        "",
        f"![NLL and reliability per teacher]({PLOT_FILE})",
        "",
        f"Estimated share of wrong labels: {1 - result['p_label_right_mean']:.1%} "
        "(mean posterior).",
        "",
    ]
    for name, teacher in result["teachers"].items():
        lines += _teacher_section(name, teacher)
    lines += [
        "## Likely label errors",
        "",
        "Samples whose label the teacher(s) most confidently reject where they are "
        "otherwise reliable, most likely first.",
        "",
        *_samples_table(result["likely_label_errors"][:SHOWN], "p_label_right"),
        "",
    ]
    if "disagreement" in result:
        d = result["disagreement"]
        lines += [
            "## Where the teachers disagree",
            "",
            f"The teachers' answers differ on {d['disagree']} of {d['samples']} samples "
            f"({d['disagree_share']:.1%}); there, the label agrees with: "
            f"{_counts(d['label_agrees_with']) or 'none'}.",
            "",
        ]
    return "\n".join(lines) + "\n"


def _teacher_section(name: str, t: dict[str, Any]) -> list[str]:
    nll = t["nll"]
    lines = [
        f"## Teacher `{name}`",
        "",
        f"NLL of the data's answers (nats): median {nll['median']:.2f}, 10% {nll['p10']:.2f}, "
        f"90% {nll['p90']:.2f}. Agreement with the labels: {t['agreement']:.1%}. Mean "
        f"P(teacher right): {t['p_teacher_right_mean']:.2f}.",
    ]
    if t["trust"] is not None:
        lines.append(
            f"Configured trust: median {t['trust']['median']:.3f}; "
            f"{t['trust_below_0.1']:.0%} of samples keep under a tenth of the teacher's weight."
        )
    lines += [
        "",
        "Worst slices (lowest P(teacher right) first):",
        "",
        "| field | value | samples | share | P(teacher right) | agreement | mean NLL | P(label right) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in t["worst_slices"][:SHOWN]:
        lines.append(
            f"| {s['field']} | {_cell(s['value'])} | {s['samples']} | {s['share']:.1%} | "
            f"{s['p_teacher_right']:.2f} | {s['agreement']:.1%} | {s['mean_nll']:.2f} | "
            f"{s['p_label_right']:.2f} |"
        )
    many = [f for f, table in t["slices"].items() if table["distinct_values"] > SHOWN]
    if many:
        lines += [
            "",
            "Fields with many values (their largest-enough slices are in audit.json): "
            + ", ".join(f"{f} ({t['slices'][f]['distinct_values']} values)" for f in many),
        ]
    lines += [
        "",
        "Likely teacher errors:",
        "",
        *_samples_table(t["likely_teacher_errors"][:SHOWN], "p_teacher_right", name),
        "",
    ]
    return lines


def _samples_table(samples, key: str, teacher: str | None = None) -> list[str]:
    rows = [
        f"| id | question | label | teacher answer | {key.replace('_', ' ')} | image |",
        "|---|---|---|---|---|---|",
    ]
    for s in samples:
        answers = s["teacher_answers"]
        if teacher is not None or len(answers) == 1:
            answer = answers[teacher] if teacher is not None else next(iter(answers.values()))
        else:
            answer = "; ".join(f"{k}: {v}" for k, v in answers.items())
        value = s[key][teacher] if teacher else s[key]
        rows.append(
            f"| {_cell(s['id'])} | {_cell(s['question'])} | {_cell(s['label'])} | "
            f"{_cell(answer)} | {value:.3f} | {_cell(', '.join(s['images']))} |"
        )
    return rows


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = result["teachers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, t in teachers.items():
        worst = t["worst_slices"]
        nll = t["nll"]
        spread = [[nll["median"] - nll["p10"]], [nll["p90"] - nll["median"]]]
        axes[0].errorbar([name], [nll["median"]], yerr=spread, fmt="o", capsize=4)
        labels = [f"{name}: {s['field']}={_cell(s['value'], 18)}" for s in worst[:5]]
        axes[1].barh(labels, [s["p_teacher_right"] for s in worst[:5]])
    axes[0].set_ylabel("NLL of the labels (nats), 10/50/90%")
    axes[0].set_yscale("log" if all(t["nll"]["p10"] > 0 for t in teachers.values()) else "linear")
    axes[1].set_xlabel("P(teacher right), worst slices")
    axes[1].set_xlim(0, 1)
    axes[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
