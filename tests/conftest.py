"""Shared fixtures: one tokenizer, tiny saved models, LLaVA-format data on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing may come from the Hugging Face hub during tests.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer (vocab 512) shared by every tiny model."""
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Callable[..., Path]:
    """`tiny_model_dir(family, size="student", **dims)` -> a saved model dir (cached)."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def make(family: str, size: str = "student", **kw) -> Path:
        key = (family, size, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([family, size, *(f"{k}{v}" for k, v in sorted(kw.items()))])
            cache[key] = save_tiny_model(family, root / name, tiny_tokenizer, size=size, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llava_pair(tiny_model_dir) -> tuple[Path, Path]:
    """(student, teacher) LLaVA dirs: 16 vs 64 image tokens, widths 16 vs 32."""
    return tiny_model_dir("llava", "student"), tiny_model_dir("llava", "teacher")


def write_image(path: Path, colour: str = "red", size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def record(sample_id: str, question: str, answer: str, image: str | None = "img.png") -> dict:
    human = f"<image>\n{question}" if image else question
    out = {
        "id": sample_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
    }
    if image:
        out["image"] = image
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llava_files() -> SimpleNamespace:
    """Helpers to write LLaVA-format data: `record`, `write_image`, `write_records`.

    A fixture rather than imports, because `from conftest import ...` is
    ambiguous once sub-folders have their own conftest.py.
    """
    return SimpleNamespace(record=record, write_image=write_image, write_records=write_records)


@pytest.fixture
def vqa_data(tmp_path) -> tuple[Path, Path]:
    """Six clean single-turn samples with images; returns (json file, image folder)."""
    images = tmp_path / "images"
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red", "green", "blue"]):
        write_image(images / f"{i}.png", colour)
        question = (
            "What colour is the shape?" if i % 2 == 0 else "Is the shape red? Answer yes or no."
        )
        answer = colour if i % 2 == 0 else ("yes" if colour == "red" else "no")
        records.append(record(f"s{i}", question, answer, f"{i}.png"))
    return write_records(tmp_path / "data.json", records), images


@pytest.fixture(scope="session")
def sixteen_samples(tmp_path_factory):
    """Sixteen single-turn samples with ragged answer lengths; returns (json, image folder)."""
    root = tmp_path_factory.mktemp("sixteen")
    records = []
    for i in range(16):
        colour = list(COLOURS)[i % 3]
        write_image(root / f"{i}.png", colour, (32, 32))
        question = "What colour is the shape?" if i % 2 else "Describe the colour, briefly."
        answer = colour if i % 2 else f"it is {colour}"  # ragged answer lengths
        records.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return write_records(root / "data.json", records), root
