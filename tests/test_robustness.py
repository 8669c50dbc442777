"""A run killed with SIGKILL resumes from its last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kd_configs import write_kd_config
from transformers import AutoModelForImageTextToText

from betakd.checkpoints import COMPLETE_MARKER


def test_sigkill_then_resume_uses_the_last_complete_checkpoint(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    out = tmp_path / "run"
    config = write_kd_config(
        tmp_path / "c.yaml",
        llava_pair,
        data,
        images,
        out,
        max_steps=8,
        save_strategy="steps",
        save_steps=1,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "betakd.cli", "train", str(config)]
    process = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2" / COMPLETE_MARKER).is_file():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    # A checkpoint that was being written when the process died: files, but no marker.
    half = out / "checkpoint-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"truncated")
    complete = [p for p in out.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    last = max(complete, key=lambda p: int(p.name.split("-")[1]))

    refused = subprocess.run(train, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    resumed = subprocess.run([*train, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed student and head from {last}" in resumed.stderr
    assert "ignoring incomplete checkpoint" in resumed.stderr and "checkpoint-999" in resumed.stderr
    state = (out / "checkpoint-8" / "trainer_state.json").read_text()
    assert '"global_step": 8' in state
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "llava"
