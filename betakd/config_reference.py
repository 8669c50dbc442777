"""docs/config.md, generated from the config schema (`betakd.config.TrainConfig`).

    python -m betakd.config_reference > docs/config.md

A test fails when docs/config.md differs from what this prints, so the reference never
drifts from the schema: every key, its type, its default and its help text come from the
pydantic models' fields. The options of each weighting (``weighting.options``, parsed by
the weighting's name) get a table per weighting kind, and their nested groups (``trust``,
``reliability``) one table each.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from betakd import weighting
from betakd.config import TrainConfig

HEADER = """# Config reference

Every key of a `betakd train` config (also read by `betakd cache-teacher` and `betakd
audit`), generated from the schema in `betakd/config.py` by `python -m
betakd.config_reference > docs/config.md` (a test checks it is current). `[]` marks a list
of such entries. Keys are set in YAML or with `--set key=value`; an unknown key or value is
an error naming it. The options of every weighting (`weighting.options`) are listed after
the `weighting` table, one table per weighting.
"""


def render() -> str:
    """The whole reference: one table per top-level section."""
    lines = [HEADER]
    for name, field in TrainConfig.model_fields.items():
        lines += [f"## `{name}`", "", _text(field.description), ""]
        rows = list(_rows(field.annotation, name))
        if not rows:
            rows = [(name, _type_name(field.annotation), _default(field), _text(field.description))]
        lines += _table(rows)
        for key in _per_weighting_keys(field.annotation, name):
            lines += _weighting_options(key)
    return "\n".join(lines)


def _table(rows) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in rows]
    return [*lines, ""]


def _rows(annotation: Any, prefix: str):
    for model, suffix in _models_in(annotation):
        for name, field in model.model_fields.items():
            key = f"{prefix}{suffix}.{name}"
            if field.annotation is weighting.WeightingOptions:
                yield key, "mapping", _default(field), _text(field.description)
                continue
            yield key, _type_name(field.annotation), _default(field), _text(field.description)
            yield from _rows(field.annotation, key)


def _per_weighting_keys(annotation: Any, prefix: str):
    """The keys under ``prefix`` whose value is parsed by a weighting's name."""
    for model, suffix in _models_in(annotation):
        for name, field in model.model_fields.items():
            key = f"{prefix}{suffix}.{name}"
            if field.annotation is weighting.WeightingOptions:
                yield key
            else:
                yield from _per_weighting_keys(field.annotation, key)


def _weighting_options(key: str) -> list[str]:
    """A table of options per weighting kind, then one per nested group they share."""
    lines = [f"### `{key}`", ""]
    lines += [
        "Parsed by the weighting's `name`: one table per weighting (an option not in its "
        "table is an error naming those that are); `trust` and `reliability` take the keys "
        "of their own tables, after the weightings'. The same options are the keyword "
        "arguments of `betakd.weighting.build(name, channels, **options)`.",
        "",
    ]
    groups: dict[str, type[BaseModel]] = {}
    for name, cls in weighting.WEIGHTINGS.items():
        model = cls.options_model
        lines += [f"#### `{name}`", "", _text(_first_line(model.__doc__)), ""]
        rows = []
        for option in model.option_names():
            field = model.model_fields[option]
            for group, _ in _models_in(field.annotation):
                groups.setdefault(option, group)
            rows.append(
                (option, _type_name(field.annotation), _default(field), _text(field.description))
            )
        lines += _table(rows) if rows else ["No options.", ""]
    for option, group in groups.items():
        lines += [f"#### `{key}.{option}`", "", _text(_first_line(group.__doc__)), ""]
        rows = [
            (f"{option}.{name}", _type_name(f.annotation), _default(f), _text(f.description))
            for name, f in ((n, group.model_fields[n]) for n in group.option_names())
        ]
        lines += _table(rows)
    return lines


def _first_line(doc: str | None) -> str:
    """A docstring's first paragraph in Markdown (without Sphinx cross-references)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    paragraph = re.sub(r" ?\(:class:`[^`]*`\)", "", paragraph)
    return paragraph.replace("``", "`")


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
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"[{', '.join(_type_name(a) for a in args)}]"
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
    if isinstance(field.default, tuple | list):
        return f"`{list(field.default)}`"
    return f"`{field.default}`"


def _text(description: str | None) -> str:
    return (description or "").replace("|", "\\|")


if __name__ == "__main__":
    print(render(), end="")
