"""Training configs for tests: tiny student and teacher, cosine_probs + visual feature KD;
and what tests of interrupted runs share."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.distill import HEAD_FILE

# The `training` block of every test config (plus its output_dir).
TRAINING = {
    "per_device_train_batch_size": 2,
    "max_steps": 4,
    "learning_rate": 5e-3,
    "logging_steps": 1,
    "use_cpu": True,
    "seed": 0,
    "save_strategy": "no",
    "disable_tqdm": True,
    "report_to": "none",
}


def kd_raw(pair, data, images, out, weighting="task", options=None, **training) -> dict:
    """A raw config dict; ``images=None`` means text-only data (no feature channel)."""
    features = [{"name": "visual", "energy": "mse"}] if images is not None else []
    return {
        "student": {"path": str(pair[0])},
        "teacher": {"path": str(pair[1])},
        "data": {"train_file": str(data), "image_folder": images and str(images)},
        "channels": {"logits": [{"energy": "cosine_probs"}], "features": features},
        "weighting": {"name": weighting, "options": dict(options or {})},
        "training": {"output_dir": str(out), **TRAINING, **training},
    }


def kd_config(pair, data, images, out, weighting="task", options=None, **training):
    return cfg.validate(kd_raw(pair, data, images, out, weighting, options, **training))


def write_kd_config(path: Path, *args, **kwargs) -> Path:
    """The same config as YAML, for the command line."""
    path.write_text(cfg.yaml.safe_dump(kd_raw(*args, **kwargs)))
    return path


class StopAfter(TrainerCallback):
    """Simulates a crash right after step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def final_state(out: Path):
    """The saved student's and head's tensors of a finished run."""
    return load_file(out / "model.safetensors"), load_file(out / HEAD_FILE)


def assert_same_final_state(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Two finished runs saved the same student and head (``atol`` 0: bit for bit)."""
    for saved_a, saved_b in zip(final_state(a), final_state(b), strict=True):
        assert saved_a.keys() == saved_b.keys()
        for key, value in saved_a.items():
            torch.testing.assert_close(saved_b[key], value, rtol=0, atol=atol, msg=key)


def losses_on_repeated_batch(config, steps=6):
    """Manual optimisation of one batch through the trainer's own loss and optimizer."""
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    optimizer = trainer.create_optimizer()
    num_items = trainer.num_items([batch], torch.device("cpu"))
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        optimizer.step()
        values.append(float(loss))
    return values, trainer
