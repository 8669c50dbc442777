"""Run `betakd train` for several configs in one multi-process job (used by test_distributed).

Launched as `torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG [CONFIG ...]`; each
config's log history is written by rank 0 next to its output directory.
"""

import json
import sys
from pathlib import Path

from betakd.config import load_config
from betakd.runs import exit_process, release_processes, run_training


def main(paths: list[str]) -> None:
    for path in paths:
        result = run_training(load_config(path))
        if result.trainer.is_world_process_zero():
            history = Path(result.output_dir) / "log_history.json"
            history.write_text(json.dumps(result.log_history))
    if release_processes():
        exit_process()


if __name__ == "__main__":
    main(sys.argv[1:])
