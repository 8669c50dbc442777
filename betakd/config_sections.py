"""The sections of the training config (:mod:`betakd.config`): the student, the
teachers (a model, a cache or a vLLM server; one teacher or several, each with its
channels), the data, the channels, the weighting, the policy (whose answers the student
learns from) and the run's safeguards. Each is a pydantic model with help text
(``docs/config.md`` is generated from them); :class:`~betakd.config.TrainConfig` puts
them together and checks them against each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from betakd import energies, features, weighting

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraSettings(Strict):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (the update is alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names to adapt, or peft's `all-linear`"
    )


class ModelSettings(Strict):
    path: str = Field(description="local directory or hub id of the model")
    dtype: Dtype = Field("float32", description="weights' dtype (auto: the checkpoint's)")
    trust_remote_code: bool = Field(
        False, description="run the model repository's own code (never unless set)"
    )


class StudentSettings(ModelSettings):
    lora: LoraSettings | None = Field(
        None, description="train LoRA adapters instead of every weight (merged when saved)"
    )


class ServerSettings(Strict):
    url: str = Field(
        description="the server's OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    model: str = Field(description="the served model's name (vllm serve --served-model-name)")
    top_k: int = Field(
        20,
        ge=1,
        description="log-probabilities per answer token (at most the server's --max-logprobs)",
    )
    timeout_s: float = Field(120.0, gt=0, description="seconds one request may take")
    retries: int = Field(
        4, ge=0, description="retries of a request after a timeout, a lost connection or a 5xx/429"
    )
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    token_api: bool = Field(
        False,
        description="send every request as the student's token ids through vLLM's token-in "
        "API (start the server with --enable-scale-out): the server skips decoding the "
        "log-probabilities into strings, about half its time per request; the chat template "
        "is checked on one sample before training",
    )
    prefetch_batches: int = Field(
        2,
        ge=0,
        description="batches whose requests are sent before their step asks (the data loader "
        "collates a batch ahead), so the server works while the student computes; 0: none",
    )


class CrossTokenizerSettings(Strict):
    loss: Literal["prefix", "hybrid", "uld"] = Field(
        "prefix",
        description="prefix: the channel's energy between both distributions projected onto "
        "the shared tokens by longest prefix; hybrid (GOLD): the energy on the shared "
        "vocabulary, ULD's sorted L1 outside it; uld: sorted L1 on everything "
        "(docs/cross-tokenizer.md)",
    )
    max_unaligned: float = Field(
        0.05,
        ge=0,
        le=1,
        description="stop when more than this share of the student's answer tokens cannot be "
        "aligned with the teacher's by text: before training for the data's answers, during "
        "it for the student's own (on-policy)",
    )


class TeacherSettings(ModelSettings):
    path: str | None = Field(
        None,
        description="local directory or hub id of the teacher (needed unless cached or served)",
    )
    source: Literal["online", "cache", "served"] = Field(
        "online",
        description="online: the teacher runs in the training process; cache: read what "
        "`betakd cache-teacher` stored in cache_dir; served: ask a vLLM server (server)",
    )
    server: ServerSettings | None = Field(
        None,
        description="the vLLM server of a served teacher (source: served; docs/served-teacher.md)",
    )
    cross_tokenizer: CrossTokenizerSettings | None = Field(
        None,
        description="the teacher's tokenizer differs from the student's: align answers by text "
        "and compare per group of text (source: online or cache; docs/cross-tokenizer.md)",
    )
    cache_dir: str | None = Field(None, description="offline teacher cache (source: cache)")
    cache_top_k: int = Field(
        32, ge=1, description="tokens per answer position a cache keeps (with the tail mass)"
    )

    @model_validator(mode="after")
    def _source_needs(self) -> TeacherSettings:
        if self.source == "online" and not self.path:
            raise ValueError("teacher.path is required when teacher.source is 'online'")
        if self.source == "cache" and not self.cache_dir:
            raise ValueError("teacher.cache_dir is required when teacher.source is 'cache'")
        if self.source == "served" and self.server is None:
            raise ValueError(
                "teacher.server (url, model) is required when teacher.source is 'served'"
            )
        return self


class DataSettings(Strict):
    train_file: str = Field(description="LLaVA-format JSON or JSONL conversations")
    image_folder: str | None = Field(
        None, description="folder the records' image paths are relative to (none: text-only)"
    )
    max_length: int = Field(
        2048,
        ge=8,
        description="tokens per sample and model; a longer sample loses its last answer "
        "tokens, or is skipped when none fits (image tokens are never cut)",
    )
    max_skip_fraction: float = Field(
        0.05, ge=0, le=1, description="stop when more than this share of records is skipped"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N records")


class LogitChannel(Strict):
    energy: str = Field(
        description="registered logit energy (fkl, rkl, jsd, cosine_probs, ...; docs/library.md)"
    )
    name: str | None = Field(None, description="channel name in logs; defaults to the energy")
    positions: Literal["answer", "answer_and_prompt"] = Field(
        "answer",
        description="answer tokens only, or the prompt's too (online teachers only)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="the energy's options (e.g. temperature)"
    )

    @field_validator("energy")
    @classmethod
    def _known_energy(cls, value: str) -> str:
        if value not in energies.names():
            raise ValueError(f"unknown energy {value!r}; registered: {', '.join(energies.names())}")
        return value

    @model_validator(mode="after")
    def _valid_options(self) -> LogitChannel:
        try:
            energies.get(self.energy, **self.options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"options: {err}") from err
        return self

    @property
    def channel(self) -> str:
        return self.name or self.energy


class FeatureChannelSettings(Strict):
    name: str = Field("visual", description="channel name in logs and the head")
    energy: str = Field("mse", description="feature energy: mse or cosine")
    source: Literal["visual_tokens"] = Field(
        "visual_tokens",
        description="what is matched: the visual tokens entering the language model, "
        "pooled to the smaller of the two counts",
    )
    adapter: Literal["student", "teacher"] = Field(
        "student",
        description="which side the linear adapter maps: student (the teacher's features "
        "stay a fixed target; FitNets) or teacher (the reference code; its target moves)",
    )
    normalize: bool = Field(
        False, description="standardise every token of both sides before the energy"
    )
    rank: int | None = Field(
        None, ge=1, description="low-rank adapter: match only an r-dimensional projection"
    )
    anneal_steps: int | None = Field(
        None,
        ge=1,
        description="the channel's weight falls linearly from full to zero over this many "
        "optimizer steps, then stays off (hints first, as FitNets' first stage); none: "
        "always on",
    )

    @field_validator("energy")
    @classmethod
    def _known_energy(cls, value: str) -> str:
        if value not in features.FEATURE_ENERGIES:
            raise ValueError(
                f"unknown feature energy {value!r}; registered: {sorted(features.FEATURE_ENERGIES)}"
            )
        return value


class ChannelSettings(Strict):
    logits: list[LogitChannel] = Field(
        default_factory=list, description="logit channels, each with its own beta"
    )
    features: list[FeatureChannelSettings] = Field(
        default_factory=list, description="visual feature channels, each with its own beta"
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="compute CE and logit energies from hidden states this many tokens at a "
        "time, never building full [N, V] logits (null: dense)",
    )
    chunk_compile: bool = Field(
        False, description="torch.compile each chunk (GPU; the first step compiles)"
    )

    def names(self) -> list[str]:
        return [c.channel for c in self.logits] + [f.name for f in self.features]

    @model_validator(mode="after")
    def _unique_names(self) -> ChannelSettings:
        _check_channel_names(self.names())
        prompt = [c.channel for c in self.logits if c.positions != "answer"]
        if self.chunk_size is not None and prompt:
            raise ValueError(
                f"chunk_size covers answer positions only; channels {prompt} ask for more"
            )
        return self


def _check_channel_names(names: list[str]) -> None:
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"channel names must be unique; repeated: {duplicated} (set `name`)")
    if weighting.CE in names:
        raise ValueError(f"{weighting.CE!r} is reserved for the cross-entropy channel")


class TeacherChannels(Strict):
    """The logit and feature channels that one teacher of ``teachers`` feeds."""

    logits: list[LogitChannel] = Field(
        default_factory=list, description="this teacher's logit channels"
    )
    features: list[FeatureChannelSettings] = Field(
        default_factory=list, description="this teacher's visual feature channels"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> TeacherChannels:
        _check_channel_names([c.channel for c in self.logits] + [f.name for f in self.features])
        return self


TEACHER_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


class NamedTeacherSettings(TeacherSettings):
    """One of several teachers: its model or cache, and the channels it feeds (their names
    in logs, metrics and the head carry the teacher's: ``big/cosine_probs``)."""

    name: str = Field(pattern=TEACHER_NAME, description="letters, digits, _ and -")
    channels: TeacherChannels = Field(
        default_factory=TeacherChannels, description="the channels this teacher feeds"
    )


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
    """One teacher and the channels it feeds, as the recipe sees either config form.

    ``name`` is None for the single ``teacher`` form, whose channel names stay as
    written; ``key`` is where its settings are in the config (for error messages).
    """

    name: str | None
    key: str
    settings: TeacherSettings
    logits: list[LogitChannel]
    features: list[FeatureChannelSettings]

    def channel(self, local_name: str) -> str:
        return local_name if self.name is None else f"{self.name}/{local_name}"

    @property
    def channel_names(self) -> list[str]:
        return [self.channel(c.channel) for c in self.logits] + [
            self.channel(f.name) for f in self.features
        ]


Representation = Literal["teacher_visual", "teacher_answer_hidden", "teacher_confidence"]
# In weighting.representation_from: the student's own representation (detached).
STUDENT = "student"
STUDENT_REPRESENTATIONS = ("teacher_visual", "teacher_answer_hidden")


class WeightingSettings(Strict):
    name: str = Field(
        "task",
        description="equal | fixed | task | instance | closed_form | reference "
        "(docs/library.md, docs/weighting.md)",
    )
    options: weighting.WeightingOptions = Field(
        default_factory=dict,
        validate_default=True,
        description="the weighting's options, parsed by its name: its own (hidden, weights, "
        "...), prior_shape, prior_rate_scale, trust, reliability (unknown ones are named "
        "with the valid list; every weighting's options are listed below)",
    )
    learning_rate: float = Field(0.02, gt=0, description="Adam step on log-betas and adapters")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay of the weighting's own parameters"
    )
    adapter_weight_decay: float = Field(0.0, ge=0, description="weight decay of feature adapters")
    calibration_samples: int = Field(
        256,
        ge=1,
        description="first training samples whose mean energies set each channel's energy "
        "scale before training (used by prior_rate_scale, trust and scale_momentum)",
    )
    reliability_samples: int = Field(
        8192,
        ge=4,
        description="first training samples whose teacher NLLs and h(x) fit the teacher "
        "reliability (options.reliability) before training",
    )
    representation: Representation = Field(
        "teacher_visual",
        description="h(x) of an instance weighting and of the reliability: the teacher's "
        "pooled visual tokens, its pooled answer hidden states, or its confidence",
    )
    representation_from: list[str] | None = Field(
        None,
        min_length=1,
        description="with several teachers: whose representation h(x) is, concatenated in "
        "this order: teacher names, then optionally `student` (the student's own, "
        "detached; default: the first teacher's)",
    )
    reduction: Literal["sample", "token"] = Field(
        "sample",
        description="every sample weighs the same, or each by its answer tokens (as "
        "token-averaged CE)",
    )
    init_from: str | None = Field(
        None, description="betakd_head.safetensors (or its folder) of an earlier stage"
    )

    @field_validator("name")
    @classmethod
    def _known_weighting(cls, value: str) -> str:
        if value not in weighting.names():
            raise ValueError(
                f"unknown weighting {value!r}; available: {', '.join(weighting.names())}"
            )
        return value

    @field_validator("options", mode="plain")
    @classmethod
    def _parsed_options(cls, value: Any, info: ValidationInfo) -> Any:
        """The options as the model of the weighting ``name`` (errors name the key:
        ``weighting.options.trust.rho: ...``)."""
        name = info.data.get("name")
        if name is None:  # an unknown name, reported on its own
            return value
        model = weighting.options_model(name)
        if isinstance(value, weighting.KindOptions) and not isinstance(value, model):
            value = value.model_dump(exclude_unset=True)
        return model.model_validate(value)

    @field_serializer("options")
    def _given_options(self, value: Any, info: FieldSerializationInfo) -> Any:
        """Only the options given (as in the YAML), so a dumped config reads as written
        and stays valid for another weighting name."""
        if isinstance(value, BaseModel):
            return value.model_dump(mode=info.mode, exclude_unset=True)
        return value

    @property
    def network_input(self) -> bool:
        """Whether the weighting itself reads h(x) (an instance network)."""
        return self.name == "instance" or (
            isinstance(self.options, weighting.ReferenceOptions)
            and self.options.level == "instance"
        )

    @property
    def reliability(self) -> weighting.ReliabilityOptions | None:
        """The teacher reliability's options, when the weighting has one."""
        return getattr(self.options, "reliability", None)

    @property
    def uses_reliability(self) -> bool:
        return self.reliability is not None

    @property
    def needs_representation(self) -> bool:
        return self.network_input or self.uses_reliability

    def build_options(self, representation_dim: int) -> weighting.KindOptions:
        """The parsed options with the width of h(x) filled in where not given."""
        fills: dict[str, Any] = {}
        if self.network_input and self.options.input_dim is None:
            fills["input_dim"] = representation_dim
        if self.reliability is not None and self.reliability.input_dim is None:
            fills["reliability"] = self.reliability.replace(input_dim=representation_dim)
        return self.options.replace(**fills) if fills else self.options


class GenerationOptions(Strict):
    max_new_tokens: int = Field(
        32, ge=1, description="longest student answer, end of turn included"
    )
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off)")


class PolicySettings(Strict):
    """Whose answers the teacher scores: the data's (off-policy) or the student's own."""

    mode: Literal["off_policy", "on_policy", "mixed"] = Field(
        "off_policy",
        description="the data's answers, the student's own (scored by the teacher), or a mix",
    )
    student_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="mode mixed: probability that a batch (or sample) is answered by the "
        "student (lambda; on_policy is 1, off_policy 0, whatever this says)",
    )
    per: Literal["batch", "sample"] = Field(
        "batch", description="mixed: draw the choice once per batch (as GKD) or per sample"
    )
    start_step: int = Field(
        0,
        ge=0,
        description="optimizer steps on the data's answers before the student answers any "
        "(a warm start: GKD starts from a fine-tuned student)",
    )
    ce: Literal["data", "none"] = Field(
        "data",
        description="the CE channel of a student-answered sample: CE on the data's answer "
        "to the same prompt (an extra student pass), or none",
    )
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description="how the student samples its answers"
    )

    @property
    def on_policy(self) -> bool:
        """Whether any step may be answered by the student."""
        return self.mode == "on_policy" or (self.mode == "mixed" and self.student_fraction > 0)


class NonFinitePolicy(Strict):
    action: Literal["stop", "skip"] = Field(
        "stop",
        description="a non-finite loss stops the run naming the step and samples, or the "
        "step is skipped (counted in the logs)",
    )


class ScheduleSettings(Strict):
    restart_at: int | None = Field(
        None,
        ge=0,
        description=(
            "extending a finished run: the learning-rate schedule (training.lr_scheduler_type,"
            " its warmup) starts afresh after this step and spans the steps up to "
            "training.max_steps; set it to the step the run resumes from. None: one schedule "
            "over the whole run, so a resumed run with a larger max_steps follows the "
            "schedule planned for the new length from the step it resumes at"
        ),
    )
