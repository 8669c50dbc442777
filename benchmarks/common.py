"""What the benchmark scripts share: argument types and number formatting.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable


def names(allowed: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from ``allowed`` (a bad name is
    a usage error, not a traceback)."""

    def parse(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)"
            )
        return chosen

    return parse


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def run_worker(worker: str) -> dict:
    """This script again, with its arguments and ``--worker WORKER``, in a fresh process
    (a clean memory high-water mark); returns the JSON of its last printed line."""
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:], "--worker", worker]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
