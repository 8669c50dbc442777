"""Feature energies: student features against teacher features through a learned adapter.

The teacher's features live in another width; a linear adapter maps them to the
student's width (teacher dim -> student dim) and trains with the weighting
parameters. The energy is per sample (``[B]``), the mean over that sample's tokens,
so that instance-level betas can weigh samples against each other.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from betakd.energies import cosine_distance

FeatureEnergyFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


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
            f"student features {tuple(student.shape)} and adapted teacher features "
            f"{tuple(teacher.shape)} differ in shape; pool the token grids and adapt the width first"
        )


class FeatureChannel(nn.Module):
    """A feature-KD channel: a linear adapter (teacher width -> student width) and an energy.

    The teacher side is detached: the teacher is frozen, only the adapter learns.
    """

    def __init__(self, teacher_dim: int, student_dim: int, energy: str = "mse") -> None:
        super().__init__()
        self.energy_name = energy
        self.energy = get(energy)
        self.adapter = nn.Linear(teacher_dim, student_dim)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        adapted = self.adapter(teacher.detach().to(self.adapter.weight.dtype))
        return self.energy(student, adapted, mask)
