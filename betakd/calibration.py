"""Before the first step: what the head measures on the first training samples.

All three read the first samples of the training data in data-file order (so nothing
depends on shuffling, batch size or accumulation), with the models in evaluation mode
and without gradients: each weighted channel's mean energy (the energy scales of the
Gamma prior), the teacher reliability's fit, and the report of how much weight the data
trust or the reliability leaves the teacher (with a warning when distillation would be
mostly off). :class:`HeadCalibration` runs them for a run (`BetaKDTrainer` from its
`on_train_begin` hook); :class:`RunningEnergyScale` keeps the energy scales current
during training.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from betakd.objective import token_counts
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


@dataclass(kw_only=True)
class HeadCalibration:
    """The measurements above for one run, on its training data and models.

    ``model`` returns the model as the engine runs it (wrapped for DDP, FSDP or
    DeepSpeed once training starts); ``module`` is the unwrapped distillation module
    (student + head); ``loss_inputs(batch)`` turns a collated batch into the model's
    inputs (the teacher runs there). The first ``calibration_samples`` samples set the
    energy scales and the start report, the first ``reliability_samples`` fit the
    reliability.
    """

    model: Callable[[], torch.nn.Module]
    module: Any  # betakd.distill.DistillationModule
    loss_inputs: Callable[[dict], tuple]
    dataset: Any
    collate: Callable
    batch_size: int
    calibration_samples: int
    reliability_samples: int
    show_progress: bool = True

    @property
    def weighting(self) -> Weighting:
        return self.module.head.objective.weighting

    def before_training(self, first_step: bool) -> None:
        """Fit the reliability and measure the energy scales unless the head already has
        them (a resumed run, ``init_from``); at the first step, report the teacher weights."""
        weighting = self.weighting
        measured = None
        # First: the energy scales' forward passes go through the weighting, which needs it.
        if weighting.reliability is not None and not weighting.reliability.fitted:
            measured = self.measure_teacher(self.reliability_samples, "fitting the reliability")
            self.fit_reliability(measured)
        if weighting.needs_energy_scale and not weighting.has_energy_scale:
            self.calibrate_energy_scale()
        if weighting.needs_teacher_nll and first_step:
            # The models have not changed since the fit: its measurements serve the report.
            self.report_teacher_weights(measured)

    def calibrate_energy_scale(self) -> Tensor:
        """Set (and return) each weighted channel's energy scale: its mean energy over the
        first ``calibration_samples`` training samples, with the initial models."""
        weighting = self.weighting
        # The energies are read before weighting; a placeholder scale lets the forward run.
        weighting.set_energy_scale(torch.ones(len(weighting.weighted_channels)))
        batches = self.first_batches(self.calibration_samples, "measuring energy scales")
        run = lambda batch: self.model()(*self.loss_inputs(batch))  # noqa: E731
        scale = mean_energies(run, self.module.head.objective, batches)
        weighting.set_energy_scale(scale)
        return scale

    def fit_reliability(self, measured: tuple | None = None) -> dict[str, float]:
        """Fit the weighting's teacher reliability on the first ``reliability_samples``
        training samples with an answer (``measured``: their :meth:`measure_teacher`, when
        the caller has it)."""
        if measured is None:
            measured = self.measure_teacher(self.reliability_samples, "fitting the reliability")
        nll, representation = measured
        weighting = self.weighting
        return fit_reliability(
            weighting.reliability, weighting.reliability_nll(nll), representation
        )

    def report_teacher_weights(self, measured: tuple | None = None) -> dict[str, dict[str, float]]:
        """What the data trust or the reliability does to the teacher channels on the
        first ``calibration_samples`` samples (:func:`teacher_weight_report`).
        ``measured``: a :meth:`measure_teacher` of at least as many first samples, with the
        same models (the reliability's fit), read instead of another pass."""
        if measured is None:
            measured = self.measure_teacher(
                self.calibration_samples, "teacher weights at the start"
            )
        nll, representation = (
            None if v is None else v[: self.calibration_samples] for v in measured
        )
        return teacher_weight_report(self.weighting, nll, representation)

    def measure_teacher(self, samples: int, desc: str) -> tuple:
        """The teacher NLLs of the answers and h(x) of the first ``samples`` training
        samples that have an answer token, as the weighting receives them."""
        batches = self.first_batches(samples, desc)
        per_batch = lambda batch: self.score_batch(batch)[:3]  # noqa: E731
        return teacher_nll_and_representation(per_batch, batches)

    def score_batch(self, batch: dict) -> tuple:
        """One collated batch as the data trust and the reliability read it: ``(nll, h(x),
        has_answer, aligned, targets)``, the teacher NLLs of the answers ``[B]`` (or per
        weighted channel ``[B, K]``), h(x) ``[B, D]`` or None, which rows have an answer
        token, and the aligned positions and teacher targets behind them."""
        inputs, aligned, targets, image_counts = self.loss_inputs(batch)
        nll, representation = self.module.reliability_inputs(inputs, aligned, targets, image_counts)
        has_answer = token_counts(aligned.batch_index[aligned.is_answer], aligned.batch_size) > 0
        return nll, representation, has_answer, aligned, targets

    def first_batches(self, samples: int, desc: str) -> Iterator[dict]:
        """The first ``samples`` training samples in data-file order, collated, with the
        model in evaluation mode and without gradients, behind a progress bar."""
        size = self.batch_size
        batches = in_data_order(self.dataset, self.collate, samples, size)
        total = -(-min(samples, len(self.dataset)) // size)
        model = self.model()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield from tqdm(batches, total=total, desc=desc, disable=not self.show_progress)
        finally:
            model.train(was_training)


class RunningEnergyScale:
    """After every optimizer step, the step's mean energies (every micro-batch of every
    process) fold into the weighting's running energy scale (``scale_momentum``)."""

    def __init__(self, objective, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """``reduce_sum``: sums a tensor over processes (None: one process)."""
        self.objective = objective
        self.reduce_sum = reduce_sum
        self._sums: Tensor | None = None
        self._count: Tensor | None = None

    def add(self, energies: Tensor, valid: Tensor) -> None:
        """One micro-batch's per-sample energies ``[B, K]`` and valid rows."""
        if self.objective.weighting.scale_momentum is None:
            return
        sums, count = self.objective.weighted_energy_sums(energies, valid)
        sums, count = sums.detach(), count.detach().to(sums.dtype)
        if self._sums is None:
            self._sums, self._count = sums, count
        else:
            self._sums += sums
            self._count += count

    def commit(self) -> None:
        """The optimizer stepped: fold the step's mean energies into the scale."""
        if self._sums is None:
            return
        sums, count = self._sums, self._count
        self._sums = self._count = None
        if self.reduce_sum is not None:
            sums, count = self.reduce_sum(sums), self.reduce_sum(count)
        if float(count) > 0:
            self.objective.weighting.observe_energy(sums / count)
