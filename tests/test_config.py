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
        (
            lambda r: r["weighting"].update(options={"hiden": 3}),
            r"weighting.options: unknown option\(s\) \['hiden'\]; its options: input_dim, hidden,",
        ),
        (
            lambda r: r["weighting"].update(options={"trust": {"reference": "data", "beta": 1}}),
            r"weighting.options.trust: unknown keys \['beta'\]; expected some of \['channels', "
            r"'kind', 'lam', 'reference', 'rho', 'threshold'\]",
        ),
        (
            lambda r: r["weighting"].update(options={"trust": {"reference": "data", "rho": 0}}),
            "weighting.options.trust.rho: Input should be greater than 0",
        ),
        (
            lambda r: r["weighting"].update(options={"reliability": {"neighbors": 8}}),
            r"weighting.options.reliability: unknown keys \['neighbors'\]; expected some of "
            r"\['anchor_share', 'input_dim', 'neighbours', 'teachers'\]",
        ),
        (
            lambda r: r["weighting"].update(name="fixed", options={}),
            "weighting.options.weights: missing required key",
        ),
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


TRUST_YAML = """
student: {path: student}
teacher: {path: teacher}
data: {train_file: train.jsonl}
channels:
  logits: [{energy: cosine_probs}]
  features: [{name: visual}]
weighting:
  name: instance
  options:
    hidden: 8
    prior_shape: 3
    prior_rate_scale: 0.5
    trust: {reference: student, channels: cosine_probs, kind: gamma, rho: 0.5}
"""


def test_yaml_trust_options_build_the_weighting_of_the_plain_options(tmp_path):
    import torch

    from betakd import weighting

    path = tmp_path / "c.yaml"
    path.write_text(TRUST_YAML)
    config = cfg.load_config(path)
    options = config.weighting.options
    assert isinstance(options, weighting.InstanceOptions)
    assert options.trust == weighting.TrustOptions(
        channels=("cosine_probs",), kind="gamma", rho=0.5
    )
    channels = ["ce", *config.channel_names()]
    torch.manual_seed(0)
    from_config = weighting.build("instance", channels, **config.weighting_options(4))
    torch.manual_seed(0)
    from_plain = weighting.build(
        "instance", channels, input_dim=4, hidden=8, prior_shape=3.0, prior_rate_scale=0.5,
        trust={"reference": "student", "channels": ["cosine_probs"], "kind": "gamma", "rho": 0.5},
    )  # fmt: skip
    assert from_config.trust == weighting.SharedTrust(("cosine_probs",), kind="gamma", rho=0.5)
    assert from_config.prior == from_plain.prior == weighting.GammaPrior(3.0, 0.0, 0.5)
    scale = torch.tensor([0.4, 0.1])
    for built in (from_config, from_plain):
        built.set_energy_scale(scale)
    state, plain_state = from_config.state_dict(), from_plain.state_dict()
    assert state.keys() == plain_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], plain_state[key], rtol=0, atol=0)
    losses = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) + 0.1
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    out, plain = from_config(losses, h), from_plain(losses, h)
    torch.testing.assert_close(out.per_sample_loss, plain.per_sample_loss, rtol=0, atol=0)
    # The trust (gamma: rho / (r + rho), r the relative cosine_probs energy) multiplies the
    # visual channel's learned beta; cosine_probs keeps its own per-sample beta.
    tau = 0.5 / (losses[:, 1] / scale[0] + 0.5)
    torch.testing.assert_close(out.betas[:, 2], out.learned_betas[:, 2] * tau)
    torch.testing.assert_close(out.betas[:, 1], out.learned_betas[:, 1])


def test_weighting_options_dump_as_given_and_read_back():
    raw = copy.deepcopy(BASE)
    raw["weighting"]["options"] = {"prior_shape": 3, "trust": {"reference": "data"}}
    config = cfg.validate(raw)
    dumped = config.model_dump(mode="json")["weighting"]["options"]
    assert dumped == {"prior_shape": 3.0, "trust": {"reference": "data"}}
    assert cfg.validate({**raw, "weighting": config.model_dump()["weighting"]}) == config
    assert config.weighting.options.trust.reference == "data"
    assert config.weighting.options.reliability is None


def test_the_width_of_h_is_filled_in_unless_given():
    raw = copy.deepcopy(BASE)
    raw["weighting"]["options"] = {"hidden": 4, "reliability": {"neighbours": 8}}
    options = cfg.validate(raw).weighting_options(7)
    assert options["input_dim"] == 7 and options["hidden"] == 4
    assert options["reliability"].input_dim == 7 and options["reliability"].neighbours == 8
    raw["weighting"]["options"] = {"input_dim": 3, "reliability": {"input_dim": 2}}
    options = cfg.validate(raw).weighting_options(7)
    assert options["input_dim"] == 3 and options["reliability"].input_dim == 2
    raw["weighting"] = {"name": "reference", "options": {"level": "instance"}}
    config = cfg.validate(raw)
    assert config.weighting.network_input and config.weighting_options(5)["input_dim"] == 5
    raw["weighting"] = {"name": "reference"}
    assert not cfg.validate(raw).weighting.needs_representation


def test_the_config_reference_has_a_table_per_weighting():
    from betakd import weighting
    from betakd.config_reference import render

    text = render()
    for name in weighting.names():
        assert f"#### `{name}`" in text, name
    task = text[text.index("#### `task`") : text.index("#### `instance`")]
    assert "| `prior_shape` | float | `1.0` |" in task and "| `init_beta` | float | `1.0` |" in task
    assert "| `trust.rho` | float | `1.0` |" in text
    assert "| `reliability.neighbours` | int | `32` |" in text
