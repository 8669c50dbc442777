"""Student-generated answers in place of the data's: the sampling step of on-policy
distillation (GKD; issue 12), for any supported family.

:func:`sample_answers` generates each row's answer from the student, given the row's
prompt (its tokens before the first supervised label: the conversation up to the first
assistant answer, images included), in evaluation mode under ``no_grad``, batched with
left padding and the KV cache, seeded so that a step's samples are reproducible.
:func:`with_answers` writes answers into a collated batch (the student's, or a
teacher's with its own image tokens): prompt + answer, labels on the answer only
(end of turn included), right padding, whichever padding the batch had. Both batches then go through the usual
alignment, teacher source and energies, unchanged.

:class:`PolicyMix` decides which rows of a training step the student answers itself
(GKD's student-data fraction lambda, per batch or per sample), from the run's seed, the
optimizer step and the rows' sample indices only: a resumed run, another batch size or
gradient accumulation choose the same rows, and so does every process of a
data-parallel run for the per-batch choice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from betakd.align import AlignedPositions
from betakd.labels import IGNORE_INDEX, supervised
from betakd.models import FamilyAdapter, forward_inputs
from betakd.teachers.protocol import TeacherTargets

MODES = ("off_policy", "on_policy", "mixed")


@dataclass(frozen=True)
class GenerationSettings:
    """How the student samples its answers (temperature 0: greedy)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class PolicyMix:
    """Which rows of an optimizer step are answered by the student (on-policy).

    ``mode``: ``off_policy`` (none), ``on_policy`` (all) or ``mixed``: each batch (``per
    = "batch"``, as GKD) or each sample (``per = "sample"``) with probability
    ``student_fraction``; from optimizer step ``start_step`` on (before it, none: a
    warm start on the data's answers, as GKD starts from a fine-tuned student).
    """

    mode: str = "off_policy"
    student_fraction: float = 0.5
    per: str = "batch"
    seed: int = 0
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.per not in ("batch", "sample"):
            raise ValueError(f"per must be 'batch' or 'sample', got {self.per!r}")
        if not 0 <= self.student_fraction <= 1:
            raise ValueError(f"student_fraction must be in [0, 1], got {self.student_fraction}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")

    @property
    def fraction(self) -> float:
        """The probability that a batch (or sample) is answered by the student."""
        return {"off_policy": 0.0, "on_policy": 1.0}.get(self.mode, self.student_fraction)

    def chosen(self, step: int, sample_index: Tensor) -> Tensor:
        """``[B]`` bool: the rows the student answers at optimizer step ``step``."""
        rows = sample_index.shape[0]
        if step < self.start_step:
            return torch.zeros(rows, dtype=torch.bool)
        if self.fraction in (0.0, 1.0):
            return torch.full((rows,), self.fraction == 1.0)
        if self.per == "batch":
            return torch.full((rows,), _uniform(self.seed, step) < self.fraction)
        draws = [_uniform(self.seed, step, int(i)) for i in sample_index.tolist()]
        return torch.tensor(draws) < self.fraction

    def generation_seed(self, step: int, sample_index: Tensor) -> int:
        """The sampling seed of the rows ``sample_index`` at ``step``."""
        entropy = [self.seed, step, *(int(i) for i in sample_index.tolist())]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _uniform(*entropy: int) -> float:
    return float(np.random.default_rng(np.random.SeedSequence(list(entropy))).random())


def prompt_tokens(batch: dict) -> list[Tensor]:
    """Each row's prompt: its real tokens (either padding side) before its first
    supervised label."""
    result = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row][real], batch["labels"][row][real]
        answer = supervised(labels)
        if not bool(answer.any()):
            raise ValueError(f"row {row} has no answer token to replace")
        result.append(ids[: int(answer.int().argmax())].cpu())
    return result


def prompts(batch: dict, adapter: FamilyAdapter, pad_token_id: int) -> dict:
    """The rows' prompts, left padded, with the batch's image inputs: generate's inputs."""
    rows = prompt_tokens(batch)
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, tokens in enumerate(rows):
        input_ids[row, width - tokens.numel() :] = tokens
        attention[row, width - tokens.numel() :] = 1
    device = batch["input_ids"].device
    inputs = forward_inputs(batch, adapter)
    inputs.update(input_ids=input_ids.to(device), attention_mask=attention.to(device))
    inputs.update(adapter.extra_inputs(inputs["input_ids"]))
    return inputs


@torch.no_grad()
def sample_answers(
    model,
    adapter: FamilyAdapter,
    batch: dict,
    settings: GenerationSettings,
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int],
    seed: int,
    suppress_tokens: Collection[int] = (),
) -> list[Tensor]:
    """Each row's answer as the student generates it: token ids ``[n_i]``, the end of
    sequence included when it was reached, padding excluded. The model's train/eval
    mode is restored afterwards; the global RNG is left as it was.

    ``suppress_tokens`` are never generated: image placeholders and markers, which in an
    answer would ask the model for images that are not there."""
    inputs = prompts(batch, adapter, pad_token_id)
    sampling = settings.temperature > 0
    options = {"do_sample": sampling, "num_beams": 1}
    if suppress_tokens:
        options["suppress_tokens"] = sorted(suppress_tokens)
    if sampling:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                **options,
            )
    finally:
        model.train(was_training)
    new = output[:, inputs["input_ids"].shape[1] :].cpu()
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    return [_until_stop(row, stops) for row in new]


def _until_stop(tokens: Tensor, stops: set[int]) -> Tensor:
    for i, token in enumerate(tokens.tolist()):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def with_answers(
    batch: dict,
    answers: Sequence[Tensor],
    adapter: FamilyAdapter,
    pad_token_id: int,
    translate: Callable[[Tensor], Tensor] | None = None,
) -> dict:
    """``batch`` with each row's answer replaced: its prompt, then ``answers[row]``
    supervised, right padded; later turns are dropped. Image inputs are kept.
    ``translate``: the answers' tokens for a model of another tokenizer (by text)."""
    if translate is not None:
        answers = [translate(answer.cpu()) for answer in answers]
    prompt_rows = prompt_tokens(batch)
    if len(answers) != len(prompt_rows):
        raise ValueError(f"{len(answers)} answers for {len(prompt_rows)} rows")
    rows = [torch.cat([p, a.cpu().long()]) for p, a in zip(prompt_rows, answers, strict=True)]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention = torch.zeros_like(input_ids)
    for row, (tokens, prompt) in enumerate(zip(rows, prompt_rows, strict=True)):
        input_ids[row, : tokens.numel()] = tokens
        labels[row, prompt.numel() : tokens.numel()] = tokens[prompt.numel() :]
        attention[row, : tokens.numel()] = 1
    device = batch["input_ids"].device
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    out.update(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        labels=labels.to(device),
    )
    out.update(adapter.extra_inputs(out["input_ids"]))
    return out


def answered_batch(
    batch: dict,
    answers: Sequence[Tensor],
    student: tuple[FamilyAdapter, int],
    teachers: tuple | Mapping[str, tuple] | None,
) -> dict:
    """A collated KD batch (student rows, the teacher's batch or batches by name, sample
    metadata) with every row's answer replaced by ``answers``, each side with its own
    image tokens, marked as the student's answers (``student_answers``). ``student`` and
    each teacher: (adapter, pad token id), and for a teacher of another tokenizer its
    answer translation (:func:`with_answers`)."""
    out = with_answers(batch, answers, *student)
    if isinstance(teachers, Mapping):
        out["teacher"] = {
            name: with_answers(batch["teacher"][name], answers, *side)
            for name, side in teachers.items()
        }
    elif teachers is not None:
        out["teacher"] = with_answers(batch["teacher"], answers, *teachers)
    out["student_answers"] = True
    return out


@dataclass
class GeneratedRows:
    """The rows of a micro-batch answered by the student (on-policy), as the channels
    need them: the student batch of those rows with the student's answers, aligned
    with the teacher's targets for the same answers."""

    rows: Tensor  # [P] rows of the data batch
    batch: dict
    aligned: AlignedPositions
    teacher: TeacherTargets
    image_counts: Sequence[int]
