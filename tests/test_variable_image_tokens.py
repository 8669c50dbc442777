"""Image-token counts that differ per sample within a batch and between teacher and
student: LLaVA-NeXT and LLaVA-OneVision (any-resolution tiles), InternVL (dynamic tiles),
Idefics3 with image splitting on (SmolVLM's processors split by default), and Gemma 3
(a fixed count per model, the teacher's larger)."""

from __future__ import annotations

import pytest
import torch
from kd_configs import kd_raw

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.eval.runner import generate
from betakd.eval.samples import Sample
from betakd.models import load_model, load_processor

SIZES = [(32, 32), (64, 32), (64, 64), (40, 24)]


@pytest.fixture
def ragged_images(tmp_path, llava_files):
    """Four samples whose images split into different numbers of tiles."""
    records = []
    for i, size in enumerate(SIZES):
        llava_files.write_image(tmp_path / "images" / f"{i}.png", ["red", "blue"][i % 2], size)
        answer = "red" if i % 2 == 0 else "it is blue"
        records.append(llava_files.record(f"r{i}", "What colour?", answer, f"{i}.png"))
    return llava_files.write_records(tmp_path / "data.json", records), tmp_path / "images"


# Counts that follow each image's size; Gemma 3 (pan and scan off) has a fixed count per
# model, the teacher's 4x the student's.
RAGGED = ["llava_next", "llava_onevision", "internvl", "idefics3_split"]
FAMILIES = [*RAGGED, "gemma3"]


@pytest.fixture(params=FAMILIES)
def split_pair(request, tiny_model_dir):
    """A student and a teacher of the family (the teacher's patches are half as wide)."""
    student = tiny_model_dir(request.param, "student")
    return student, tiny_model_dir(request.param, "teacher"), request.param


def image_token_counts(trainer, batch, key=None):
    adapter = trainer.distillation_module.adapter
    ids = batch["input_ids"] if key is None else batch[key][None]["input_ids"]
    return (ids == adapter.image_token_id).sum(dim=1).tolist()


def test_a_batch_with_ragged_image_tokens_equals_each_sample_alone(
    split_pair, ragged_images, tmp_path
):
    """CE, logit and feature energies of a batch whose samples (and whose teacher) have
    different image-token counts equal those of each sample computed alone."""
    data, images = ragged_images
    *pair, family = split_pair
    config = cfg.validate(kd_raw(pair, data, images, tmp_path / "out", "task"))
    trainer = build_trainer(config, training_arguments(config))
    module = trainer.distillation_module
    rows = [trainer.train_dataset[i] for i in range(len(SIZES))]
    batch = trainer.data_collator(rows)
    student_counts = image_token_counts(trainer, batch)
    teacher_counts = image_token_counts(trainer, batch, "teacher")
    assert (len(set(student_counts)) > 1) == (family in RAGGED), student_counts
    assert all(t > s for s, t in zip(student_counts, teacher_counts, strict=True))
    with torch.no_grad():
        together = module.channel_values(*trainer.loss_inputs(batch))
        alone = [
            module.channel_values(*trainer.loss_inputs(trainer.data_collator([row])))
            for row in rows
        ]
    torch.testing.assert_close(together.ce, torch.cat([a.ce for a in alone]))
    for name in ("cosine_probs", "visual"):
        torch.testing.assert_close(
            together.energies[name],
            torch.cat([a.energies[name] for a in alone]),
            atol=1e-5,
            rtol=1e-4,
        )
    # The answer tokens align exactly: the same count per sample as alone.
    torch.testing.assert_close(together.counts, torch.cat([a.counts for a in alone]))


def test_generation_of_a_ragged_batch_equals_one_sample_at_a_time(split_pair, ragged_images):
    data, images = ragged_images
    model, processor = load_model(split_pair[0]), load_processor(split_pair[0])
    samples = [Sample(f"q{i}", "What colour?", str(images / f"{i}.png")) for i in range(4)]
    batched = generate(model, processor, samples, batch_size=4, max_new_tokens=3, progress=False)
    single = generate(model, processor, samples, batch_size=1, max_new_tokens=3, progress=False)
    assert [p["text"] for p in batched] == [p["text"] for p in single]
