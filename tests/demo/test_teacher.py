"""The demo teacher: config loading, cache keys, and a tiny end-to-end training run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from betakd.demo.config import (
    DEFAULTS_PATH,
    DemoConfig,
    ModelDims,
    TeacherTraining,
    load_demo_config,
)
from betakd.demo.easyvqa_data import DemoDataConfig
from betakd.demo.teacher import (
    cache_root,
    ensure_teacher,
    teacher_dir,
    teacher_info,
)


def test_defaults_yaml_loads():
    config = load_demo_config(DEFAULTS_PATH)
    assert config.data.qtypes == ("colour",)
    assert config.teacher.hidden > config.student.hidden
    assert config.teacher.vision_hidden > config.student.vision_hidden
    assert len(config.student_training.seeds) >= 2


def test_unknown_yaml_key_names_file_and_section(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("teacher:\n  hiden: 3\n")
    with pytest.raises(ValueError, match=r"demo\.yaml: teacher: unknown keys \['hiden'\]"):
        load_demo_config(bad)
    bad.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="unknown sections"):
        load_demo_config(bad)


def test_teacher_key_follows_what_changes_the_weights():
    config = DemoConfig()
    longer = replace(config, teacher_training=replace(config.teacher_training, steps=7))
    other_student = replace(config, student=replace(config.student, hidden=8))
    assert longer.teacher_key() != config.teacher_key()
    assert other_student.teacher_key() == config.teacher_key()  # the student is not baked in


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BETAKD_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("BETAKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "betakd"


@pytest.mark.slow
def test_tiny_teacher_trains_saves_and_is_cached(monkeypatch, tmp_path):
    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("BETAKD_CACHE", str(tmp_path))
    config = DemoConfig(
        data=DemoDataConfig(max_train=48, max_test=24, teacher_max_train=48),
        teacher=ModelDims(hidden=32, layers=1, heads=2, vision_hidden=16, vision_layers=1),
        teacher_training=TeacherTraining(steps=2, batch_size=4),
    )
    path = ensure_teacher(config, progress=False)
    assert path == teacher_dir(config)
    assert (path / "model.safetensors").is_file()
    info = teacher_info(path)
    assert info["train_samples"] <= 48
    assert set(info["test_accuracy"]) >= {"outside_blind", "blind"}
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_teacher(config, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(path)


def test_overrides_change_the_design_and_strategies_expand_sweeps():
    from betakd.demo.strategies import select

    config = load_demo_config(
        overrides=["data.blind_value=red", "channels.feature=null", "student_training.seeds=[3]"]
    )
    assert config.data.blind_value == "red" and config.channels.feature is None
    assert config.student_training.seeds == (3,)
    sweep = select(config, ["fixed_sweep"])
    assert [s.kd_weight for s in sweep] == [0.1, 0.3, 3.0, 10.0]
    assert all(s.family == "sweep" for s in sweep)
    block = sweep[0].weighting_block(config.channels, 0.02)
    assert block["options"] == {"weights": {"cosine_probs": 0.1}, "scale_relative": True}
    reference = select(config, ["reference_task"])[0]
    assert reference.channels(config.channels)["features"] == []  # no feature to change
    scenario = load_demo_config().feature_channel
    with_feature = load_demo_config(overrides=[f"channels.feature={dict(scenario.feature)}"])
    assert reference.channels(with_feature.channels)["features"] == [
        {"name": "visual", "energy": "mse", "adapter": "teacher", "normalize": True}
    ]
    annealed = select(with_feature, ["reliable_instance_annealed"])[0]
    assert annealed.channels(with_feature.channels)["features"][0]["anneal_steps"] == 125
    assert select(config, None) == select(config, list(config.run))
