"""Logit channels (CE and token energies) from final hidden states, a chunk at a time.

The dense path builds student and teacher logits ``[N, V]`` for every supervised token
and calls an energy of :mod:`betakd.energies` on them. With V = 150k and a few thousand
answer tokens those logits, and the float32 intermediates of the energy, take tens of
GB. This module computes the same per-token values from the student's hidden states
``[N, H]`` and ``lm_head`` weight (and bias), and from the teacher's per-token targets
(:class:`TeacherLogits`: hidden states and ``lm_head``, a top-k summary, or logits at
hand; see :mod:`betakd.teachers.targets`), ``chunk_size`` tokens at a time, so only
chunk-sized logits ever exist.

One :class:`torch.autograd.Function`, two modes, chosen by the caller:

* **single pass** (``upstream`` given): the gradient of the final loss with respect to
  every per-token value, ``g [N, C]``, is known before the values are (the loss is
  affine in them, e.g. betas that do not depend on the energies' values, see
  :meth:`betakd.distill.DistillationModule.channel_values`). Each chunk's logits are
  built once; its values and the logit gradient ``sum_c g[n, c] * dv_c/dz_n`` come from
  one forward and one vector-Jacobian product through the registry's energy functions,
  and are folded into the hidden-state, weight and bias gradients at once, as Liger's
  chunked losses do: four lm_head-sized matmuls per chunk, like the dense path.
  Backward checks that the upstream gradient it receives is ``g`` (or ``g`` times one
  scalar, such as a loss scale or DDP's world size) and returns the stored gradients;
  any other upstream gradient (a per-channel diagnostic, say) falls back to the
  recomputation below, so gradients are exact in every case.
* **recompute** (general case): the forward pass computes the values without a graph;
  the backward pass, where ``g`` is first known, recomputes each chunk's logits (one
  student and one teacher matmul) and takes the vector-Jacobian product with ``g``. Six
  lm_head-sized matmuls per chunk instead of four, and one extra energy forward.

Either way the gradient is the one of ``sum_n,c g[n, c] * value[n, c]``, so any
per-token or per-sample weighting applied afterwards (``per_sample_mean``, learned or
instance-level betas) receives exact gradients, and the betas get theirs from the
values. Values and gradients equal the dense path up to float32 rounding. Double
backward is not supported.

With ``compile=True`` each chunk's CE and energies run as fused ``torch.compile``
kernels (GPUs; on an H200 in bfloat16 the recompute mode then takes 0.4-0.9x of the
dense time at under 1/13 of its memory; float32 without TF32 stays matmul-bound).
Compilation builds a graph per set of energies, chunk size, vocabulary and dtype;
beyond Dynamo's recompile limit (8 by default) it runs eagerly. On CPU the first
compilation takes about a minute.

The energies are never re-implemented here: every chunk calls the registry functions
(:func:`betakd.energies.get`), which are row-wise, so every registered energy works
chunked. Temperature and other options are bound when the energy is built::

    fns = {"fkl": energies.get("fkl", temperature=2.0)}

Typical use (see :func:`chunked_channels`)::

    mask, targets = next_token_targets(labels)                 # [B, T] bool, [B, T]
    packed = pack(student_hidden, mask)                        # [N, H], sample_index [N]
    teacher = HiddenStateLogits(pack(teacher_hidden, t_mask).hidden, t_head.weight)
    out = chunked_channels(packed.hidden, head.weight, {"t": teacher},
                           energies={"fkl": energies.get("fkl")},
                           labels=targets[mask])
    ce, kd = out.per_sample(packed.sample_index, num_samples=B)   # [B], {"fkl": [B]}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from betakd import energies as energy_registry
from betakd.labels import IGNORE_INDEX
from betakd.objective import per_sample_mean

EnergyFn = energy_registry.EnergyFn

# Default chunk: about ``elements`` logits, at least ``min_tokens`` tokens, rounded to a
# multiple of ``multiple`` tokens (down; up where ``round_up``). Peak memory grows with
# the chunk (eager energies keep about ten chunk-sized float32 tensors alive, compiled
# ones far fewer). On GPUs every chunk's matmuls re-read the whole lm_head, and token
# counts that are not a multiple of 64 slow bfloat16 matmuls. Measured on an H200
# (N = 4096, H = 1024; benchmarks/README.md): eager 256 tokens and compiled 512 tokens
# stay under 1/10 and 1/13 of the dense peak at V = 32000 and 151936. On a CPU (2 cores,
# H = 1024, V = 32000), lm_head matmuls of 128-token chunks take 1.23x the time of
# 1024-token ones, 256-token chunks 1.04x; a float32 chunk of just over 32 MiB (264
# tokens at V = 32000) is above glibc's largest mmap threshold, so freed chunk tensors go
# back to the system instead of fragmenting the heap: 450 MB resident instead of 600 MB
# at 256 tokens for a forward-KL step of 4096 tokens (benchmarks/peers.py).
DEFAULT_CHUNK = {
    "cpu": {"elements": 1 << 23, "min_tokens": 16, "multiple": 8, "round_up": True},
    "cuda": {"elements": 1 << 23, "min_tokens": 256, "multiple": 64},
    "cuda-compiled": {"elements": 1 << 24, "min_tokens": 512, "multiple": 64},
}


# --------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """Supervised positions packed to rows: ``hidden [N, ...]`` and ``sample_index [N]``."""

    hidden: Tensor
    sample_index: Tensor
    num_samples: int


def pack(values: Tensor, mask: Tensor) -> Packed:
    """Keep the positions of ``values [B, T, ...]`` where ``mask [B, T]`` is true.

    Rows come out in batch-major order (sample 0's tokens first), so the student's and
    the teacher's packed rows line up whenever both masks select the same number of
    tokens per sample in the same order.
    """
    if mask.dtype != torch.bool or mask.shape != values.shape[:2]:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(values.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    batch_index, position_index = mask.nonzero(as_tuple=True)
    return pack_positions(values, batch_index, position_index)


def pack_positions(values: Tensor, batch_index: Tensor, position_index: Tensor) -> Packed:
    """Rows ``values[batch_index[n], position_index[n]]`` for index tensors ``[N]``."""
    if batch_index.shape != position_index.shape or batch_index.dim() != 1:
        raise ValueError("batch_index and position_index must be 1-D tensors of equal length")
    return Packed(values[batch_index, position_index], batch_index, values.shape[0])


def next_token_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Causal-LM shift: position t predicts label t+1.

    Returns ``mask [B, T]`` (true where the *next* label is supervised) and
    ``targets [B, T]`` (the next label, ``ignore_index`` at the last position), so that
    ``pack(hidden, mask)`` and ``targets[mask]`` are aligned.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets != ignore_index, targets


# --------------------------------------------------------------------------- teacher side


class TeacherLogits(Protocol):
    """The teacher's logits (or log-probabilities) for packed rows ``[start, stop)``;
    implementations in :mod:`betakd.teachers.targets`."""

    @property
    def num_tokens(self) -> int: ...

    def logits(self, start: int, stop: int, vocab_size: int) -> Tensor: ...

    def rows(self, index: Tensor) -> TeacherLogits:
        """The same form for the rows ``index [M]`` only."""
        ...


def map_rows(
    source: TeacherLogits,
    fn: Callable[[Tensor, int], Tensor],
    vocab_size: int,
    chunk_size: int | None = None,
) -> Tensor:
    """``fn(logits [n, V], start) -> [n, ...]`` over a source's rows, ``chunk_size`` rows
    at a time (default 1024), concatenated; no gradient."""
    size = chunk_size or 1024
    n = source.num_tokens
    with torch.no_grad():
        # An empty source still yields one empty chunk, so the result keeps fn's shape.
        return torch.cat(
            [
                fn(source.logits(start, min(start + size, n), vocab_size), start)
                for start in range(0, max(n, 1), size)
            ]
        )


def teacher_token_nll(
    source: TeacherLogits, token_ids: Tensor, vocab_size: int, chunk_size: int | None = None
) -> Tensor:
    """The teacher's negative log-likelihood of each packed row's token ``[N]`` (float32,
    no gradient), built ``chunk_size`` rows at a time from any teacher source."""

    def nll(logits: Tensor, start: int) -> Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        rows = token_ids[start : start + logits.shape[0]].to(log_probs.device)
        return -log_probs.gather(1, rows[:, None]).squeeze(1)

    return map_rows(source, nll, vocab_size, chunk_size).to(token_ids.device)


# --------------------------------------------------------------------------- channels


@dataclass
class ChunkedOutput:
    """Per-token channel values: ``ce [N]`` (None without labels) and ``energies[name] [N]``."""

    ce: Tensor | None
    energies: dict[str, Tensor] = field(default_factory=dict)

    def per_sample(
        self, sample_index: Tensor, num_samples: int
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Mean over each sample's tokens (``objective.per_sample_mean``): ``[B]`` each."""
        ce = None if self.ce is None else per_sample_mean(self.ce, sample_index, num_samples)
        kd = {
            name: per_sample_mean(values, sample_index, num_samples)
            for name, values in self.energies.items()
        }
        return ce, kd


def chunk_columns(
    student_logits: Tensor,
    teacher_logits: tuple[Tensor, ...],
    labels: Tensor | None,
    energy_fns: tuple[EnergyFn, ...],
) -> Tensor:
    """Per-token values ``[n, C]`` (float32) of one chunk: CE (if labels) then energies,
    each against its own teacher's logits (``teacher_logits[i]`` for ``energy_fns[i]``)."""
    values = []
    if labels is not None:
        values.append(energy_registry.cross_entropy(student_logits, labels, IGNORE_INDEX))
    values.extend(fn(student_logits, t) for fn, t in zip(energy_fns, teacher_logits, strict=True))
    return torch.stack([v.float() for v in values], dim=1)


@dataclass
class _Plan:
    """Everything the autograd function needs besides the differentiable tensors."""

    teachers: tuple[TeacherLogits, ...]
    labels: Tensor | None
    energy_fns: tuple[EnergyFn, ...]
    energy_teacher: tuple[int, ...]  # per energy, its index in ``teachers``
    chunk_size: int
    compiled: bool = False
    # Single pass: d(loss)/d(values) [N, C], known before the values; None: recompute.
    upstream: Tensor | None = None
    # Which of hidden, weight, bias need a gradient.
    needs: tuple[bool, bool, bool] = (False, False, False)

    def __post_init__(self) -> None:
        # Static shapes: every chunk is padded to chunk_size, so one graph serves all.
        self._values = (
            torch.compile(chunk_columns, dynamic=False) if self.compiled else chunk_columns
        )

    @property
    def num_columns(self) -> int:
        return int(self.labels is not None) + len(self.energy_fns)

    def spans(self, num_tokens: int) -> Iterator[tuple[int, int]]:
        for start in range(0, num_tokens, self.chunk_size):
            yield start, min(start + self.chunk_size, num_tokens)

    def columns(self, student_logits: Tensor, start: int, stop: int) -> Tensor:
        """Per-token values ``[n, C]`` of rows ``[start, stop)`` from their student logits."""
        vocab_size = student_logits.shape[-1]
        # Each teacher's chunk is built once, however many energies read it.
        built = [t.logits(start, stop, vocab_size) for t in self.teachers]
        labels = None if self.labels is None else self.labels[start:stop]
        if not self.compiled:
            # CE and every energy of the chunk share the student's (and the teacher's)
            # log-softmax. Not for half-precision logits: their gradient would then be
            # rounded once for the sum of the channels instead of once per channel, as
            # on the dense path.
            shared = student_logits.dtype == torch.float32
            with energy_registry.sharing_log_probs() if shared else contextlib.nullcontext():
                return chunk_columns(
                    student_logits, self._per_energy(built), labels, self.energy_fns
                )
        pad = self.chunk_size - (stop - start)
        values = self._values(
            _pad_rows(student_logits, pad, 0.0),
            self._per_energy([_pad_rows(t, pad, 0.0) for t in built]),
            None if labels is None else _pad_rows(labels, pad, IGNORE_INDEX),
            self.energy_fns,
        )
        return values[: stop - start]

    def _per_energy(self, teacher_logits: list[Tensor]) -> tuple[Tensor, ...]:
        return tuple(teacher_logits[i] for i in self.energy_teacher)


def _pad_rows(x: Tensor, pad: int, value: float) -> Tensor:
    # Padding rows carry zero upstream gradient, so they add nothing to any gradient.
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad), value=value) if pad else x


# The profiler range around both passes (see betakd.profiling.peak_tensor_bytes).
PROFILER_RANGE = "betakd.chunked"


class _ChunkedChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> Tensor:
        ctx.plan = plan
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.gradients = None
        with torch.profiler.record_function(PROFILER_RANGE):
            out = torch.empty(
                hidden.shape[0], plan.num_columns, dtype=torch.float32, device=hidden.device
            )
            if plan.upstream is None:
                for start, stop in plan.spans(hidden.shape[0]):
                    logits = F.linear(hidden[start:stop], weight, bias)
                    out[start:stop] = plan.columns(logits, start, stop)
            else:
                ctx.gradients = _gradients(
                    plan, hidden, weight, bias, plan.upstream, plan.needs, ctx.autocast, out
                )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        plan: _Plan = ctx.plan
        needs = tuple(ctx.needs_input_grad[:3])
        with torch.profiler.record_function(PROFILER_RANGE):
            gradients, ctx.gradients = ctx.gradients, None
            if gradients is not None:
                # Handed over, not kept: autograd can then adopt the weight gradient as
                # .grad instead of copying it. A second backward (retain_graph) recomputes.
                scale = _common_scale(grad_out, plan.upstream)
                if scale is not None:
                    return (*(_scaled(g, scale) for g in gradients), None)
            grads = _gradients(plan, hidden, weight, bias, grad_out, needs, ctx.autocast)
        return (*grads, None)


def _gradients(
    plan: _Plan,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    upstream: Tensor,
    needs: tuple[bool, bool, bool],
    autocast: tuple[str, torch.dtype] | None,
    values: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum(upstream * values)`` for hidden, weight and bias (those in
    ``needs``), a chunk at a time; writes the values into ``values`` when given."""
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    weight_acc = _Accumulator(weight) if need_weight else None
    bias_acc = _Accumulator(bias) if need_bias else None
    for start, stop in plan.spans(hidden.shape[0]):
        h = hidden[start:stop]
        with _autocast(autocast):
            chunk_values, grad_logits = _values_and_logit_gradient(
                plan, h, weight, bias, upstream[start:stop], start
            )
        if values is not None:
            values[start:stop] = chunk_values
        # Under autocast the logits (and their gradient) are in the autocast dtype.
        if grad_hidden is not None:
            grad_hidden[start:stop] = grad_logits @ weight.to(grad_logits.dtype)
        if weight_acc is not None:
            weight_acc.add_product(grad_logits.t(), h.to(grad_logits.dtype))
        if bias_acc is not None:
            bias_acc.add(grad_logits.sum(dim=0))
    grad_weight = weight_acc.result() if weight_acc is not None else None
    grad_bias = bias_acc.result() if bias_acc is not None else None
    return grad_hidden, grad_weight, grad_bias


def _values_and_logit_gradient(
    plan: _Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, upstream: Tensor, start: int
) -> tuple[Tensor, Tensor]:
    """One chunk's values ``[n, C]`` and d(sum(upstream * values)) / d(student logits)."""
    with torch.no_grad():
        logits = F.linear(hidden, weight, bias)
    logits.requires_grad_(True)
    with torch.enable_grad():
        values = plan.columns(logits, start, start + hidden.shape[0])
        (grad_logits,) = torch.autograd.grad(values, logits, upstream)
    return values.detach(), grad_logits


def _common_scale(got: Tensor, assumed: Tensor, rtol: float = 1e-6) -> float | None:
    """``s`` with ``got == s * assumed`` (to ``rtol`` of the largest entry), else None.

    The loss may be scaled after the objective (a gradient scaler, DDP's world size);
    anything else means the upstream gradient is not the one the single pass assumed.
    """
    peak, at = assumed.abs().flatten().max(dim=0)
    if float(peak) == 0.0:
        return 0.0 if not bool(got.any()) else None
    scale = got.flatten()[at] / assumed.flatten()[at]
    error = (got - scale * assumed).abs().max()
    return float(scale) if float(error) <= rtol * float(peak * scale.abs()) else None


def _scaled(gradient: Tensor | None, scale: float) -> Tensor | None:
    if gradient is None or scale == 1.0:
        return gradient
    return gradient * scale


def _autocast_state(device_type: str) -> tuple[str, torch.dtype] | None:
    """The caller's autocast setting, to recompute the logits in backward exactly as in
    forward (autograd runs backward without the caller's autocast)."""
    if torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


def _autocast(state: tuple[str, torch.dtype] | None):
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state[0], dtype=state[1])


class _Accumulator:
    """Sums per-chunk gradients; half-precision parameters are summed in float32.

    A bfloat16 running sum would round at every chunk, an error that grows with the
    number of chunks; the dense path rounds once.
    """

    def __init__(self, like: Tensor) -> None:
        self.dtype = like.dtype
        wide = like.dtype in (torch.float32, torch.float64)
        self.total = torch.zeros_like(like, dtype=like.dtype if wide else torch.float32)

    def add_product(self, a: Tensor, b: Tensor) -> None:
        if a.dtype == self.total.dtype:
            self.total.addmm_(a, b)
        else:
            self.total.add_(a @ b)

    def add(self, value: Tensor) -> None:
        self.total.add_(value)

    def result(self) -> Tensor:
        return self.total.to(self.dtype)


def default_chunk_size(
    vocab_size: int, device: torch.device | str = "cpu", compiled: bool = False
) -> int:
    """Tokens per chunk for a vocabulary, device and mode (see ``DEFAULT_CHUNK``)."""
    kind = torch.device(device).type
    key = f"{kind}-compiled" if compiled and f"{kind}-compiled" in DEFAULT_CHUNK else kind
    rule = DEFAULT_CHUNK.get(key, DEFAULT_CHUNK["cuda"])
    step = rule["multiple"]
    if rule.get("round_up"):
        tokens = -(-rule["elements"] // vocab_size)
        tokens = -(-tokens // step) * step
    else:
        tokens = rule["elements"] // vocab_size
        tokens -= tokens % step
    return max(rule["min_tokens"], tokens)


def chunked_channels(
    hidden: Tensor,
    weight: Tensor,
    teachers: Mapping[str | None, TeacherLogits] | None = None,
    *,
    energies: Mapping[str, EnergyFn] | None = None,
    energy_teachers: Mapping[str, str | None] | None = None,
    labels: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    upstream: Tensor | None = None,
) -> ChunkedOutput:
    """Per-token CE and energies for packed student rows, without full ``[N, V]`` logits.

    Args:
        hidden: packed student final hidden states ``[N, H]`` (see :func:`pack`).
        weight: the student's ``lm_head`` weight ``[V, H]``; ``bias`` its bias ``[V]``.
        teachers: teacher name -> its logits for the same N rows (:class:`TeacherLogits`,
            e.g. :class:`betakd.teachers.HiddenStateLogits` or
            :class:`betakd.teachers.TopKLogits`); required when ``energies`` is not
            empty.
        energies: name -> energy built with :func:`betakd.energies.get` (options such as
            temperature bound there). All are evaluated on the same chunk logits.
        energy_teachers: energy name -> the teacher it reads (default, with one
            teacher: that one).
        labels: target ids ``[N]`` for the CE channel (``-100`` rows give 0); None
            skips CE.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` for the device
            and mode (GPU: 256 eager, 512 compiled, at V >= 32k).
        compile: run each chunk's CE and energies through ``torch.compile`` (fused
            kernels; the last chunk is padded so one static-shape graph serves all).
            Build the energies once and reuse them: the compiled graphs are keyed on
            the energy objects, and new ones would recompile.
        upstream: the gradient of the final loss with respect to the returned values,
            ``[N, C]`` (columns: CE when labels are given, then the energies in order),
            when it is known before they are computed: selects the single-pass mode
            (module docstring). Without it, or when no gradient is needed, chunks are
            recomputed in backward.

    Returns per-token float32 values; gradients flow to ``hidden``, ``weight`` and
    ``bias`` (whichever require grad) and are exact for any upstream weighting.
    """
    energies = dict(energies or {})
    read, energy_teacher = _teachers_of_energies(teachers or {}, energies, energy_teachers)
    _check_inputs(hidden, weight, read, labels)
    size = chunk_size or default_chunk_size(weight.shape[0], hidden.device, compile)
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    plan = _Plan(read, labels, tuple(energies.values()), energy_teacher, size, compile)
    needs = (
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    if upstream is not None and torch.is_grad_enabled() and any(needs):
        if upstream.shape != (hidden.shape[0], plan.num_columns):
            raise ValueError(
                f"upstream must have shape [{hidden.shape[0]}, {plan.num_columns}], got "
                f"{tuple(upstream.shape)}"
            )
        plan.upstream = upstream.detach().float()
        plan.needs = needs
    values = _ChunkedChannels.apply(hidden, weight, bias, plan)
    columns = values.unbind(dim=1)
    ce = columns[0] if labels is not None else None
    offset = int(labels is not None)
    return ChunkedOutput(ce, dict(zip(energies, columns[offset:])))


def _teachers_of_energies(
    teachers: Mapping[str | None, TeacherLogits],
    energies: Mapping[str, EnergyFn],
    energy_teachers: Mapping[str, str | None] | None,
) -> tuple[tuple[TeacherLogits, ...], tuple[int, ...]]:
    """The teachers the energies read (each once) and, per energy, its teacher's index."""
    if not energies:
        return (), ()
    if not teachers:
        raise ValueError("energies need a teacher source")
    if energy_teachers is None and len(teachers) == 1:
        energy_teachers = dict.fromkeys(energies, next(iter(teachers)))
    missing = [name for name in energies if name not in (energy_teachers or {})]
    if missing:
        raise ValueError(
            f"with several teachers, energy_teachers must name the teacher of {missing}"
        )
    names = list(dict.fromkeys(energy_teachers[name] for name in energies))
    unknown = [name for name in names if name not in teachers]
    if unknown:
        raise ValueError(f"energy_teachers names unknown teachers {unknown}; have {list(teachers)}")
    return tuple(teachers[n] for n in names), tuple(
        names.index(energy_teachers[e]) for e in energies
    )


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    teachers: tuple[TeacherLogits, ...],
    labels: Tensor | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if labels is None and not teachers:
        raise ValueError("nothing to compute: give labels (CE) and/or energies")
    if labels is not None and labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must have shape [{hidden.shape[0]}], got {tuple(labels.shape)}")
    for teacher in teachers:
        if teacher.num_tokens != hidden.shape[0]:
            raise ValueError(
                f"teacher has {teacher.num_tokens} packed tokens, the student {hidden.shape[0]}; "
                "align the answer tokens before packing"
            )
