"""The training config: one YAML file -> validated, typed settings.

Validation happens before any model loads, and every error names the offending key
(``channels.logits.0.energy: unknown energy 'kl' ...``). ``training`` is passed through
to ``transformers.TrainingArguments`` and checked against its fields. The sections
(student, teachers, data, channels, weighting, policy, ...) are in
:mod:`betakd.config_sections`; here they are put together (:class:`TrainConfig`,
checked against each other) and read from files with ``--set`` overrides.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from betakd import weighting
from betakd.config_sections import (
    STUDENT,
    STUDENT_REPRESENTATIONS,
    ChannelSettings,
    ConfigError,
    DataSettings,
    NamedTeacherSettings,
    NonFinitePolicy,
    PolicySettings,
    ScheduleSettings,
    Strict,
    StudentSettings,
    TeacherPlan,
    TeacherSettings,
    WeightingSettings,
)


class TrainConfig(Strict):
    student: StudentSettings = Field(description="the model trained")
    teacher: TeacherSettings | None = Field(
        None, description="one teacher (or `teachers`); its channels are `channels`"
    )
    teachers: list[NamedTeacherSettings] | None = Field(
        None, min_length=1, description="several teachers, each with its own channels"
    )
    data: DataSettings = Field(description="the training data")
    channels: ChannelSettings = Field(
        default_factory=ChannelSettings,
        description="the single teacher's channels, and how logit energies are computed",
    )
    weighting: WeightingSettings = Field(
        default_factory=WeightingSettings, description="how the channels are weighted"
    )
    non_finite: NonFinitePolicy = Field(
        default_factory=NonFinitePolicy, description="what a non-finite loss does"
    )
    schedule: ScheduleSettings = Field(
        default_factory=ScheduleSettings, description="the learning-rate schedule's restart"
    )
    policy: PolicySettings = Field(
        default_factory=PolicySettings, description="whose answers the teacher scores"
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="any transformers.TrainingArguments field, passed through (output_dir, "
        "learning_rate, max_steps, bf16, deepspeed, ...)",
    )

    @field_validator("training")
    @classmethod
    def _known_training_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"not a transformers.TrainingArguments field: {unknown}")
        return value

    @model_validator(mode="after")
    def _one_teacher_form(self) -> TrainConfig:
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("give either `teacher` (one) or `teachers` (a list), not both")
        if self.teachers is None:
            if self.weighting.representation_from is not None:
                raise ValueError(
                    "weighting.representation_from names teachers of `teachers`; "
                    "with a single `teacher` leave it out"
                )
            return self
        if self.channels.logits or self.channels.features:
            raise ValueError(
                "with `teachers`, each teacher lists its own channels (teachers.N.channels); "
                "top-level channels keep only chunk_size and chunk_compile"
            )
        names = [t.name for t in self.teachers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"teachers: names must be unique; repeated: {repeated}")
        if STUDENT in names:
            raise ValueError(f"teachers: {STUDENT!r} names the student's representation")
        self._check_representation_from(names)
        for plan in self.teacher_plans():
            prompt = [c.channel for c in plan.logits if c.positions != "answer"]
            if prompt and len(names) > 1:
                raise ValueError(
                    f"{plan.key}: channels {prompt} ask for prompt positions, which differ "
                    "between teachers; with several teachers channels cover answer positions"
                )
            if prompt and self.channels.chunk_size is not None:
                raise ValueError(
                    f"chunk_size covers answer positions only; channels {prompt} ask for more"
                )
        return self

    @model_validator(mode="after")
    def _cross_tokenizer_limits(self) -> TrainConfig:
        for plan in self.teacher_plans():
            if plan.settings.cross_tokenizer is None:
                continue
            key = f"{plan.key}.cross_tokenizer"
            if plan.settings.source == "served":
                raise ValueError(
                    f"{key}: a served teacher of another tokenizer is not supported yet "
                    "(source: online, or cache from betakd cache-teacher)"
                )
            if any(c.positions != "answer" for c in plan.logits):
                raise ValueError(f"{key}: logit channels cover answer positions only")
        return self

    @model_validator(mode="after")
    def _student_answers_need_a_scoring_teacher(self) -> TrainConfig:
        if not self.policy.on_policy:
            return self
        cached = [p.key for p in self.teacher_plans() if p.settings.source == "cache"]
        if cached:
            raise ValueError(
                f"policy.mode {self.policy.mode!r}: the teacher scores the student's own "
                f"answers, new at every step, but {', '.join(cached)} reads an offline cache "
                "of the data's answers; use source: online or served (or policy.mode: "
                "off_policy)"
            )
        return self

    @model_validator(mode="after")
    def _channels_fit_weighting(self) -> TrainConfig:
        names = ["ce", *self.channel_names()]
        if len(names) == 1 and self.weighting.name != "equal":
            raise ValueError(
                "no teacher channel configured: add channels.logits or channels.features"
            )
        try:
            weighting.build(self.weighting.name, names, **self._probe_options())
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"weighting.options: {err}") from err
        return self

    def teacher_plans(self) -> list[TeacherPlan]:
        """Every teacher with its channels, in config order (one for ``teacher``)."""
        if self.teachers is None:
            assert self.teacher is not None  # the validator allows no other case
            return [
                TeacherPlan(
                    None, "teacher", self.teacher, self.channels.logits, self.channels.features
                )
            ]
        return [
            TeacherPlan(t.name, f"teachers.{i}", t, t.channels.logits, t.channels.features)
            for i, t in enumerate(self.teachers)
        ]

    def channel_names(self) -> list[str]:
        """Every teacher channel's name as logs, metrics and the head know it."""
        return [name for plan in self.teacher_plans() for name in plan.channel_names]

    def _check_representation_from(self, names: list[str]) -> None:
        sources = self.weighting.representation_from or []
        unknown = sorted(set(sources) - set(names) - {STUDENT})
        if unknown:
            raise ValueError(
                f"weighting.representation_from: unknown teachers {unknown}; teachers: {names}"
            )
        if STUDENT in sources[:-1]:
            raise ValueError(f"weighting.representation_from: {STUDENT!r} comes last")
        if STUDENT in sources and self.weighting.representation not in STUDENT_REPRESENTATIONS:
            raise ValueError(
                f"weighting.representation_from: the student's representation is one of "
                f"{STUDENT_REPRESENTATIONS}, not {self.weighting.representation!r}"
            )

    def representation_sources(self) -> list[str | None]:
        """Whose ``h(x)`` the instance weighting sees, in order (None: the single
        ``teacher``; ``student``: the student's own, last)."""
        if self.teachers is None:
            return [None]
        return list(self.weighting.representation_from or [self.teachers[0].name])

    def _probe_options(self) -> dict[str, Any]:
        return self.weighting_options(representation_dim=1)

    def weighting_options(self, representation_dim: int) -> dict[str, Any]:
        """``weighting.build``'s options: the config's (parsed), the width of h(x), and
        with several teachers and a reliability, which teacher each channel reads."""
        options = self.weighting.build_options(representation_dim).given()
        if self.teachers is not None and self.weighting.uses_reliability:
            plans = self.teacher_plans()
            options["channel_teachers"] = {c: p.name for p in plans for c in p.channel_names}
        return options


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing required key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars (numbers, booleans, null, lists) or a plain string."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to the raw config dict (creating missing levels)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        if isinstance(node, list):
            node[int(parts[-1])] = parse_value(value)
        else:
            node[parts[-1]] = parse_value(value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a YAML config; errors name the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate(apply_overrides(raw, overrides or []), source=str(path))


def validate(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def dump(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (defaults filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
