"""Feature energies: student features against teacher features through a learned adapter.

The two models' features live in different widths, so a linear adapter maps one onto
the other and trains with the weighting parameters. Where the adapter sits decides
whether the target of the energy can move:

* ``adapter="student"`` (default, FitNets' regressor): the adapter maps the *student's*
  features into the teacher's width and the teacher's features are the target,
  untouched. The target is fixed, so the energy is low only if the student's features
  carry what the teacher's do: a student whose features are constant cannot get below
  the teacher features' variance, whatever the adapter does.
* ``adapter="teacher"`` (the authors' reference code): the adapter maps the *teacher's*
  features into the student's width. The target moves with the adapter: shrinking the
  adapter's output and the student's features towards one constant drives the energy
  to zero without transferring anything, and a learned or closed-form beta rewards
  exactly that (measured on the demo: docs/weighting.md).

``normalize=True`` standardises every token of both sides over the feature dimension
(a layer norm without parameters) before the energy, so the energy compares feature
*patterns*, not scales, and no side can lower it by shrinking.

The energy is per sample (``[B]``), the mean over that sample's tokens, so that
instance-level betas can weigh samples against each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from betakd.energies import cosine_distance

FeatureEnergyFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
ADAPTER_SIDES = ("student", "teacher")


def masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of ``[B, n]`` values, counting only ``mask`` tokens."""
    if mask is None:
        return per_token.mean(dim=-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)


def feature_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean over tokens of the mean squared error over the feature dimension."""
    _check_shapes(student, teacher)
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return masked_token_mean(per_token, mask)


def feature_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean over tokens of 1 - cos(student token, teacher token)."""
    _check_shapes(student, teacher)
    per_token = cosine_distance(student.float(), teacher.float())
    return masked_token_mean(per_token, mask)


FEATURE_ENERGIES: dict[str, FeatureEnergyFn] = {"mse": feature_mse, "cosine": feature_cosine}


def get(name: str) -> FeatureEnergyFn:
    """A feature energy by name (``mse`` or ``cosine``)."""
    if name not in FEATURE_ENERGIES:
        raise KeyError(
            f"unknown feature energy {name!r}; registered: {', '.join(sorted(FEATURE_ENERGIES))}"
        )
    return FEATURE_ENERGIES[name]


def _check_shapes(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"adapted student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} differ in shape; pool the token grids and adapt the width first"
        )


def standardize(tokens: Tensor, eps: float = 1e-5) -> Tensor:
    """Every token to zero mean and unit variance over the feature dimension."""
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)


class FeatureChannel(nn.Module):
    """A feature-KD channel: a linear adapter between the two widths and an energy.

    The teacher side is always detached: the teacher is frozen. See the module
    docstring for ``adapter`` (which side the adapter maps) and ``normalize``.
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        energy: str = "mse",
        *,
        adapter: str = "student",
        normalize: bool = False,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if adapter not in ADAPTER_SIDES:
            raise ValueError(f"adapter must be one of {ADAPTER_SIDES}, got {adapter!r}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.energy_name = energy
        self.energy = get(energy)
        self.adapter_side = adapter
        self.normalize = normalize
        self.rank = rank
        d_in, d_out = (
            (student_dim, teacher_dim) if adapter == "student" else (teacher_dim, student_dim)
        )
        if rank is None:
            self.adapter = nn.Linear(d_in, d_out)
        else:
            # A rank-r map: only an r-dimensional projection of the input is matched.
            self.adapter = nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.adapter.parameters()).dtype

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach().to(self.dtype)
        if self.adapter_side == "student":
            student = self.adapter(student.to(self.dtype))
        else:
            teacher = self.adapter(teacher)
        if self.normalize:
            student, teacher = standardize(student), standardize(teacher)
        return self.energy(student, teacher, mask)

    def extra_repr(self) -> str:
        return f"energy={self.energy_name!r}, adapter={self.adapter_side!r}, normalize={self.normalize}"
