"""Before the first step: what the head measures on the first training samples.

All three read the first samples of the training data in data-file order (so nothing
depends on shuffling, batch size or accumulation), with the models in evaluation mode
and without gradients: each weighted channel's mean energy (the energy scales of the
Gamma prior), the teacher reliability's fit, and the report of how much weight the data
trust or the reliability leaves the teacher (with a warning when distillation would be
mostly off). `BetaKDTrainer` runs them from its `on_train_begin` hook.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from betakd.reliability import TeacherReliability
from betakd.weighting import CE, Weighting

logger = logging.getLogger(__name__)


def mean_energies(run_loss: Callable, objective, batches: Iterable[dict]) -> Tensor:
    """``[K]``: each weighted channel's mean energy over the valid samples of
    ``batches``; ``run_loss(batch)`` returns the model's output for one batch."""
    sums, count = None, 0
    for batch in batches:
        out = run_loss(batch)
        batch_sums, batch_count = objective.weighted_energy_sums(out.energies, out.valid)
        sums = batch_sums if sums is None else sums + batch_sums
        count += int(batch_count)
    if not count:
        raise RuntimeError("no calibration sample has a supervised answer token")
    scale = sums / count
    logger.info(
        "energy scales from %d samples: %s",
        count,
        {c: round(float(v), 6) for c, v in zip(objective.weighting.weighted_channels, scale)},
    )
    return scale


def teacher_nll_and_representation(
    per_batch: Callable[[dict], tuple[Tensor, Tensor | None, Tensor]], batches: Iterable[dict]
) -> tuple[Tensor, Tensor | None]:
    """The teacher NLLs of the answers and h(x) of the samples of ``batches`` that have a
    supervised answer token; ``per_batch(batch)`` gives ``(nll, h(x), has_answer)``."""
    nlls, representations = [], []
    for batch in batches:
        nll, representation, valid = per_batch(batch)
        nlls.append(nll[valid].float().cpu())
        if representation is not None:
            representations.append(representation[valid].float().cpu())
    return torch.cat(nlls), torch.cat(representations) if representations else None


def fit_reliability(
    reliability: TeacherReliability, nll: Tensor, representation: Tensor
) -> dict[str, float]:
    """Fit a teacher reliability on these samples (``nll [N, T]``: each teacher's NLL of
    the answers; ``representation [N, D]``: h(x)); logs its summary."""
    if nll.shape[0] < 4:
        raise RuntimeError(
            f"the teacher reliability needs at least 4 training samples with an answer, got "
            f"{nll.shape[0]}"
        )
    summary = reliability.fit(nll, representation)
    logger.info(
        "teacher reliability from %d samples (teacher NLL of the answers in nats, the "
        "fitted label-noise rate, the mean posterior that the teacher is right): %s",
        nll.shape[0],
        {k: round(v, 4) for k, v in summary.items()},
    )
    return summary


def teacher_weight_report(
    weighting: Weighting, nll: Tensor, representation: Tensor | None
) -> dict[str, dict[str, float]]:
    """Per weighted teacher channel: quantiles of its teacher's NLL of the answers and of
    the factor the data trust or the reliability puts on its beta, and the share of
    samples left with under a tenth of the teacher's weight. Logged; a warning per
    teacher when that share is over half."""
    factors = weighting.teacher_factors(nll, representation)
    per_channel = nll if nll.dim() == 2 else nll[:, None].expand_as(factors)
    report = {}
    for k, channel in enumerate(weighting.weighted_channels):
        if channel == CE:
            continue
        report[channel] = {
            **_quantiles("teacher_nll", per_channel[:, k]),
            **_quantiles("factor", factors[:, k]),
            "share_below_0.1": float((factors[:, k] < 0.1).float().mean()),
        }
    logger.info(
        "teacher weights at the start, on %d samples (teacher NLL of the answers in nats; "
        "the %s factor on each teacher channel's beta): %s",
        nll.shape[0],
        "reliability" if weighting.reliability is not None else "trust",
        {c: {k: round(v, 3) for k, v in r.items()} for c, r in report.items()},
    )
    low: dict[int, list[str]] = defaultdict(list)  # one warning per teacher
    for channel, r in report.items():
        if r["share_below_0.1"] > 0.5:
            column = weighting.weighted_channels.index(channel)
            low[weighting.reliability_teacher[column]].append(channel)
    for channels in low.values():
        data_trust = weighting.reliability is None
        logger.warning(little_teacher_weight(channels, report[channels[0]], data_trust))
    return report


def little_teacher_weight(channels: list[str], report: dict[str, float], data_trust: bool) -> str:
    what = "data trust" if data_trust else "teacher reliability"
    advice = (
        "raise weighting.options.trust.threshold above the teacher's typical NLL "
        f"(now {report['teacher_nll_median']:.2f} nats at the median) if the teacher should "
        "count, or use weighting.options.reliability, which learns where the teacher is right"
        if data_trust
        else "the teacher disagrees with most answers"
    )
    return (
        f"the {what} leaves {report['share_below_0.1']:.0%} of the first samples with under a "
        f"tenth of the teacher's weight on {', '.join(map(repr, channels))} (median factor "
        f"{report['factor_median']:.3f}): distillation is mostly off. Check that teacher and "
        f"data match (chat template, answer format, images); {advice}; or use another teacher."
    )


def _quantiles(name: str, values: Tensor) -> dict[str, float]:
    q = torch.quantile(values.float(), torch.tensor([0.1, 0.5, 0.9]))
    return {f"{name}_p10": float(q[0]), f"{name}_median": float(q[1]), f"{name}_p90": float(q[2])}


def in_data_order(dataset, collate: Callable, samples: int, batch_size: int) -> Iterator[dict]:
    """Collated batches of the first ``samples`` samples of ``dataset``, in order."""
    n = min(samples, len(dataset))
    for start in range(0, n, batch_size):
        yield collate([dataset[i] for i in range(start, min(n, start + batch_size))])
