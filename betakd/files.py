"""Files on disk: writes that are either complete or absent, and content digests.

Atomic writes go to a temporary name, are synced, then renamed.

A reader (or a resumed run) never sees a half-written file: the temporary name starts
with a dot and ends with ``TMP_SUFFIX``, so it never matches what readers look for, and
``os.replace`` is atomic. The data is flushed to disk before the rename, so after a
crash the new name holds the whole file or the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """Where ``path`` is written before the rename (unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary_path)`` writes the file; it then replaces ``path`` in one step."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data, *, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent))


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files an interrupted writer left behind in ``folder``."""
    return sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """SHA-256 over the names and contents of a folder's files (not subfolders or dot-files).

    Identifies a saved model (weights, config, tokenizer) wherever the folder
    lives; reading the weights once costs about a second per GB.
    """
    digest = hashlib.sha256()
    for path in sorted(
        p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")
    ):
        digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()
