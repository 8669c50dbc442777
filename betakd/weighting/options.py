"""The options of every weighting, as typed models (pydantic, with help text).

Each weighting kind has one model (:class:`EqualOptions`, :class:`FixedOptions`,
:class:`TaskOptions`, :class:`InstanceOptions`, :class:`ClosedFormOptions`,
:class:`ReferenceOptions`); the options several kinds share are declared once and
inherited: the Gamma hyperprior (:class:`PriorOptions`, flat keys ``prior_*``), the
robust factors (:class:`RobustOptions`: the nested groups ``trust``
(:class:`TrustOptions`) and ``reliability`` (:class:`ReliabilityOptions`), and
``scale_momentum``). ``betakd.weighting.build`` and a config's ``weighting.options`` are
parsed through these models; the weightings take the parsed objects.

Unknown keys are errors that name the valid ones. A rule that needs the channels (trust
channels that are weighted, a weight for every channel, ``d/2 + prior_shape - 1 > 0``)
is checked when the weighting is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from betakd.reliability import TeacherReliability
from betakd.weighting.robust import (
    TRUST_KINDS,
    TRUST_REFERENCES,
    GammaPrior,
    SharedTrust,
    TrustKind,
    TrustReference,
)

# Raised by the weighting, and by the options, when both per-sample factors are given.
TRUST_AND_RELIABILITY = (
    "give trust or reliability, not both: both set a per-sample factor on the teacher channels"
)


class Options(BaseModel):
    """Base of every options model: frozen, and an unknown key is an error naming the
    valid ones (``UNKNOWN``, with ``{unknown}`` and ``{known}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    UNKNOWN: ClassVar[str] = "unknown keys {unknown}; expected some of {known}"

    @classmethod
    def option_names(cls) -> list[str]:
        """The keys, a class's own before those it inherits (most specific first)."""
        names: list[str] = []
        for klass in cls.__mro__:
            own = [n for n in getattr(klass, "__annotations__", {}) if n in cls.model_fields]
            names += [n for n in own if n not in names]
        return names

    @classmethod
    def _known_text(cls) -> str:
        return str(sorted(cls.model_fields))

    def given(self) -> dict[str, Any]:
        """The options given (not defaulted), as parsed values."""
        return {key: getattr(self, key) for key in self.model_fields_set}

    def replace(self, **updates: Any) -> Self:
        """A validated copy with ``updates`` given as well."""
        return self.model_validate({**self.given(), **updates})

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(key) for key in set(data) - set(cls.model_fields))
            if unknown:
                raise PydanticCustomError(
                    "unknown_options",
                    cls.UNKNOWN,
                    {"unknown": str(unknown), "known": cls._known_text()},
                )
        return data


# --------------------------------------------------------------------------- nested groups


class TrustOptions(Options):
    """A per-sample trust in (0, 1] on the teacher channels' betas (docs/weighting.md,
    section 2.4).

    Builds a :class:`~betakd.weighting.robust.SharedTrust`, which also checks that
    ``channels`` and ``reference`` fit together.
    """

    channels: tuple[str, ...] = Field(
        (),
        description="reference student: the channels whose relative energy the trust reads "
        "(one name or a list); reference data: none",
    )
    reference: TrustReference = Field(
        "student",
        description="data: the teacher's mean NLL of the answer tokens (nats); student: the "
        "mean relative student-teacher energy of `channels`",
    )
    kind: TrustKind = Field(
        "mixture",
        description="mixture: sigmoid(threshold - x); gamma: rho / (x + rho); superloss: "
        "SuperLoss's closed-form confidence over its maximum e",
    )
    rho: float = Field(1.0, gt=0, description="kind gamma: the disagreement of half trust")
    lam: float = Field(1.0, gt=0, description="kind superloss: its regularisation lambda")
    threshold: float = Field(
        1.0, description="kind mixture and superloss: the disagreement where trust falls"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_shared_trust(cls, data: Any) -> Any:
        return dataclasses.asdict(data) if isinstance(data, SharedTrust) else data

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_list(cls, value: Any) -> Any:
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else value

    @field_validator("reference", "kind", mode="before")
    @classmethod
    def _known_value(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = {"reference": TRUST_REFERENCES, "kind": TRUST_KINDS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"trust {info.field_name} must be one of {allowed}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrustOptions:
        self.build()  # SharedTrust checks that channels and reference fit together
        return self

    def build(self) -> SharedTrust:
        return SharedTrust(**self.model_dump())


class ReliabilityOptions(Options):
    """The teacher reliability, fitted on the training data before the first step
    (docs/weighting.md, section 9).

    Builds a :class:`~betakd.reliability.TeacherReliability`.
    """

    input_dim: int | None = Field(
        None, ge=1, description="the width of h(x) (betakd train fills it in)"
    )
    teachers: int | None = Field(
        None,
        ge=1,
        description="teachers whose reliability is fitted (null: those the weighted "
        "channels read, from channel_teachers)",
    )
    neighbours: int = Field(
        32,
        ge=1,
        description="nearest fit samples whose posteriors give r(h) at an input (at most an "
        "eighth of the fit set)",
    )
    anchor_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="share of inputs, most agreeing first, assumed to have a right teacher",
    )

    def build(self, teachers: int = 1) -> TeacherReliability:
        """The reliability model; ``teachers`` unless the options set their number."""
        if self.input_dim is None:
            raise ValueError("reliability needs input_dim, the width of the representation h(x)")
        return TeacherReliability(
            self.input_dim,
            self.teachers if self.teachers is not None else teachers,
            neighbours=self.neighbours,
            anchor_share=self.anchor_share,
        )


# --------------------------------------------------------------------------- shared parts


class KindOptions(Options):
    """Base of a weighting kind's options (the keys of ``weighting.options``)."""

    UNKNOWN: ClassVar[str] = "unknown option(s) {unknown}; its options: {known}"

    @classmethod
    def _known_text(cls) -> str:
        return ", ".join(cls.option_names()) or "none"

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of the weighting base class these options set."""
        return {}


class PriorOptions(KindOptions):
    """The conjugate Gamma(a, b) hyperprior on every beta (docs/weighting.md, section 3)."""

    prior_shape: float = Field(
        1.0,
        description="a: the Gamma hyperprior's shape; with rate 0 and shape 1, no prior "
        "(d/2 + a - 1 must be > 0)",
    )
    prior_rate: float = Field(
        0.0, description="b: its rate, absolute (>= 0); bounds beta by (d/2 + a - 1) / b"
    )
    prior_rate_scale: float | None = Field(
        None,
        description="rho: its rate relative to each channel's energy scale, b = rho * scale "
        "(> 0; not with prior_rate)",
    )

    @model_validator(mode="after")
    def _valid_prior(self) -> PriorOptions:
        self.gamma_prior()  # GammaPrior checks its values
        return self

    def gamma_prior(self) -> GammaPrior:
        return GammaPrior(self.prior_shape, self.prior_rate, self.prior_rate_scale)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "prior": self.gamma_prior()}


class RobustOptions(KindOptions):
    """The per-sample factors on the teacher channels and the running energy scale."""

    trust: TrustOptions | None = Field(
        None,
        description="a per-sample trust in the teacher on its channels' betas (its keys: "
        "the trust options); not with reliability",
    )
    reliability: ReliabilityOptions | None = Field(
        None,
        description="the teacher reliability: P(teacher right) on the teacher channels, "
        "P(label right) on the CE (its keys: the reliability options; `{}`: defaults); "
        "not with trust",
    )
    channel_teachers: dict[str, str | None] | None = Field(
        None,
        description="the teacher each teacher channel reads (betakd train fills it in with "
        "several teachers and a reliability)",
    )
    scale_momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="the energy scale follows an exponential mean of earlier optimizer "
        "steps' mean energies with this momentum (null: it stays at its calibrated value)",
    )

    @model_validator(mode="after")
    def _one_factor(self) -> RobustOptions:
        if self.trust is not None and self.reliability is not None:
            raise ValueError(TRUST_AND_RELIABILITY)
        return self

    def arguments(self) -> dict[str, Any]:
        return {
            **super().arguments(),
            "trust": self.trust,
            "reliability": self.reliability,
            "channel_teachers": self.channel_teachers,
            "scale_momentum": self.scale_momentum,
        }


class BetaOptions(PriorOptions, RobustOptions):
    """What every Beta-KD weighting (task, instance, closed form) takes."""

    weight_ce: bool = Field(False, description="weight the CE channel too (the paper does not)")
    d: float | dict[str, float] = Field(
        1.0,
        description="the Laplace dimension per weighted channel (one value, or a mapping "
        "channel: d, others 1); beta's optimum is d / (2 l)",
    )

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "weight_ce": self.weight_ce, "d": self.d}


class LearnedBetaOptions(BetaOptions):
    """How a learned beta is kept positive and where it starts (task, instance)."""

    parameterization: Literal["exp", "softplus"] = Field(
        "exp", description="beta = exp(raw) or softplus(raw)"
    )
    bounds: tuple[float, float] | None = Field(
        None,
        description="[low, high]: log beta = log low + (log high - log low) * sigmoid(raw) "
        "(smooth, no dead zone)",
    )
    init_beta: float = Field(1.0, gt=0, description="every beta's initial value")


# --------------------------------------------------------------------------- the kinds


class EqualOptions(KindOptions):
    """Every channel, CE included, with weight 1 (:class:`EqualWeighting`)."""


class FixedOptions(RobustOptions):
    """Constant weights per channel, no regulariser (:class:`FixedWeighting`)."""

    weights: dict[str, float] = Field(
        description="channel: weight for every teacher channel (ce: 1 unless given; >= 0)"
    )
    scale_relative: bool = Field(
        False,
        description="weights in units of the initial loss scales: weight w_k * s_ce / s_k "
        "(all ones start every channel at the CE's scale)",
    )


class TaskOptions(LearnedBetaOptions):
    """One learned beta per weighted channel, shared by all samples (:class:`TaskWeighting`)."""


class InstanceOptions(LearnedBetaOptions):
    """A beta per sample and channel, predicted from h(x) by a small network
    (:class:`InstanceWeighting`)."""

    input_dim: int | None = Field(
        None, ge=1, description="the width of h(x) (betakd train fills it in)"
    )
    hidden: int = Field(128, description="the network's hidden width")
    detach_representation: bool = Field(
        True, description="no gradient from the weighting into h(x)"
    )
    normalize_input: bool = Field(
        False,
        description="a LayerNorm (no affine) in front: for wide h(x) such as pooled visual "
        "tokens, not for a handful of statistics",
    )


class ClosedFormOptions(BetaOptions):
    """beta = c / (stopgrad(l) + b), no parameters (:class:`ClosedFormWeighting`)."""

    per: Literal["sample", "channel"] = Field(
        "sample",
        description="each sample's energy, or the channel's energy scale (with "
        "scale_momentum: a task-level closed form)",
    )
    min_energy: float = Field(
        1e-6,
        gt=0,
        description="floor of l + b, so beta stays finite where an energy reaches zero",
    )


class ReferenceOptions(KindOptions):
    """The authors' formulas, for parity runs; CE always weighted (:class:`ReferenceWeighting`)."""

    level: Literal["task", "instance"] = Field(
        "task", description="a log-variance per channel, or per sample from h(x)"
    )
    input_dim: int | None = Field(
        None, ge=1, description="level instance: the width of h(x) (betakd train fills it in)"
    )
    hidden: int = Field(128, description="level instance: the network's hidden width")
