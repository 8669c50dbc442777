"""docs/config.md, generated from the config schema (`betakd.config.TrainConfig`).

    python -m betakd.config_reference > docs/config.md

A test fails when docs/config.md differs from what this prints, so the reference never
drifts from the schema: every key, its type, its default and its help text come from the
pydantic models' fields.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from betakd.config import TrainConfig

HEADER = """# Config reference

Every key of a `betakd train` config (also read by `betakd cache-teacher` and `betakd
audit`), generated from the schema in `betakd/config.py` by `python -m
betakd.config_reference > docs/config.md` (a test checks it is current). `[]` marks a list
of such entries. Keys are set in YAML or with `--set key=value`; an unknown key or value is
an error naming it. Weighting options are listed in docs/library.md.
"""


def render() -> str:
    """The whole reference: one table per top-level section."""
    lines = [HEADER]
    for name, field in TrainConfig.model_fields.items():
        lines += [f"## `{name}`", "", _text(field.description), ""]
        rows = list(_rows(field.annotation, name))
        if not rows:
            rows = [(name, _type_name(field.annotation), _default(field), _text(field.description))]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in rows]
        lines.append("")
    return "\n".join(lines)


def _rows(annotation: Any, prefix: str):
    for model, suffix in _models_in(annotation):
        for name, field in model.model_fields.items():
            key = f"{prefix}{suffix}.{name}"
            yield key, _type_name(field.annotation), _default(field), _text(field.description)
            yield from _rows(field.annotation, key)


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models an annotation holds, with "[]" when inside a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    found = []
    for arg in typing.get_args(annotation):
        inner = _models_in(arg)
        listed = typing.get_origin(annotation) is list
        found += [(model, "[]" if listed else suffix) for model, suffix in inner]
    return found


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "required"
        return "[]" if isinstance(field.default_factory(), list) else "{}"
    if field.default is None:
        return "null"
    return f"`{field.default}`"


def _text(description: str | None) -> str:
    return (description or "").replace("|", "\\|")


if __name__ == "__main__":
    print(render(), end="")
