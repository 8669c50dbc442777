"""Two CPU processes (gloo DDP) equal one process with the doubled batch.

Marked `distributed`: run alone with `pytest -m distributed`. The processes are started
with torchrun, the launcher accelerate itself uses for multi-process jobs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kd_configs import kd_raw, write_kd_config
from safetensors.torch import load_file

from betakd import config as cfg
from betakd.distill import HEAD_FILE
from betakd.runs import run_training

pytestmark = pytest.mark.distributed

WEIGHTINGS = {"equal": {}, "task": {}, "instance": {"hidden": 8}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, pair, data, images, out: Path, weighting: str, batch: int) -> Path:
    return write_kd_config(
        path, pair, data, images, out, weighting, WEIGHTINGS[weighting],
        per_device_train_batch_size=batch, max_steps=3, learning_rate=1e-2,
    )  # fmt: skip


def test_ddp_two_processes_equal_one_process_with_double_batch(
    llava_pair, sixteen_samples, tmp_path
):
    data, images = sixteen_samples
    multi = [
        write_config(
            tmp_path / f"{w}-ddp.yaml", llava_pair, data, images, tmp_path / f"{w}-ddp", w, 2
        )
        for w in WEIGHTINGS
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(Path(__file__).with_name("ddp_worker.py")),
        *map(str, multi),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for weighting in WEIGHTINGS:
        single_path = write_config(
            tmp_path / f"{weighting}-one.yaml", llava_pair, data, images,
            tmp_path / f"{weighting}-one", weighting, 4,
        )  # fmt: skip
        single = run_training(cfg.load_config(single_path))
        ddp_history = json.loads((tmp_path / f"{weighting}-ddp" / "log_history.json").read_text())
        losses_ddp = [h["loss"] for h in ddp_history if "loss" in h]
        losses_one = [h["loss"] for h in single.log_history if "loss" in h]
        assert len(losses_ddp) == 3
        assert losses_ddp == pytest.approx(losses_one, abs=1e-4), weighting
        head_ddp = load_file(tmp_path / f"{weighting}-ddp" / HEAD_FILE)
        head_one = load_file(tmp_path / f"{weighting}-one" / HEAD_FILE)
        for key, value in head_one.items():
            torch.testing.assert_close(head_ddp[key], value, rtol=0, atol=1e-4)


def test_ddp_on_policy_steps_equal_one_process_with_double_batch(
    llava_pair, sixteen_samples, tmp_path
):
    """Student-answered rows under DDP: each process generates its own rows' answers
    (greedy, so a sample's answer does not depend on its batch) and the per-sample choice
    follows the samples, so 2 x 2 equals 1 x 4."""
    data, images = sixteen_samples
    policy = {"mode": "mixed", "student_fraction": 0.5, "per": "sample",
              "generation": {"max_new_tokens": 4, "temperature": 0.0}}  # fmt: skip
    paths = {}
    for name, batch in (("ddp", 2), ("one", 4)):
        raw = kd_raw(llava_pair, data, images, tmp_path / name, "instance", {"hidden": 8},
                     per_device_train_batch_size=batch, max_steps=3, learning_rate=1e-2)  # fmt: skip
        raw["policy"] = policy
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(cfg.yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(Path(__file__).with_name("ddp_worker.py")),
        str(paths["ddp"]),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = run_training(cfg.load_config(paths["one"]))
    ddp_history = json.loads((tmp_path / "ddp" / "log_history.json").read_text())
    losses_ddp = [h["loss"] for h in ddp_history if "loss" in h]
    assert losses_ddp == pytest.approx(
        [h["loss"] for h in single.log_history if "loss" in h], abs=1e-4
    )
    assert any(0 < h["on_policy/share"] for h in ddp_history if "on_policy/share" in h)
    head_ddp, head_one = (load_file(tmp_path / n / HEAD_FILE) for n in ("ddp", "one"))
    for key, value in head_one.items():
        torch.testing.assert_close(head_ddp[key], value, rtol=0, atol=1e-4)


def test_fsdp_on_cpus_is_refused_rather_than_run_as_ddp(llava_pair, sixteen_samples, tmp_path):
    """accelerate enables FSDP on accelerators only; on CPU processes it would quietly
    train data parallel, so betakd stops with one line that says so."""
    data, images = sixteen_samples
    path = write_kd_config(
        tmp_path / "fsdp.yaml", llava_pair, data, images, tmp_path / "fsdp", "task", {},
        per_device_train_batch_size=2, max_steps=1, fsdp="full_shard",
        fsdp_config={"fsdp_version": 2},
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "betakd.cli", "train", str(path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "Error: training.fsdp is set, but accelerate runs this job as MULTI_CPU" in (
        done.stderr + done.stdout
    ), done.stderr[-3000:]


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "betakd.cli", "train", *args,
    ]  # fmt: skip


def test_ddp_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(
    llava_pair, sixteen_samples, tmp_path
):
    """Both processes killed (SIGKILL to the launcher's process group) after a complete
    checkpoint; `--resume` on two processes ends where an uninterrupted run ends."""
    import signal
    import time

    from betakd.checkpoints import COMPLETE_MARKER

    data, images = sixteen_samples
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 6}

    def config(name: str) -> Path:
        return write_kd_config(
            tmp_path / f"{name}.yaml", llava_pair, data, images, tmp_path / name, "instance",
            WEIGHTINGS["instance"], per_device_train_batch_size=2, learning_rate=1e-2, **extra,
        )  # fmt: skip

    straight = subprocess.run(
        torchrun(str(config("straight"))), env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_config = config("killed")
    process = subprocess.Popen(
        torchrun(str(killed_config)), env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    marker = tmp_path / "killed" / "checkpoint-2" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.is_file():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "finished before the kill"

    resumed = subprocess.run(
        torchrun(str(killed_config), "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", HEAD_FILE):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
