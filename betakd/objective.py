"""The distillation objective: channels + weighting -> one scalar loss and its metrics.

All reductions live here:

* token -> sample: :func:`per_sample_mean` turns per-token energies into one value per
  sample (the mean over that sample's supervised tokens), *before* any weighting, so
  that instance-level betas weigh samples against each other;
* sample -> batch: :class:`DistillationObjective` sums per-sample losses and divides by
  the number of items in the whole accumulated batch (``num_items``), so that gradient
  accumulation over micro-batches equals one large batch, as Hugging Face's
  ``num_items_in_batch`` does for CE.

What it weighs is a micro-batch's :class:`ChannelValues` (per-sample CE, energies,
representation); :func:`with_generated` merges the values of rows the student answered
itself (on-policy) into those of the data's answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from betakd.labels import supervised
from betakd.weighting import CE, Weighting, WeightingOutput, at_least_float32

REDUCTIONS = ("sample", "token")


def per_sample_mean(values: Tensor, sample_index: Tensor, num_samples: int) -> Tensor:
    """Mean of per-token ``values [N]`` per sample, given each token's sample index ``[N]``.

    Samples without tokens get 0 (see :func:`token_counts` to tell them apart).
    """
    values = values.float()
    sums = values.new_zeros(num_samples).index_add(0, sample_index, values)
    return sums / token_counts(sample_index, num_samples).clamp_min(1).to(sums.dtype)


def token_counts(sample_index: Tensor, num_samples: int) -> Tensor:
    """Number of supervised tokens per sample."""
    return torch.bincount(sample_index, minlength=num_samples)


def items_in_batch(labels: Sequence[Tensor], reduction: str) -> Tensor:
    """What one optimizer step's loss is normalised by, over its micro-batches'
    ``labels``: the samples with an answer token, or (``reduction`` token) the answer
    tokens (the first position predicts nothing)."""
    total = torch.zeros((), dtype=torch.long)
    for batch_labels in labels:
        per_row = supervised(batch_labels[..., 1:]).sum(dim=-1)
        total += per_row.sum() if reduction == "token" else (per_row > 0).sum()
    return total


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``values [B, T]`` over the positions where ``mask`` is true."""
    mask = mask.to(torch.float32)
    return (values.float() * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)


@dataclass
class ObjectiveOutput:
    """The scalar to backpropagate, the per-sample losses behind it, and logging metrics."""

    loss: Tensor
    per_sample_loss: Tensor
    betas: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # Per-sample channel energies [B, C] (detached) and which rows count ([B] bool):
    # what energy scales and per-group metrics are computed from.
    energies: Tensor | None = None
    valid: Tensor | None = None
    # Per-sample, per-channel terms (beta * energy + regulariser) [B, C], with gradients:
    # what diagnostics take per-channel gradients of.
    terms: Tensor | None = None


class DistillationObjective(nn.Module):
    """Combine the CE channel and teacher channels with a weighting.

    ``reduction="sample"`` gives every sample the same weight (its per-sample loss is a
    mean over its tokens); ``reduction="token"`` weighs each sample by its number of
    supervised tokens, which matches token-averaged CE.
    """

    def __init__(self, weighting: Weighting, reduction: str = "sample") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if weighting.channels[0] != CE:
            raise ValueError(f"the first channel must be {CE!r}, got {weighting.channels}")
        self.weighting = weighting
        self.reduction = reduction

    @property
    def channels(self) -> list[str]:
        return self.weighting.channels

    def forward(
        self,
        ce: Tensor,
        energies: Mapping[str, Tensor],
        representation: Tensor | None = None,
        *,
        counts: Tensor | None = None,
        num_items: int | Tensor | None = None,
        teacher_nll: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Args:
        ce: per-sample CE ``[B]``.
        energies: per-sample energy ``[B]`` for every teacher channel of the weighting.
        representation: ``[B, D]`` input of an instance weighting.
        counts: supervised tokens per sample ``[B]``; samples with 0 are left out.
        num_items: samples (``reduction="sample"``) or tokens (``"token"``) in the whole
            accumulated batch; defaults to this micro-batch's.
        teacher_nll: the teacher's per-sample NLL of the answers ``[B]``, for a trust
            measured against the data; with several teachers ``[B, K]``, per weighted
            channel its own teacher's.
        """
        losses, valid = self.channel_energies(ce, energies, counts)
        out = self.weighting(losses, representation, teacher_nll)
        item_weights = self._item_weights(counts, valid)
        if num_items is None:
            num_items = item_weights.sum()
        num_items = torch.as_tensor(num_items, dtype=losses.dtype, device=losses.device)
        loss = (out.per_sample_loss * item_weights).sum() / num_items.clamp_min(1.0)
        metrics = summarize(self.channels, losses, out, valid)
        metrics["loss"] = float(loss.detach())
        return ObjectiveOutput(
            loss,
            out.per_sample_loss,
            out.betas,
            metrics,
            energies=losses.detach(),
            valid=valid,
            terms=out.weighted + out.regulariser,
        )

    def channel_energies(
        self, ce: Tensor, energies: Mapping[str, Tensor], counts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The ``[B, C]`` per-sample channel values in the weighting's column order, and
        the ``[B]`` mask of samples with supervised tokens (their rows; others are 0)."""
        losses = self._stack_channels(ce, energies)
        if counts is None:
            counts = torch.ones(losses.shape[0], device=losses.device)
        valid = counts > 0
        # Zero the left-out rows *before* weighting: a NaN there would leak into gradients.
        return torch.where(valid[:, None], losses, torch.zeros_like(losses)), valid

    def weighted_energy_sums(self, energies: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Sums over valid samples of each weighted channel's energy ``[K]``, and their
        count: what an energy scale is measured from (sum, then divide, so that
        micro-batches and processes can be added up first)."""
        rows = energies[valid][:, self.weighting.weighted_mask]
        return rows.sum(dim=0), valid.sum()

    def _stack_channels(self, ce: Tensor, energies: Mapping[str, Tensor]) -> Tensor:
        teacher_channels = self.channels[1:]
        missing = sorted(set(teacher_channels) - set(energies))
        extra = sorted(set(energies) - set(teacher_channels))
        if missing or extra:
            raise ValueError(
                f"energies must match the weighting's channels {teacher_channels}; "
                f"missing {missing}, unexpected {extra}"
            )
        columns = [ce] + [energies[name] for name in teacher_channels]
        for name, column in zip(self.channels, columns):
            if column.shape != ce.shape or ce.dim() != 1:
                raise ValueError(
                    f"channel {name!r} must be a per-sample tensor of shape "
                    f"{tuple(ce.shape)}, got {tuple(column.shape)}"
                )
        return torch.stack([at_least_float32(c) for c in columns], dim=1)

    def _item_weights(self, counts: Tensor, valid: Tensor) -> Tensor:
        if self.reduction == "token":
            return counts.float() * valid
        return valid.float()


def summarize(
    channels: list[str], losses: Tensor, out: WeightingOutput, valid: Tensor, prefix: str = ""
) -> dict[str, float]:
    """Per channel: mean energy, beta mean/min/max/std, weighted and regulariser terms,
    and the share of betas at a bound, over the valid samples; where a trust, the
    reliability or a channel gain multiplied the betas, also the learned betas' mean
    (before the factor) and the factor's mean."""
    metrics: dict[str, float] = {}
    if not bool(valid.any()):
        return metrics
    rows = valid.nonzero().squeeze(1)
    for k, name in enumerate(channels):
        beta = out.betas[rows, k].float()
        metrics[f"{prefix}{name}/energy"] = float(losses[rows, k].detach().mean())
        metrics[f"{prefix}{name}/beta_mean"] = float(beta.mean())
        metrics[f"{prefix}{name}/beta_min"] = float(beta.min())
        metrics[f"{prefix}{name}/beta_max"] = float(beta.max())
        metrics[f"{prefix}{name}/beta_std"] = float(beta.std(unbiased=False))
        metrics[f"{prefix}{name}/weighted"] = float(out.weighted[rows, k].detach().mean())
        metrics[f"{prefix}{name}/regulariser"] = float(out.regulariser[rows, k].detach().mean())
        metrics[f"{prefix}{name}/at_bound"] = float(out.at_bound[rows, k].float().mean())
        learned = None if out.learned_betas is None else out.learned_betas[rows, k].float()
        if learned is not None and not torch.equal(learned, beta):
            # A trust, reliability or gain multiplied beta: the regulariser is that of the
            # learned beta, so both are logged (docs/training.md, reading the logs).
            metrics[f"{prefix}{name}/beta_learned_mean"] = float(learned.mean())
            metrics[f"{prefix}{name}/trust_mean"] = float((beta / learned).mean())
    return metrics


@dataclass
class ChannelValues:
    """One micro-batch's unweighted channels: what the objective weighs."""

    ce: Tensor  # [B]
    energies: dict[str, Tensor]  # teacher channel -> [B]
    representation: Tensor | None  # [B, D] for an instance weighting
    counts: Tensor  # [B] supervised answer tokens per sample
    # Teacher's NLL of the answers, for data trust: [B], or [B, K] per weighted channel.
    teacher_nll: Tensor | None = None
    # The student's image encoder output of this pass (not weighed): a second pass over
    # the same images reuses it (betakd.models.with_image_outputs).
    image_outputs: object = None

    def detached(self) -> ChannelValues:
        return ChannelValues(
            self.ce.detach(),
            {name: value.detach() for name, value in self.energies.items()},
            _maybe(self.representation, Tensor.detach),
            self.counts,
            _maybe(self.teacher_nll, Tensor.detach),
        )

    def rows(self, index: Tensor) -> ChannelValues:
        """The values of rows ``index`` only."""
        return ChannelValues(
            self.ce[index],
            {name: value[index] for name, value in self.energies.items()},
            _maybe(self.representation, lambda r: r[index]),
            self.counts[index],
            _maybe(self.teacher_nll, lambda n: n[index]),
        )


def _maybe(value: Tensor | None, fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    return None if value is None else fn(value)


GENERATED_CE = ("data", "none")


def with_generated(
    data: ChannelValues, generated: ChannelValues, rows: Tensor, ce: str
) -> ChannelValues:
    """One micro-batch's values when rows ``rows`` were answered by the student: their
    energies and representation from ``generated`` (the student's answers, in row order
    of ``rows``), everything else from ``data`` (the data's answers to the same prompts).

    ``ce``: ``data`` keeps the data answer's CE for every row (Beta-KD's unweighted data
    term keeps its meaning); ``none`` gives student-answered rows no CE (GKD's loss). A
    row's token count (its weight under token reduction, and whether it counts) stays the
    data answer's, as the trainer's normaliser counts the data's answer tokens.
    """
    if ce not in GENERATED_CE:
        raise ValueError(f"ce must be one of {GENERATED_CE}, got {ce!r}")
    energies = {
        name: value.index_copy(0, rows, generated.energies[name].to(value.dtype))
        for name, value in data.energies.items()
    }
    representation = data.representation
    if representation is not None:
        representation = representation.index_copy(
            0, rows, generated.representation.to(representation.dtype)
        )
    ce_values = data.ce if ce == "data" else data.ce.index_fill(0, rows, 0.0)
    return replace(data, ce=ce_values, energies=energies, representation=representation)
