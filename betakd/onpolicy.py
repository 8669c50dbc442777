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
from betakd.cross_tokenizer.groups import AnswerTranslator
from betakd.data import KDCollator
from betakd.labels import IGNORE_INDEX, supervised
from betakd.models import FamilyAdapter, forward_inputs, stop_token_ids, tokenizer_of
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
    teachers: Mapping[str | None, tuple],
) -> dict:
    """A collated KD batch (student rows, each teacher's batch by name, sample
    metadata) with every row's answer replaced by ``answers``, each side with its own
    image tokens, marked as the student's answers (``student_answers``). ``student`` and
    each teacher (by name, None: the single one): (adapter, pad token id), and for a
    teacher of another tokenizer its answer translation (:func:`with_answers`)."""
    out = with_answers(batch, answers, *student)
    if teachers:
        out["teacher"] = {
            name: with_answers(batch["teacher"][name], answers, *side)
            for name, side in teachers.items()
        }
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


class StudentAnswers:
    """The on-policy step before the loss: which rows of a micro-batch the student
    answers at a step (``policy``), and those rows as a collated batch with the
    student's own answers written into the student's and every teacher's encoding.

    ``collator`` re-collates a subset of rows (a KD collator: it encodes every side)
    from ``dataset`` (its ``by_index``); the student samples with ``generation`` and
    stops at the student's end-of-sequence or pad tokens; image tokens of any model are
    never sampled (in an answer they would ask for images that are not there); a
    teacher of another vocabulary gets the answer's text in its own tokens.
    """

    def __init__(
        self,
        policy: PolicyMix,
        generation: GenerationSettings,
        collator,
        dataset,
        student,
        data_optional: bool = False,
    ) -> None:
        """``data_optional``: the loss reads nothing of the data's answers in rows the
        student answered (:attr:`betakd.distill.DistillationModule.student_rows_need_data`)."""
        if not isinstance(collator, KDCollator):
            raise TypeError("on-policy training needs betakd's KDCollator (it re-encodes answers)")
        self.policy = policy
        self.data_optional = data_optional
        self.generation = generation
        self.collator = collator
        self.dataset = dataset
        self.stop_ids = stop_token_ids(student, tokenizer_of(collator.student.processor))
        if not self.stop_ids:
            raise ValueError("the student has no end-of-sequence or pad token to stop answers at")
        teachers = collator.teachers
        encoders = [collator.student, *teachers.values()]
        self.image_token_ids = set().union(*(e.adapter.image_token_ids for e in encoders))
        translators = _answer_translators(collator.student, teachers, self.stop_ids)
        self.teacher_sides = {name: _side(e, translators.get(name)) for name, e in teachers.items()}

    def answer(self, inputs: dict, step: int, student, adapter, prepare) -> tuple | None:
        """``(rows, batch)``: the rows of ``inputs`` the policy gives the student at
        ``step`` and those rows answered by ``student`` (its family ``adapter``);
        ``prepare`` puts a re-collated batch on the device. None when no row is chosen."""
        chosen = self.policy.chosen(step, inputs["sample_index"].cpu())
        if not bool(chosen.any()):
            return None
        rows = chosen.nonzero().squeeze(1)
        batch = inputs
        if not bool(chosen.all()):
            index = inputs["sample_index"][rows].tolist()
            # Not announced: no teacher scores these rows' data answers.
            batch = prepare(self.collator.collate(self.dataset.by_index(index), announce=False))
        answers = sample_answers(
            student,
            adapter,
            batch,
            self.generation,
            pad_token_id=self.collator.student.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
            seed=self.policy.generation_seed(step, batch["sample_index"].cpu()),
            suppress_tokens=self.image_token_ids,
        )
        student_side = _side(self.collator.student)
        answered = answered_batch(batch, answers, student_side, self.teacher_sides)
        return rows, answered

    def needs_data(self, generated: GeneratedRows | None, rows: int) -> bool:
        """Whether a step with ``rows`` rows, ``generated`` of them answered by the
        student, reads the data's answers: not when the student answered every row and
        the data is optional (GKD's setting: one student pass and one teacher pass
        instead of two)."""
        if generated is None:
            return True
        return not (self.data_optional and generated.rows.numel() == rows)


def _side(encoder, translate=None) -> tuple:
    """(adapter, pad token id, answer translation or None): what re-encoding an answer
    needs of one model."""
    return encoder.adapter, encoder.pad_token_id, translate


def _answer_translators(student, teachers: Mapping, stops) -> dict:
    """An :class:`~betakd.cross_tokenizer.groups.AnswerTranslator` per teacher whose
    vocabulary is not the student's (by name; None: the single teacher)."""
    mine = tokenizer_of(student.processor)
    vocabulary = mine.get_vocab()
    out = {}
    for name, encoder in teachers.items():
        theirs = tokenizer_of(encoder.processor)
        if theirs.get_vocab() != vocabulary:
            out[name] = AnswerTranslator(mine, theirs, stops)
    return out
