"""Start-up time of the `betakd` command line, next to Python's and torch's own.

Runs each command several times in fresh processes, interleaved so that machine noise
hits them alike, and prints the median wall time of each and its ratio to a bare
`python -c pass`. `import torch` is the reference for what a command costs when it
imports the training stack at start. Target: every `--help` under 1 s.

    python benchmarks/cli_startup.py            # about half a minute on 2 CPU cores
    python benchmarks/cli_startup.py --runs 10

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

BETAKD = [sys.executable, "-m", "betakd.cli"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "betakd --help": [*BETAKD, "--help"],
    "betakd --version": [*BETAKD, "--version"],
    "betakd train --help": [*BETAKD, "train", "--help"],
    "betakd eval --help": [*BETAKD, "eval", "--help"],
    "betakd cache-teacher --help": [*BETAKD, "cache-teacher", "--help"],
    "betakd demo --help": [*BETAKD, "demo", "--help"],
}
TARGET_SECONDS = 1.0


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():
        wall_time(command)  # warm the file cache; not counted
    for _ in range(args.runs):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["python -c pass"]
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s  x python  target")
    for name, median in medians.items():
        target = ""
        if name.startswith("betakd"):
            target = "ok" if median < TARGET_SECONDS else f"MISSED (< {TARGET_SECONDS} s)"
        print(f"{name:<{width}}  {median:8.3f}  {median / base:8.1f}  {target}")
    print(json.dumps({"runs": args.runs, "median_seconds": medians, "all_seconds": times}))


if __name__ == "__main__":
    main()
