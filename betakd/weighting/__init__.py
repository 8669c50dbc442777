"""Beta-KD weightings: how the CE channel and the teacher channels are combined.

Each weighting maps per-sample channel energies ``losses [B, C]`` (column order given
by ``channels``; the CE channel is named ``"ce"``) to a :class:`WeightingOutput`: a
per-sample loss ``[B]`` plus the betas, weighted terms and regularisers behind it.
Batch reduction is the objective's job (``betakd.objective``), not the weighting's.

The Beta-KD surrogate for a weighted channel k is (SPEC section 2)::

    beta_k * l_k - (d_k / 2) * log(beta_k)

whose minimiser over beta is ``d_k / (2 * l_k)``. ``d_k`` defaults to 1: each channel
counts as one scalar observation. Following the Laplace derivation literally would
set ``d_k`` to the activation dimension (e.g. the vocabulary size), which scales every
beta by the same large factor.

Unweighted channels (CE, by default, as in the paper) enter with weight 1 and no
regulariser. All weighting math runs in float32, also under autocast.

Two additions bound the per-sample forms (analysis and measurements: docs/weighting.md):

* a conjugate **Gamma(a, b) hyperprior** on every beta (``prior_shape`` a,
  ``prior_rate`` b or ``prior_rate_scale`` rho with b = rho * the channel's energy
  scale): the surrogate becomes ``beta * (l + b) - (d/2 + a - 1) * log(beta)``, its
  optimum ``(d/2 + a - 1) / (l + b)`` is bounded by its value at ``l = 0``, and its
  profile ``(d/2 + a - 1) * log(l + b)`` is bounded below (a Student-t-like robust loss);
* a **shared per-sample trust** (``trust``): a factor in (0, tau_max] computed from the
  relative energy of some channels (by default the logit channels) that multiplies the
  betas of the channels that cannot tell by themselves where the teacher is unreliable
  (feature channels, whose energy is no higher where the teacher is wrong).

The **energy scale** of a channel (a buffer) is its mean energy over the first
training samples, measured before training (``HeadCalibration.calibrate_energy_scale``), optionally
followed by a running mean over earlier optimizer steps (``scale_momentum``). It never
comes from the current micro-batch, so the weights do not depend on how a batch is split.

Every weighting's options are a typed model (:mod:`betakd.weighting.options`); ``build``
parses plain keyword values through it, and the weighting takes the parsed object.
"""

from betakd.weighting.base import (
    CE,
    PositiveMap,
    Weighting,
    WeightingOutput,
    at_least_float32,
)
from betakd.weighting.kinds import (
    ClosedFormWeighting,
    EqualWeighting,
    FixedWeighting,
    InstanceWeighting,
    ReferenceWeighting,
    TaskWeighting,
)
from betakd.weighting.options import (
    BetaOptions,
    ClosedFormOptions,
    EqualOptions,
    FixedOptions,
    InstanceOptions,
    KindOptions,
    LearnedBetaOptions,
    PriorOptions,
    ReferenceOptions,
    ReliabilityOptions,
    RobustOptions,
    TaskOptions,
    TrustOptions,
)
from betakd.weighting.registry import (
    WEIGHTINGS,
    build,
    names,
    options_model,
    options_of,
    parse_options,
)
from betakd.weighting.robust import (
    TRUST_KINDS,
    TRUST_REFERENCES,
    GammaPrior,
    SharedTrust,
    lambert_w,
)

# The options of any weighting kind (a config's ``weighting.options`` is one of them,
# chosen by the weighting's name).
WeightingOptions = (
    EqualOptions
    | FixedOptions
    | TaskOptions
    | InstanceOptions
    | ClosedFormOptions
    | ReferenceOptions
)

__all__ = [
    "CE",
    "TRUST_KINDS",
    "TRUST_REFERENCES",
    "WEIGHTINGS",
    "BetaOptions",
    "ClosedFormOptions",
    "ClosedFormWeighting",
    "EqualOptions",
    "EqualWeighting",
    "FixedOptions",
    "FixedWeighting",
    "GammaPrior",
    "InstanceOptions",
    "InstanceWeighting",
    "KindOptions",
    "LearnedBetaOptions",
    "PositiveMap",
    "PriorOptions",
    "ReferenceOptions",
    "ReferenceWeighting",
    "ReliabilityOptions",
    "RobustOptions",
    "SharedTrust",
    "TaskOptions",
    "TaskWeighting",
    "TrustOptions",
    "Weighting",
    "WeightingOptions",
    "WeightingOutput",
    "at_least_float32",
    "build",
    "lambert_w",
    "names",
    "options_model",
    "options_of",
    "parse_options",
]
