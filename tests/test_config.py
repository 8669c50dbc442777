"""Config validation: every error names the key; overrides; the shipped example configs."""

import copy
from pathlib import Path

import pytest

from betakd import config as cfg

BASE = {
    "student": {"path": "student"},
    "teacher": {"path": "teacher"},
    "data": {"train_file": "train.jsonl"},
    "channels": {"logits": [{"energy": "cosine_probs"}], "features": [{"name": "visual"}]},
    "weighting": {"name": "instance"},
    "training": {"output_dir": "out", "learning_rate": 1e-4},
}


def mutated(change):
    raw = copy.deepcopy(BASE)
    change(raw)
    return raw


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda r: r["channels"]["logits"][0].update(energy="kl"),
            "channels.logits.0.energy: unknown energy 'kl'",
        ),
        (
            lambda r: r["channels"]["logits"][0].update(options={"temp": 2}),
            "channels.logits.0: options: .*'temp'",
        ),
        (
            lambda r: r["training"].update(lr=1),
            r"training: not a transformers.TrainingArguments field: \['lr'\]",
        ),
        (lambda r: r["student"].update(dtyp="bf16"), "student.dtyp: unknown key"),
        (lambda r: r["student"].update(dtype="fp8"), "student.dtype: Input should be"),
        (lambda r: r.pop("data"), "data: missing required key"),
        (
            lambda r: r["data"].update(max_length="long"),
            "data.max_length: Input should be a valid integer",
        ),
        (
            lambda r: r["weighting"].update(name="betakd"),
            "weighting.name: unknown weighting 'betakd'",
        ),
        (lambda r: r["weighting"].update(options={"hiden": 3}), "weighting.options: .*'hiden'"),
        (lambda r: r["teacher"].update(source="cache"), "teacher.cache_dir is required"),
        (lambda r: r["channels"]["features"].append({"name": "visual"}), r"repeated: \['visual'\]"),
        (lambda r: r["channels"]["features"][0].update(energy="l1"), "unknown feature energy 'l1'"),
    ],
)
def test_errors_name_the_key(change, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.validate(mutated(change))


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(cfg.yaml.safe_dump(BASE))
    config = cfg.load_config(
        path, ["weighting.name=task", "training.max_steps=7", "channels.logits.0.energy=fkl"]
    )
    assert config.weighting.name == "task" and config.training["max_steps"] == 7
    assert config.channels.logits[0].energy == "fkl"
    assert config.weighting.reduction == "sample" and not config.student.trust_remote_code
    with pytest.raises(cfg.ConfigError, match="key=value"):
        cfg.load_config(path, ["weighting.name"])
    with pytest.raises(cfg.ConfigError, match="not found"):
        cfg.load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = cfg.validate(BASE)
    cfg.dump(config, tmp_path / "resolved.yaml")
    again = cfg.load_config(tmp_path / "resolved.yaml")
    assert again == config


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")))
def test_shipped_example_configs_pass_train_check(path):
    """`betakd train RECIPE --check`, offline: hub ids need no download to validate."""
    from click.testing import CliRunner

    from betakd.cli import main

    result = CliRunner().invoke(main, ["train", str(path), "--check"])
    assert result.exit_code == 0 and result.output.strip().endswith("valid"), result.output
