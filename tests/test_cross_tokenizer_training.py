"""Training with a teacher of another tokenizer (aligned by text), end to end."""

from __future__ import annotations

import math

import pytest
import torch
from kd_configs import TRAINING, StopAfter, assert_same_final_state, final_state
from transformers import AutoTokenizer

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.cache_cli import cache_teacher
from betakd.models import ModelError
from betakd.runs import OutputDirError, run_training
from betakd.teachers import BatchMeta
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import DEFAULT_TEXTS, train_tokenizer

ANSWERS = (
    "The shape is reddish.",
    "A green triangle, drawn small.",
    "It is blue; the colour is clear.",
    "red",
)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    """Other merges and a smaller vocabulary than the students' (conftest's)."""
    texts = (*DEFAULT_TEXTS[::-1], "redder reddish shapes colours drawn clearly")
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory, teacher_tokenizer):
    """Tiny LLaVA and Llama teachers with the other tokenizer, by family."""
    root = tmp_path_factory.mktemp("other_tokenizer")
    return {
        family: save_tiny_model(family, root / family, teacher_tokenizer, size="teacher")
        for family in ("llava", "llama")
    }


@pytest.fixture(scope="module")
def sentence_data(tmp_path_factory, llava_files):
    """Sixteen samples with sentence answers (several tokens per word, split differently
    by the two tokenizers), with images and without; returns {family: (file, images)}."""
    root = tmp_path_factory.mktemp("sentences")
    with_images, text_only = [], []
    for i in range(16):
        llava_files.write_image(root / f"{i}.png", ["red", "green", "blue"][i % 3], (32, 32))
        answer = ANSWERS[i % len(ANSWERS)]
        with_images.append(llava_files.record(f"s{i}", "Describe the shape.", answer, f"{i}.png"))
        text_only.append(llava_files.record(f"t{i}", f"Describe shape {i}.", answer, None))
    return {
        "llava": (llava_files.write_records(root / "images.json", with_images), root),
        "llama": (llava_files.write_records(root / "text.json", text_only), None),
    }


def config_for(
    student, teacher, data, out, *, cross=True, weighting="task", loss="hybrid", **training
):
    raw = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher), **({"cross_tokenizer": {"loss": loss}} if cross else {})},
        "data": {"train_file": str(data[0]), "image_folder": data[1] and str(data[1])},
        "channels": {"logits": [{"energy": "jsd"}]},
        "weighting": {"name": weighting},
        "training": {"output_dir": str(out), **TRAINING, "max_steps": 2, **training},
    }
    if weighting == "fixed":
        raw["weighting"]["options"] = {"weights": {"jsd": 2.0}}
    if weighting == "recommended":
        raw["weighting"] = {
            "name": "instance",
            "representation": "teacher_confidence",
            "options": {
                "hidden": 8,
                "prior_shape": 3.0,
                "prior_rate_scale": 0.5,
                "reliability": {},
            },
        }
    return cfg.validate(raw)


def losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


@pytest.mark.parametrize("loss", ["prefix", "hybrid"])
def test_the_same_tokenizer_through_text_alignment_is_the_same_run(
    loss, llava_pair, sentence_data, tmp_path
):
    """One vocabulary on both sides: every group is one token, the loss the energy
    itself, so the whole run equals the same-tokenizer run."""
    data = sentence_data["llava"]
    plain = run_training(config_for(*llava_pair, data, tmp_path / "a", cross=False, max_steps=3))
    aligned = run_training(config_for(*llava_pair, data, tmp_path / "b", loss=loss, max_steps=3))
    assert losses(aligned) == pytest.approx(losses(plain), abs=1e-6)
    assert_same_final_state(tmp_path / "a", tmp_path / "b", atol=1e-6)


def test_groups_of_a_batch_cover_the_same_text(
    tiny_model_dir, other_teachers, sentence_data, teacher_tokenizer, tiny_tokenizer, tmp_path
):
    config = config_for(
        tiny_model_dir("llava"), other_teachers["llava"], sentence_data["llava"], tmp_path / "o"
    )
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    meta = BatchMeta.pop_from(batch)
    aligned, targets = trainer.teacher(batch, meta)
    grouped = targets.groups
    groups = grouped.groups
    assert int(groups.unaligned.sum()) == 0 and len(groups) > 0
    student_ids = aligned.token_ids.tolist()
    teacher_answers = meta.teacher_batch["labels"]
    multi = 0
    for g in range(len(groups)):
        rows = [int(groups.student_first[g])]
        rows += groups.student_rest[groups.student_rest_group == g].tolist()
        text = tiny_tokenizer.decode([student_ids[r] for r in rows])
        b = int(groups.sample[g])
        assert text in tiny_tokenizer.decode(batch["labels"][b][batch["labels"][b] >= 0])
        assert text in teacher_tokenizer.decode(teacher_answers[b][teacher_answers[b] >= 0])
        multi += len(rows) > 1 or bool((groups.teacher_rest_group == g).any())
    assert multi > 0  # some words are split differently by the two tokenizers
    # The teacher's NLL of each answer under its own tokens, and the targets' shapes.
    assert grouped.answer_nll.shape == (4,) and torch.isfinite(grouped.answer_nll).all()
    first = grouped.first.logits(0, grouped.num_groups, grouped.teacher_vocab)
    assert first.shape == (len(groups), len(teacher_tokenizer))


@pytest.mark.parametrize(
    "family,weighting,loss",
    [
        ("llava", "equal", "hybrid"),
        ("llava", "fixed", "prefix"),
        ("llava", "instance", "prefix"),
        ("llava", "task", "hybrid"),
        ("llava", "closed_form", "hybrid"),
        ("llava", "recommended", "hybrid"),
        ("llava", "recommended", "prefix"),
        ("llava", "task", "uld"),
        ("llama", "task", "prefix"),
        ("llama", "recommended", "hybrid"),
    ],
)
def test_every_weighting_and_loss_trains_with_another_tokenizer(
    family, weighting, loss, tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    student = tiny_model_dir(family)
    config = config_for(
        student,
        other_teachers[family],
        sentence_data[family],
        tmp_path / "o",
        weighting=weighting,
        loss=loss,
    )
    result = run_training(config)
    assert all(torch.isfinite(torch.tensor(losses(result))))
    assert "jsd/energy" in result.log_history[0]
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_chunked_energies_equal_the_dense_path(
    tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    """Groups a few at a time (under activation checkpointing) against all at once: the
    same losses and the same trained student."""
    runs = {}
    for name, chunk in (("dense", None), ("chunked", 3)):
        config = config_for(
            tiny_model_dir("llava"),
            other_teachers["llava"],
            sentence_data["llava"],
            tmp_path / name,
            weighting="instance",
            max_steps=3,
        )
        raw = config.model_dump()
        raw["channels"]["chunk_size"] = chunk
        runs[name] = losses(run_training(cfg.validate(raw)))
    assert runs["chunked"] == pytest.approx(runs["dense"], abs=1e-5)
    for dense, chunked in zip(
        final_state(tmp_path / "dense"), final_state(tmp_path / "chunked"), strict=True
    ):
        for key, value in dense.items():
            # An attention key bias gets a zero gradient in exact arithmetic (softmax is
            # shift-invariant); Adam turns its rounding noise into steps of the learning
            # rate's size, which differ with the thread count, not with the chunking.
            if not key.endswith("k_proj.bias"):
                torch.testing.assert_close(chunked[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode", ["on_policy", "mixed"])
def test_the_students_own_answers_are_scored_by_a_teacher_of_another_tokenizer(
    mode, tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    config = config_for(
        tiny_model_dir("llava"),
        other_teachers["llava"],
        sentence_data["llava"],
        tmp_path / "o",
        weighting="recommended",
        max_steps=2,
    )
    raw = config.model_dump()
    raw["policy"].update(mode=mode, generation={"max_new_tokens": 8})
    if mode == "mixed":  # some rows of each batch the student's, some the data's
        raw["policy"].update(per="sample", student_fraction=0.6)
    trainer = build_trainer(cfg.validate(raw), training_arguments(cfg.validate(raw)))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    logged = [h for h in trainer.state.log_history if "on_policy/share" in h]
    assert logged and logged[0]["on_policy/share"] > 0
    # Sampled answers re-tokenised by text: the run's share of unaligned tokens is kept.
    assert trainer.teacher.tokens_seen > 0
    assert trainer.teacher.tokens_unaligned <= 0.05 * trainer.teacher.tokens_seen


def test_a_cache_of_a_teacher_of_another_tokenizer_trains_like_the_online_teacher(
    tiny_model_dir, other_teachers, sentence_data, teacher_tokenizer, tmp_path
):
    """`betakd cache-teacher` writes the teacher's own tokens and top-k (k = its whole
    vocabulary here); training from that cache follows the online teacher to float16
    precision."""
    runs = {}
    for source in ("online", "cache"):
        config = config_for(
            tiny_model_dir("llava"),
            other_teachers["llava"],
            sentence_data["llava"],
            tmp_path / source,
            weighting="recommended",
            max_steps=3,
        )
        raw = config.model_dump()
        raw["teacher"].update(
            cache_dir=str(tmp_path / "teacher-cache"), cache_top_k=len(teacher_tokenizer)
        )
        if source == "cache":
            cache_teacher(cfg.validate(raw), progress=False)
            raw["teacher"]["source"] = "cache"
        runs[source] = losses(run_training(cfg.validate(raw)))
    assert runs["cache"] == pytest.approx(runs["online"], rel=2e-3)


def test_accumulation_equals_one_large_batch(
    tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    trajectories = []
    for batch, accumulation in [(8, 1), (2, 4)]:
        config = config_for(
            tiny_model_dir("llava"),
            other_teachers["llava"],
            sentence_data["llava"],
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trajectories.append(losses(run_training(config)))
    assert trajectories[1] == pytest.approx(trajectories[0], abs=1e-5)


def test_resume_matches_an_uninterrupted_run(
    tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    def config(out):
        return config_for(
            tiny_model_dir("llava"),
            other_teachers["llava"],
            sentence_data["llava"],
            out,
            weighting="instance",
            save_strategy="steps",
            save_steps=2,
            max_steps=5,
        )

    run_training(config(tmp_path / "a"))
    broken = config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_training(broken, callbacks=[StopAfter(3)])
    with pytest.raises(OutputDirError):
        run_training(broken)
    run_training(broken, resume=True)
    assert_same_final_state(tmp_path / "a", tmp_path / "b")


def test_answers_that_do_not_align_stop_before_training(
    tiny_model_dir, sentence_data, teacher_tokenizer, tmp_path
):
    """A teacher whose template writes the answer differently (upper case here): no
    group forms, and the run stops before training, naming samples."""
    teacher = save_tiny_model("llama", tmp_path / "shouting", teacher_tokenizer, size="teacher")
    shouting = AutoTokenizer.from_pretrained(teacher)
    shouting.chat_template = shouting.chat_template.replace(
        "{{ message['content'] }}", "{{ message['content'] | upper }}"
    )
    shouting.save_pretrained(teacher)
    config = config_for(tiny_model_dir("llama"), teacher, sentence_data["llama"], tmp_path / "o")
    with pytest.raises(
        ValueError,
        match=r"teacher.cross_tokenizer: .* in 16 samples .*max_unaligned=0.05; e.g. samples \['t",
    ):
        build_trainer(config, training_arguments(config))


def test_another_vocabulary_without_the_option_is_refused_with_its_name(
    tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    config = config_for(
        tiny_model_dir("llama"),
        other_teachers["llama"],
        sentence_data["llama"],
        tmp_path / "o",
        cross=False,
    )
    with pytest.raises(ModelError, match="teacher.cross_tokenizer"):
        build_trainer(config, training_arguments(config))


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda raw: raw["teacher"].update(source="served", server={"url": "u", "model": "m"}),
            "served teacher of another tokenizer",
        ),
        (lambda raw: raw["channels"]["logits"][0].update(positions="answer_and_prompt"), "answer"),
    ],
)
def test_combinations_not_supported_yet_are_refused(change, message, tmp_path):
    raw = {
        "student": {"path": "s"},
        "teacher": {"path": "t", "cross_tokenizer": {}},
        "data": {"train_file": "d.json"},
        "channels": {"logits": [{"energy": "jsd"}]},
        "weighting": {"name": "task"},
        "policy": {},
        "training": {"output_dir": str(tmp_path)},
    }
    change(raw)
    with pytest.raises(ValueError, match=message):
        cfg.validate(raw)


def test_a_teacher_of_another_tokenizer_next_to_one_of_the_students(
    tiny_model_dir, other_teachers, sentence_data, tmp_path
):
    """Several teachers: one with the student's tokenizer, one aligned by text; each
    channel reads its own teacher, the instance weighting sees both."""
    data_file, images = sentence_data["llava"]
    raw = {
        "student": {"path": str(tiny_model_dir("llava"))},
        "teachers": [
            {
                "name": "same",
                "path": str(tiny_model_dir("llava", "teacher")),
                "channels": {"logits": [{"energy": "cosine_probs"}]},
            },
            {
                "name": "other",
                "path": str(other_teachers["llava"]),
                "cross_tokenizer": {"loss": "hybrid"},
                "channels": {"logits": [{"energy": "jsd"}]},
            },
        ],
        "data": {"train_file": str(data_file), "image_folder": str(images)},
        "weighting": {
            "name": "instance",
            "representation": "teacher_visual",
            "representation_from": ["same", "other"],
            "options": {"hidden": 8, "reliability": {}},
        },
        "training": {"output_dir": str(tmp_path / "o"), **TRAINING, "max_steps": 2},
    }
    result = run_training(cfg.validate(raw))
    logged = result.log_history[0]
    assert math.isfinite(logged["same/cosine_probs/energy"])
    assert math.isfinite(logged["other/jsd/energy"]) and logged["other/jsd/energy"] > 0
