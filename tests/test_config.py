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
    """`betakd train RECIPE --check`: the settings validate; the recipes name data (and
    hub models) this machine does not have, which --check reports by key."""
    from click.testing import CliRunner

    from betakd.cli import main

    result = CliRunner().invoke(main, ["train", str(path), "--check"])
    assert result.exit_code == 1, result.output
    assert "the settings are valid, but " in result.output
    assert "data.train_file: no file at" in result.output
    problems = result.output.strip().split("the settings are valid, but ")[1].split("; ")
    keys = ("student.path", "teacher.path", "data.", "weighting.init_from")
    assert all(p.startswith(keys) for p in problems), problems


def test_check_reports_every_missing_path_by_key_and_passes_when_all_exist(tmp_path):
    from click.testing import CliRunner

    from betakd.cli import main

    raw = {
        "student": {"path": str(tmp_path / "student")},
        "teacher": {"path": str(tmp_path / "teacher"), "source": "cache",
                    "cache_dir": str(tmp_path / "cache")},
        "data": {"train_file": str(tmp_path / "data.json"), "image_folder": str(tmp_path / "img")},
        "channels": {"logits": [{"energy": "fkl"}]},
        "weighting": {"name": "task", "init_from": str(tmp_path / "head")},
        "training": {"output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["train", str(path), "--check"])
    assert result.exit_code == 1
    for key in ("student.path", "teacher.path", "data.train_file", "data.image_folder",
                "teacher.cache_dir", "weighting.init_from"):  # fmt: skip
        assert f"{key}: " in result.output, (key, result.output)
    for folder in ("student", "teacher", "img", "cache", "head"):
        (tmp_path / folder).mkdir()
    (tmp_path / "data.json").write_text("[]")
    result = CliRunner().invoke(main, ["train", str(path), "--check"])
    assert result.exit_code == 0 and result.output.strip().endswith("valid"), result.output


def test_the_config_reference_is_current():
    from pathlib import Path

    from betakd.config_reference import render

    reference = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert reference.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: python -m betakd.config_reference > docs/config.md"
    )


def test_the_readme_config_validates():
    """The config of the README's "Distil your own model" is a valid config."""
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Distil your own model") :]
    start = section.index("```yaml") + len("```yaml")
    config = cfg.validate(yaml.safe_load(section[start : section.index("```", start)]))
    assert config.weighting.uses_reliability and config.weighting.name == "instance"
