"""The weightings by name: building one from its options, listing its options."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from betakd.weighting import kinds
from betakd.weighting.base import Weighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": kinds.EqualWeighting,
    "fixed": kinds.FixedWeighting,
    "task": kinds.TaskWeighting,
    "instance": kinds.InstanceWeighting,
    "closed_form": kinds.ClosedFormWeighting,
    "reference": kinds.ReferenceWeighting,
}


def names() -> list[str]:
    return sorted(WEIGHTINGS)


def build(name: str, channels: Sequence[str], **options: object) -> Weighting:
    """Build a weighting by name; unknown names or options raise with what is accepted."""
    if name not in WEIGHTINGS:
        raise KeyError(f"unknown weighting {name!r}; available: {', '.join(names())}")
    cls = WEIGHTINGS[name]
    accepted = options_of(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"weighting {name!r}: unknown option(s) {unknown}; its options: {', '.join(accepted)}"
        )
    try:
        return cls(channels, **options)
    except TypeError as err:
        raise TypeError(f"weighting {name!r}: {err}") from err


def options_of(name: str) -> list[str]:
    """The options a weighting accepts (its constructor's keyword arguments)."""
    parameters = inspect.signature(WEIGHTINGS[name].__init__).parameters
    return [p for p in parameters if p not in ("self", "channels")]
