"""Several teachers at once: config, alignment per teacher, training, checkpoints, caches."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from kd_configs import TRAINING as SHARED_TRAINING
from kd_configs import StopAfter, assert_same_final_state, final_state
from safetensors import safe_open
from safetensors.torch import load_file

from betakd import config as cfg
from betakd import models
from betakd.align import AlignedPositions
from betakd.build import build_trainer, training_arguments
from betakd.cache_cli import cache_teacher
from betakd.cli import main
from betakd.distill import HEAD_FILE
from betakd.models import forward_inputs
from betakd.runs import run_training
from betakd.teachers import BatchMeta, TeacherEnsemble, TeacherTargets
from betakd.teachers.cache_format import CacheError
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

TRAINING = {**SHARED_TRAINING, "max_steps": 3}


@pytest.fixture(scope="module")
def trio(tiny_model_dir):
    """A LLaVA student (16 image tokens) and two teachers of other image-token counts and
    families: LLaVA with 64 image tokens and Qwen2-VL (its count follows the image)."""
    return {
        "student": tiny_model_dir("llava", "student"),
        "big": tiny_model_dir("llava", "teacher"),
        "qwen": tiny_model_dir("qwen2_vl", "teacher"),
    }


def teacher_entry(name, path, logits=("cosine_probs",), features=(), **settings):
    return {
        "name": name,
        "path": str(path),
        "channels": {
            "logits": [{"energy": e} for e in logits],
            "features": [{"name": f, "energy": "mse"} for f in features],
        },
        **settings,
    }


def two_teacher_raw(trio, data, out, weighting="task", options=None, teachers=None, **training):
    data_file, images = data
    return {
        "student": {"path": str(trio["student"])},
        "teachers": teachers
        or [
            teacher_entry("big", trio["big"], ("cosine_probs",), ("visual",)),
            teacher_entry("qwen", trio["qwen"], ("fkl",)),
        ],
        "data": {"train_file": str(data_file), "image_folder": str(images)},
        "weighting": {"name": weighting, "options": dict(options or {})},
        "training": {"output_dir": str(out), **TRAINING, **training},
    }


def single_teacher_raw(trio, name, data, out, logits, features=()):
    data_file, images = data
    return {
        "student": {"path": str(trio["student"])},
        "teacher": {"path": str(trio[name])},
        "data": {"train_file": str(data_file), "image_folder": str(images)},
        "channels": {
            "logits": [{"energy": e} for e in logits],
            "features": [{"name": f, "energy": "mse"} for f in features],
        },
        "weighting": {"name": "task"},
        "training": {"output_dir": str(out), **TRAINING},
    }


# --------------------------------------------------------------------------- config


def test_channel_names_carry_the_teachers_and_the_single_form_is_unchanged(
    trio, vqa_data, tmp_path
):
    config = cfg.validate(two_teacher_raw(trio, vqa_data, tmp_path))
    assert config.channel_names() == ["big/cosine_probs", "big/visual", "qwen/fkl"]
    assert config.representation_sources() == ["big"]
    single = cfg.validate(single_teacher_raw(trio, "big", vqa_data, tmp_path, ["fkl"]))
    assert single.channel_names() == ["fkl"] and single.representation_sources() == [None]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.update(teacher={"path": "x"}), "either `teacher`"),
        (lambda r: r.update(channels={"logits": [{"energy": "fkl"}]}), "each teacher lists"),
        (lambda r: r["teachers"][1].update(name="big"), "repeated: ['big']"),
        (lambda r: r["teachers"][1].update(name="a/b"), "teachers.1.name"),
        (
            lambda r: r["weighting"].update(representation_from=["nobody"]),
            "unknown teachers ['nobody']",
        ),
        (
            lambda r: r["teachers"][0]["channels"]["logits"][0].update(
                positions="answer_and_prompt"
            ),
            "teachers.0: channels ['cosine_probs'] ask for prompt positions",
        ),
        (
            lambda r: r["weighting"].update(name="fixed", options={"weights": {"fkl": 1.0}}),
            "fkl",
        ),
    ],
)
def test_config_errors_name_the_key(change, message, trio, vqa_data, tmp_path):
    raw = two_teacher_raw(trio, vqa_data, tmp_path)
    change(raw)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(raw)
    assert message in str(err.value)


# --------------------------------------------------------------------------- alignment


def channel_values(config, rows=(0, 1, 2, 3)):
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    module = trainer.distillation_module
    with torch.no_grad():
        return module.channel_values(*trainer.loss_inputs(batch))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_each_teachers_channels_equal_its_own_single_teacher_run(
    chunk_size, trio, vqa_data, tmp_path
):
    """Each teacher aligned with its own image tokens: the two-teacher run's channels
    equal, channel by channel, what a run with that teacher alone computes."""
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "two")
    raw["channels"] = {"chunk_size": chunk_size}
    both = channel_values(cfg.validate(raw))
    for name, logits, features in [("big", ["cosine_probs"], ["visual"]), ("qwen", ["fkl"], [])]:
        single_raw = single_teacher_raw(trio, name, vqa_data, tmp_path / name, logits, features)
        single_raw["channels"]["chunk_size"] = chunk_size
        alone = channel_values(cfg.validate(single_raw))
        torch.testing.assert_close(both.ce, alone.ce)
        # Feature adapters initialise from the seeded RNG in channel order, alike in both.
        for channel in logits + features:
            torch.testing.assert_close(both.energies[f"{name}/{channel}"], alone.energies[channel])


def test_teachers_that_align_different_answer_tokens_are_named(trio, vqa_data, tmp_path):
    """An answer cut by max_length for one teacher's longer sequence only."""

    def positions(count):
        ones = torch.ones(count, dtype=torch.long)
        return AlignedPositions(
            ones * 0, torch.arange(count), torch.arange(count), ones, ones.bool(), 1
        )

    class Fixed:
        def __init__(self, count):
            self.count = count

        def prepare(self, accelerator):
            return self

        def __call__(self, batch, meta):
            return positions(self.count), TeacherTargets(None, None, None)

    ensemble = TeacherEnsemble({"big": Fixed(3), "qwen": Fixed(2)})
    meta = BatchMeta(["s7"], torch.tensor([7]), [1])
    with pytest.raises(ValueError, match=r"'big' and 'qwen' .*\['s7'\].*max_length"):
        ensemble({}, meta)


# --------------------------------------------------------------------------- training


def test_two_teachers_of_different_families_train_and_are_named_everywhere(
    trio, vqa_data, tmp_path
):
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "out", "instance", {"hidden": 8})
    raw["weighting"]["representation"] = "teacher_answer_hidden"
    raw["weighting"]["representation_from"] = ["big", "qwen"]
    result = run_training(cfg.validate(raw))
    logged = {key for entry in result.log_history for key in entry}
    for channel in ("big/cosine_probs", "big/visual", "qwen/fkl"):
        assert f"{channel}/beta_mean" in logged, sorted(logged)
    head = result.output_dir / HEAD_FILE
    with safe_open(str(head), "pt") as f:
        assert f.metadata()["channels"] == "ce,big/cosine_probs,big/visual,qwen/fkl"
    state = load_file(head)
    assert any(k.startswith("features.big/visual.") for k in state), sorted(state)
    # The representation is both teachers' pooled answer hidden states (width 64 each).
    assert state["objective.weighting.net.1.weight"].shape == (8, 128)


def test_a_teacher_with_another_vocabulary_fails_before_training_naming_it(
    trio, vqa_data, tmp_path
):
    other = train_tokenizer(("A different corpus entirely, with other merges.",) * 3, 320)
    odd = save_tiny_model("llava", tmp_path / "odd", other, size="teacher")
    raw = two_teacher_raw(
        trio,
        vqa_data,
        tmp_path / "out",
        teachers=[
            teacher_entry("big", trio["big"]),
            teacher_entry("odd", odd, ("fkl",)),
        ],
    )
    with pytest.raises(ValueError, match="student and teacher 'odd' vocabularies differ"):
        build_trainer(cfg.validate(raw), training_arguments(cfg.validate(raw)))
    assert not (tmp_path / "out").exists()


def test_resume_and_init_from_with_two_teachers(trio, vqa_data, tmp_path):
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 5}
    opts = {"hidden": 8}
    run_training(
        cfg.validate(two_teacher_raw(trio, vqa_data, tmp_path / "a", "instance", opts, **extra))
    )
    broken = cfg.validate(
        two_teacher_raw(trio, vqa_data, tmp_path / "b", "instance", opts, **extra)
    )
    with pytest.raises(KeyboardInterrupt):
        run_training(broken, callbacks=[StopAfter(3)])
    run_training(broken, resume=True)
    assert_same_final_state(tmp_path / "a", tmp_path / "b")
    _, head_a = final_state(tmp_path / "a")

    second = two_teacher_raw(trio, vqa_data, tmp_path / "c", "instance", opts)
    second["weighting"]["init_from"] = str(tmp_path / "a")
    trainer = build_trainer(cfg.validate(second), training_arguments(cfg.validate(second)))
    for key, value in trainer.head.state_dict().items():
        torch.testing.assert_close(value, head_a[key], rtol=0, atol=0)

    # A head of one teacher does not fit a run of two: the message names the entries.
    single = single_teacher_raw(trio, "big", vqa_data, tmp_path / "d", ["cosine_probs"])
    single["weighting"] = {"name": "instance", "options": opts, "init_from": str(tmp_path / "a")}
    with pytest.raises(ValueError, match="does not fit this run's channels"):
        build_trainer(cfg.validate(single), training_arguments(cfg.validate(single)))


@pytest.mark.parametrize("weighting,options", [("task", {}), ("instance", {"hidden": 8})])
def test_accumulation_equals_one_large_batch_with_two_teachers(
    weighting, options, trio, sixteen_samples, tmp_path
):
    trajectories, heads = [], []
    for batch, accumulation in [(8, 1), (2, 4)]:
        raw = two_teacher_raw(
            trio,
            sixteen_samples,
            tmp_path / f"b{batch}",
            weighting,
            options,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            learning_rate=1e-2,
        )
        result = run_training(cfg.validate(raw))
        trajectories.append([h["loss"] for h in result.log_history if "loss" in h])
        heads.append({k: v.clone() for k, v in result.trainer.head.state_dict().items()})
    assert trajectories[1] == pytest.approx(trajectories[0], abs=1e-5)
    for key, value in heads[0].items():
        torch.testing.assert_close(heads[1][key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "weighting,options",
    [
        ("equal", {}),
        ("fixed", {"weights": {"big/cosine_probs": 2.0, "big/visual": 0.5, "qwen/fkl": 1.0}}),
        ("closed_form", {"per": "sample"}),
        ("reference", {"level": "task"}),
        ("task", {"trust": {"reference": "data"}}),
        ("instance", {"hidden": 4, "prior_shape": 3.0, "reliability": {}}),
    ],
)
def test_every_weighting_weighs_the_channels_of_both_teachers(
    weighting, options, trio, vqa_data, tmp_path
):
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "out", weighting, options)
    result = run_training(cfg.validate(raw))
    last = [h for h in result.log_history if "qwen/fkl/beta_mean" in h][-1]
    assert all(f"{c}/weighted" in last for c in ("big/cosine_probs", "big/visual", "qwen/fkl"))
    if weighting == "fixed":
        assert (last["big/cosine_probs/beta_mean"], last["qwen/fkl/beta_mean"]) == (2.0, 1.0)
    reliability = result.trainer.head.objective.weighting.reliability
    if reliability is not None:
        # One fit per teacher: the two teachers' NLL distributions differ.
        assert reliability.fitted and reliability.teachers == 2
        assert not torch.equal(reliability.components[0], reliability.components[1])


# --------------------------------------------------------------------------- caches


def test_a_cached_teacher_and_an_online_teacher_together(trio, vqa_data, tmp_path, monkeypatch):
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "online")
    raw["teachers"][0].update(cache_dir=str(tmp_path / "big-cache"), cache_top_k=512)
    config = cfg.validate(raw)
    with pytest.raises(CacheError, match=r"--teacher \['big', 'qwen'\]"):
        cache_teacher(config, progress=False)
    cache_teacher(config, teacher_name="big", progress=False)
    online = channel_values(config)

    raw["teachers"][0]["source"] = "cache"
    raw["training"]["output_dir"] = str(tmp_path / "mixed")
    mixed_config = cfg.validate(raw)
    loaded = []
    original = models.load
    monkeypatch.setattr(
        models, "load", lambda *a, key, **k: loaded.append(key) or original(*a, key=key, **k)
    )
    mixed = channel_values(mixed_config)
    # No model of the cached teacher is loaded.
    assert loaded == ["student.path", "teachers.1.path"], loaded
    # The online teacher's channel is the same computation; the cached one's reads the
    # stored log-probabilities (every token: top k = the vocabulary) at storage precision.
    torch.testing.assert_close(mixed.energies["qwen/fkl"], online.energies["qwen/fkl"])
    torch.testing.assert_close(
        mixed.energies["big/cosine_probs"], online.energies["big/cosine_probs"], atol=2e-3, rtol=0
    )
    result = run_training(mixed_config)
    assert result.trainer.state.global_step == TRAINING["max_steps"]


def test_cache_teacher_command_picks_a_teacher_by_name(trio, vqa_data, tmp_path):
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "out")
    raw["teachers"][1]["cache_dir"] = str(tmp_path / "qwen-cache")
    path = tmp_path / "two.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    runner = CliRunner()
    missing = runner.invoke(main, ["cache-teacher", str(path), "--teacher", "nobody"])
    assert missing.exit_code != 0 and "no such teacher" in missing.output, missing.output
    done = runner.invoke(main, ["cache-teacher", str(path), "--teacher", "qwen", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "qwen-cache" / "index.json").is_file()


def test_the_instance_representation_can_append_the_students_own(trio, vqa_data, tmp_path):
    """h(x) = [teacher big's pooled answer hidden states, the student's own (detached)],
    against the student's hidden states pooled by hand at its aligned positions."""
    raw = two_teacher_raw(trio, vqa_data, tmp_path / "out", "instance", {"hidden": 8})
    raw["weighting"].update(
        representation="teacher_answer_hidden", representation_from=["big", "student"]
    )
    config = cfg.validate(raw)
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs, aligned, targets, image_counts = trainer.loss_inputs(batch)
    module = trainer.distillation_module
    with torch.no_grad():
        values = module.channel_values(inputs, aligned, targets, image_counts)
        hidden = module.student(**forward_inputs(inputs, module.adapter), output_hidden_states=True)
    last = hidden.hidden_states[-1]
    own = torch.stack(
        [
            last[b, aligned.student_pos[aligned.batch_index == b]].float().mean(dim=0)
            for b in range(aligned.batch_size)
        ]
    )
    teacher_part = targets.of("big").representation
    torch.testing.assert_close(values.representation, torch.cat([teacher_part, own], dim=1))
    assert not values.representation.requires_grad
    net = trainer.head.objective.weighting.net[1]
    assert net.in_features == teacher_part.shape[1] + last.shape[-1]
    run_training(config)

    raw["weighting"]["representation_from"] = ["student", "big"]
    with pytest.raises(cfg.ConfigError, match="'student' comes last"):
        cfg.validate(raw)
    raw["weighting"].update(representation="teacher_confidence", representation_from=["student"])
    with pytest.raises(cfg.ConfigError, match="the student's representation is one of"):
        cfg.validate(raw)


def test_two_teachers_score_the_students_own_answers(trio, vqa_data, tmp_path):
    """On-policy with two teachers of different families: each teacher's batch gets the
    student's answers with its own image tokens; answers equal to the data's give the
    off-policy loss, and a mixed run (per sample, rows collated again) trains."""
    from betakd.labels import supervised
    from betakd.onpolicy import GeneratedRows, answered_batch

    raw = two_teacher_raw(trio, vqa_data, tmp_path / "o", "instance", {"hidden": 8})
    raw["policy"] = {"mode": "mixed", "student_fraction": 0.8, "per": "sample",
                     "generation": {"max_new_tokens": 4}}  # fmt: skip
    trainer = build_trainer(cfg.validate(raw), training_arguments(cfg.validate(raw)))
    collator = trainer.data_collator
    batch = collator(list(trainer.train_dataset)[:4])
    answers = [batch["input_ids"][r][supervised(batch["labels"][r])] for r in range(4)]
    sides = {n: (e.adapter, e.pad_token_id) for n, e in collator.teachers.items()}
    student = (collator.student.adapter, collator.student.pad_token_id)
    answered = answered_batch(batch, answers, student, sides)
    generated = GeneratedRows(torch.arange(4), *trainer.loss_inputs(answered))
    num_items = trainer.num_items([batch], torch.device("cpu"))
    with torch.no_grad():
        on = trainer.model(*trainer.loss_inputs(batch), num_items, generated=generated)
        off = trainer.model(*trainer.loss_inputs(batch), num_items)
    torch.testing.assert_close(on.loss, off.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on.energies, off.energies, rtol=1e-5, atol=1e-6)

    raw["training"]["output_dir"] = str(tmp_path / "run")
    result = run_training(cfg.validate(raw))
    logged = [h for h in result.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    shares = [h["on_policy/share"] for h in logged]
    assert any(s > 0 for s in shares), shares
    assert any("policy/on_policy/qwen/fkl/energy" in h for h in logged)
