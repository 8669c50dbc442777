"""The demo's design: ``defaults.yaml`` -> a :class:`DemoConfig`, with ``--set`` overrides.

Every section maps onto a dataclass here (data, tokenizer, models, teacher and student
training, channels); ``strategies`` is the catalogue of named runs (see
:mod:`betakd.demo.strategies`) and ``run`` the default selection.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from betakd.config import ConfigError, apply_overrides
from betakd.demo.easyvqa_data import DemoDataConfig
from betakd.testing.tiny_models import TinyDims

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")


class DemoConfigError(ValueError):
    """A problem with the demo design (defaults.yaml, --set or --strategies), named."""


# Model sizes are betakd.testing.tiny_models' TinyDims: the demo builds its models with
# betakd.testing.tiny_models.
ModelDims = TinyDims


@dataclass(frozen=True)
class TeacherTraining:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0


@dataclass(frozen=True)
class StudentTraining:
    """What each demo run hands to ``betakd train``."""

    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 1e-3
    weighting_learning_rate: float = 0.02
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class DemoChannels:
    """The teacher channels of every KD strategy (a strategy may override the feature)."""

    logit_energy: str = "cosine_probs"
    logit_options: Mapping[str, Any] = field(default_factory=dict)
    # A `betakd train` feature channel (name, energy, adapter, normalize, rank); None: none.
    feature: Mapping[str, Any] | None = field(
        default_factory=lambda: {"name": "visual", "energy": "mse", "adapter": "student"}
    )

    @property
    def logit_name(self) -> str:
        return self.logit_energy

    def names(self, feature: Mapping[str, Any] | None) -> list[str]:
        return [self.logit_name] + ([feature["name"]] if feature else [])


@dataclass(frozen=True)
class TwoTeachers:
    """``betakd demo --scenario two-teachers``: a second teacher, blind on another slice,
    and the runs that compare learning from one, the other, or both."""

    second_blind_value: str = "green"  # teacher b never sees these (a: data.blind_value)
    seeds: tuple[int, ...] = (0, 1, 2)
    fixed_sweep: tuple[float, ...] = (0.3, 1.0, 3.0)  # equal weight of both teachers
    single: str = "reliable_instance"  # the weighting (a strategy name) of one-teacher runs
    task: str = "task"  # the strategies whose weightings the two-teacher runs use
    instance: str = "reliable_instance"
    # A fixed strategy (kd_weight, options) run on both teachers as an ablation; None: none.
    ablation: str | None = "fixed_reliability"
    representation_from: tuple[str, ...] = ("a",)  # h(x) of instance runs


@dataclass(frozen=True)
class FeatureChannelScenario:
    """``betakd demo --scenario feature-channel``: the default scenario with a visual
    feature channel added to every KD strategy, to show what it carries (the teacher's
    visual function, blind spot included) and what the weightings can do about it."""

    feature: Mapping[str, Any] = field(
        default_factory=lambda: {
            "name": "visual",
            "energy": "mse",
            "adapter": "student",
            "normalize": True,
        }
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    run: tuple[str, ...] = (
        "ce_only",
        "fixed_sweep",
        "fixed",
        "fixed_reliability",
        "reliable_instance",
        "reliable_instance_annealed",
    )


@dataclass(frozen=True)
class OnPolicy:
    """``betakd demo --scenario on-policy``: the data's answers as short sentences, and
    the recommended weighting trained off-policy, on-policy and mixed."""

    seeds: tuple[int, ...] = (0, 1, 2)
    strategy: str = "robust_instance"  # the weighting (a strategy name) of every KD run
    modes: tuple[str, ...] = ("off_policy", "mixed", "on_policy")
    student_fraction: float = 0.5  # lambda of the mixed runs
    per: str = "batch"  # mixed: draw per batch (GKD) or per sample
    ce: str = "data"  # the CE of student-answered samples: the data answer's, or none
    max_new_tokens: int = 24  # the student's answers in training, and every test answer
    temperature: float = 1.0
    # One more run: on-policy after this many off-policy steps (a warm start); None: none.
    warm_start_step: int | None = 125
    blind_value: str | None = None  # the teacher's blind slice (None: it sees everything)


@dataclass(frozen=True)
class CrossTokenizerScenario:
    """``betakd demo --scenario cross-tokenizer``: the on-policy scenario's sentence
    answers, students distilled from a teacher with the student's tokenizer and from an
    otherwise identical teacher with another one (``teacher_vocab_size``)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    strategy: str = "reliable_instance"  # the weighting (a strategy name) of every KD run
    teacher_vocab_size: int = 360  # the other tokenizer's vocabulary (fewer merges)
    losses: tuple[str, ...] = ("prefix", "hybrid", "uld")


@dataclass(frozen=True)
class DemoConfig:
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    vocab_size: int = 512
    image_size: int = 64
    teacher: ModelDims = field(
        default_factory=lambda: ModelDims(128, 2, 4, 128, 4, 8)  # ~1.0M, 64 image tokens
    )
    student: ModelDims = field(
        default_factory=lambda: ModelDims(64, 1, 2, 32, 1, 8)
    )  # ~0.12M, 64 image tokens
    teacher_training: TeacherTraining = field(default_factory=TeacherTraining)
    student_training: StudentTraining = field(default_factory=StudentTraining)
    channels: DemoChannels = field(default_factory=DemoChannels)
    strategies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    run: tuple[str, ...] = ()
    two_teachers: TwoTeachers = field(default_factory=TwoTeachers)
    on_policy: OnPolicy = field(default_factory=OnPolicy)
    feature_channel: FeatureChannelScenario = field(default_factory=FeatureChannelScenario)
    cross_tokenizer: CrossTokenizerScenario = field(default_factory=CrossTokenizerScenario)

    def data_key(self) -> str:
        return self.data.key()

    def tokenizer_key(self) -> str:
        # The tokenizer learns from every easy-VQA question, whatever the split.
        return short_hash({"vocab_size": self.vocab_size})

    def teacher_key(self) -> str:
        """Hash of everything that changes the teacher's weights (not the student's data)."""
        from dataclasses import asdict

        return short_hash(
            {
                "data": self.data.teacher_key(),
                "tokenizer": self.tokenizer_key(),
                "image_size": self.image_size,
                "dims": asdict(self.teacher),
                "training": asdict(self.teacher_training),
            }
        )


def short_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


SECTIONS = {
    "data": DemoDataConfig,
    "teacher": ModelDims,
    "student": ModelDims,
    "teacher_training": TeacherTraining,
    "student_training": StudentTraining,
    "channels": DemoChannels,
    "two_teachers": TwoTeachers,
    "on_policy": OnPolicy,
    "feature_channel": FeatureChannelScenario,
    "cross_tokenizer": CrossTokenizerScenario,
}
PLAIN = {"tokenizer", "image_size", "strategies", "run"}


def _section(cls, values: Mapping | None, where: str):
    """Build dataclass ``cls`` from a YAML mapping, naming unknown keys."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DemoConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)  # the dataclasses are frozen: no lists
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise DemoConfigError(f"{where}: {err}") from err


def load_demo_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> DemoConfig:
    """The demo design from ``defaults.yaml`` (or another YAML file of the same shape),
    with ``key.sub=value`` overrides (``--set data.blind_value=red``)."""
    path = Path(path) if path is not None else DEFAULTS_PATH
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        raw = apply_overrides(raw, list(overrides))
    except (ConfigError, IndexError, ValueError) as err:
        raise DemoConfigError(f"--set: {err}") from err
    unknown = sorted(set(raw) - set(SECTIONS) - PLAIN)
    if unknown:
        raise DemoConfigError(
            f"{path}: unknown sections {unknown}; expected some of {sorted(set(SECTIONS) | PLAIN)}"
        )
    built = {
        name: _section(cls, raw.get(name), f"{path}: {name}") for name, cls in SECTIONS.items()
    }
    vocab = (raw.get("tokenizer") or {}).get("vocab_size", DemoConfig.vocab_size)
    strategies = raw.get("strategies") or {}
    if not isinstance(strategies, Mapping):
        raise DemoConfigError(f"{path}: strategies must be a mapping of name -> strategy")
    run = tuple(raw.get("run") or ())
    unknown_runs = sorted(set(run) - set(strategies))
    if unknown_runs:
        raise DemoConfigError(f"{path}: run names unknown strategies {unknown_runs}")
    return DemoConfig(
        vocab_size=int(vocab),
        image_size=int(raw.get("image_size", 64)),
        strategies=strategies,
        run=run,
        **built,
    )
