"""JSON / JSONL reading and writing with errors that name the file and line.

Every benchmark file and every predictions file goes through here, so a
malformed line is reported the same way everywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """A benchmark or predictions file does not have the expected content."""


class PredictionsMismatch(EvalDataError):
    """A predictions file holds answers of another model or other settings."""


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-blank line; records must be objects."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{number}: invalid JSON: {err.msg}") from err
            if not isinstance(record, dict):
                raise EvalDataError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                )
            yield number, record


def require(record: Mapping, key: str, where: str) -> Any:
    """`record[key]`, or an error naming `where` (e.g. "file.jsonl:12") and the key."""
    if key not in record:
        raise EvalDataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    return record[key]


def question_id(value: Any, where: str) -> str:
    """Question ids are compared as strings: the benchmarks mix ints and strings."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvalDataError(f"{where}: question_id must be a string or integer, got {value!r}")
    return str(value)


def append_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """Append records and flush, so an interrupted run keeps every finished batch."""
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def drop_torn_last_line(path: Path) -> None:
    """Remove a last line that a killed process left without its newline.

    Records are written whole and newline-terminated, so a last line without a
    newline can only be a write cut short; it is dropped (with a warning) so the
    resumed run regenerates that sample. Earlier lines are never touched.
    """
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    logger.warning("%s: dropping an incomplete last line left by an interrupted run", path)
    with path.open("r+b") as handle:
        handle.truncate(keep)


def load_predictions(source: str | Path | Mapping[str, str] | Iterable[Mapping]) -> dict[str, str]:
    """Predictions as `{question_id: text}` from a JSONL path, records, or a mapping.

    Records use the LLaVA answer-file fields `question_id` and `text`. A
    question id that appears twice is an error: which answer counts would be
    ambiguous. So are records of different `producer`s (another model's answers).
    """
    if isinstance(source, Mapping):
        return {
            question_id(k, "predictions"): _text(v, f"predictions[{k!r}]")
            for k, v in source.items()
        }
    if isinstance(source, (str, Path)):
        numbered = ((f"{source}:{n}", r) for n, r in iter_jsonl(source))
    else:
        numbered = ((f"predictions[{i}]", r) for i, r in enumerate(source))
    predictions: dict[str, str] = {}
    first_producer: tuple[str, Any] | None = None
    for where, record in numbered:
        qid = question_id(require(record, "question_id", where), where)
        if qid in predictions:
            raise EvalDataError(f"{where}: duplicate question_id {qid!r}")
        predictions[qid] = _text(require(record, "text", where), where)
        # One score, one model: answers `betakd eval` wrote for two models never mix.
        producer = record.get("producer")
        if first_producer is None:
            first_producer = (where, producer)
        elif producer != first_producer[1]:
            raise EvalDataError(
                f"{where}: answer of another model or other settings than at "
                f"{first_producer[0]} (producer {producer!r} vs {first_producer[1]!r})"
            )
    return predictions


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EvalDataError(f"{where}: prediction text must be a string, got {value!r}")
    return value
