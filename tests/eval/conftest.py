"""Fixtures for the evaluation tests: a tiny saved LLaVA and small image files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    # The test machines are small and shared; the other tests keep the default count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llava_path(tiny_model_dir):
    """A randomly initialised LLaVA (CLIP + Llama) saved with save_pretrained."""
    # Two layers and width 64: enough that outputs differ between prompts.
    return tiny_model_dir("llava", "student", hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_path):
    """(model, processor) loaded back through the Auto classes, float32, eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_llava_path)


def _write_images(folder, names, size=32, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        path = folder / name
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def write_images():
    """`write_images(folder, names)` writes random RGB images and returns their paths."""
    return _write_images
