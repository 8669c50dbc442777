"""The weightings by name: their options models, parsing options, building one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from betakd.weighting import kinds
from betakd.weighting.base import Weighting
from betakd.weighting.options import KindOptions

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


def options_model(name: str) -> type[KindOptions]:
    """The model a weighting's options are parsed into."""
    if name not in WEIGHTINGS:
        raise KeyError(f"unknown weighting {name!r}; available: {', '.join(names())}")
    return WEIGHTINGS[name].options_model


def options_of(name: str) -> list[str]:
    """The options a weighting accepts, its own first."""
    return options_model(name).option_names()


def parse_options(name: str, options: Mapping[str, Any] | KindOptions) -> KindOptions:
    """A weighting's options (plain values, or already parsed ones) as its options model.

    An unknown or missing option raises TypeError (as a wrong keyword argument does),
    any other invalid value ValueError; both name the weighting and the option."""
    model = options_model(name)
    if isinstance(options, model):
        return options
    if isinstance(options, KindOptions):
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate(dict(options))
    except ValidationError as err:
        problems = err.errors()
        message = "; ".join(_located(e) for e in problems)
        wrong_keyword = any(
            (e["type"] == "unknown_options" and not e["loc"])
            or (e["type"] == "missing" and len(e["loc"]) == 1)
            for e in problems
        )
        raise (TypeError if wrong_keyword else ValueError)(
            f"weighting {name!r}: {message}"
        ) from err


def build(name: str, channels: Sequence[str], **options: Any) -> Weighting:
    """Build a weighting by name from its options (plain values as in a config, or parsed
    option objects); unknown names or options raise with what is accepted."""
    parsed = parse_options(name, options)
    try:
        return WEIGHTINGS[name](channels, parsed)
    except TypeError as err:
        raise TypeError(f"weighting {name!r}: {err}") from err


def _located(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "missing required option"
    key = ".".join(str(part) for part in error["loc"])
    return f"{key}: {message}" if key else message
