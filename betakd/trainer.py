"""BetaKDTrainer: ``transformers.Trainer`` with a frozen teacher and a Beta-KD objective.

Everything around the loss comes from the ecosystem (accelerate, DeepSpeed, FSDP,
checkpointing, ``report_to``, progress bars). What this subclass adds:

* the loss: the teacher source (the only thing asked about the teacher: aligned
  positions and teacher targets, no grad) -> channels -> weighting;
* batch normalisation by the sample (or token) count of the whole accumulated batch
  across processes, so accumulation and DDP equal one large batch;
* the weighting and feature adapters in their own optimizer group and learning rate;
* the weighting's metrics (energies, betas, bounds) averaged into every log line, and,
  given ``sample_groups``, the same per group of samples (e.g. data sources or slices);
* the channels' energy scales, when the weighting uses them: measured on the first
  training samples before training, and folded into a running mean after every
  optimizer step from the whole accumulated batch of every process;
* the teacher reliability, when the weighting has one: fitted on the first training
  samples' teacher NLLs and h(x) before training (``fit_reliability``);
* checkpoints that hold a standard student (``save_pretrained``) plus
  ``betakd_head.safetensors``; resuming restores both;
* a policy for non-finite losses: stop with the step and sample ids, or skip the step;
* on-policy and mixed distillation (``policy``): the rows a :class:`PolicyMix` chooses
  are answered by the student (sampled without gradients, seeded per step and rows),
  and the teacher scores those answers; logs carry the share of student-answered
  samples, their mean length and every channel's metrics split on/off policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from betakd import calibration
from betakd.data import KDCollator
from betakd.distill import HEAD_FILE, DistillationHead, DistillationModule
from betakd.files import write_json_atomic
from betakd.labels import supervised
from betakd.objective import token_counts
from betakd.onpolicy import GeneratedRows, GenerationSettings, PolicyMix, StudentAnswers
from betakd.schedule import apply_current_lr, restarted_scheduler
from betakd.step_metrics import StepMetrics
from betakd.teachers.protocol import BatchMeta, TeacherSource
from betakd.teachers.vllm_client import ServedTeacherError

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN or infinite loss and the policy is to stop."""


class EngineError(RuntimeError):
    """The run asks for an engine that accelerate does not run it with."""


class BetaKDTrainer(Trainer):
    def __init__(
        self,
        *args,
        teacher: TeacherSource,
        head_learning_rate: float,
        head_weight_decay: float = 0.0,
        adapter_weight_decay: float = 0.0,
        non_finite: str = "stop",
        sample_groups: Mapping[str, str] | None = None,
        calibration_samples: int = 256,
        reliability_samples: int = 8192,
        policy: PolicyMix | None = None,
        generation: GenerationSettings | None = None,
        schedule_restart_at: int | None = None,
        **kwargs,
    ) -> None:
        """``policy``: which rows the student answers itself (default: none, off-policy);
        ``generation``: how it samples them; ``schedule_restart_at``: the step after which
        the learning-rate schedule starts afresh (:mod:`betakd.schedule`)."""
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, DistillationModule):
            raise TypeError("BetaKDTrainer trains a betakd.distill.DistillationModule")
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate enables FSDP on GPUs and other accelerators only; elsewhere it would
            # quietly run data parallel instead.
            raise EngineError(
                "training.fsdp is set, but accelerate runs this job as "
                f"{self.accelerator.distributed_type.value} (it enables FSDP on GPUs and "
                "other accelerators, not on CPUs): remove training.fsdp to train data "
                "parallel, or run on GPUs"
            )
        self.policy = policy if policy is not None and policy.fraction > 0 else None
        self.student_answers = None
        if self.policy is not None:
            self._check_can_generate()
            self.student_answers = StudentAnswers(
                self.policy,
                generation or GenerationSettings(),
                self.data_collator,
                self.train_dataset,
                self.distillation_module.student,
            )
        self.teacher = teacher.prepare(self.accelerator)
        self.head_learning_rate = head_learning_rate
        self.head_weight_decay = head_weight_decay
        self.adapter_weight_decay = adapter_weight_decay
        self.non_finite = non_finite
        self.sample_groups = dict(sample_groups or {})
        self.calibration_samples = calibration_samples
        self.reliability_samples = reliability_samples
        self.schedule_restart_at = schedule_restart_at
        self.skipped_steps = 0
        self.metrics = StepMetrics(self.head.objective.channels)
        self._step_energy: list[torch.Tensor] | None = None
        # First of all callbacks: others (diagnostics, user callbacks) may run the loss in
        # on_train_begin, which needs the fitted reliability and the energy scales.
        self.callback_handler.callbacks.insert(0, _HeadCallback(self))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TrainerAwareCallback):
                callback.trainer = self
        # compute_loss divides by the item count of the whole accumulated batch itself.
        self.loss_is_scaled_for_ga = True

    # ----------------------------------------------------------------- loss

    def _get_num_items_in_batch(self, batch_samples, device):
        # transformers' hook for the item count of an accumulated batch (private, no
        # public one; tested with transformers 5.x): betakd's count replaces its own.
        return self.num_items(batch_samples, device)

    def num_items(self, batch_samples, device) -> torch.Tensor:
        """Samples (or answer tokens) in the accumulated batch, summed over processes."""
        token_reduction = self.head.objective.reduction == "token"
        total = torch.zeros((), dtype=torch.long)
        for batch in batch_samples:
            per_row = supervised(batch["labels"][..., 1:]).sum(dim=-1)
            total += per_row.sum() if token_reduction else (per_row > 0).sum()
        total = total.to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs["sample_ids"]
        generated = self.generated_rows(inputs) if model.training else None
        rows = inputs["input_ids"].shape[0]
        data = self.loss_inputs(inputs) if self.needs_data(generated, rows) else (None,) * 4
        out = model(*data, num_items_in_batch, generated=generated)
        loss = out.loss
        if self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is normalised by the global
            # item count, so undo the average.
            loss = loss * self.args.world_size
        if not torch.isfinite(loss):
            loss = self._handle_non_finite(loss, sample_ids)
        elif model.training:
            self.metrics.add(out.metrics)
            groups = [self.sample_groups.get(str(i)) for i in sample_ids]
            self.metrics.add_groups(out.energies, out.betas, out.valid, groups)
            if self.policy is not None:
                self._add_policy_metrics(out, generated)
            self._accumulate_step_energy(out)
        return (loss, out) if return_outputs else loss

    def loss_inputs(self, inputs: dict) -> tuple:
        """The model's inputs (student batch, aligned positions, teacher targets, image
        counts) for a collated batch: the teacher source runs (or reads its cache) here."""
        inputs = dict(self._prepare_inputs(inputs))
        meta = BatchMeta.pop_from(inputs)
        try:
            aligned, targets = self.teacher(inputs, meta)
        except ServedTeacherError as err:
            raise ServedTeacherError(
                f"step {self.state.global_step + 1}: {err}. The run stopped there: its last "
                f"checkpoint in {self.args.output_dir} (if any) continues with --resume once "
                "the server is back"
            ) from err
        return inputs, aligned, targets, meta.image_counts

    # ----------------------------------------------------------------- on-policy

    def generated_rows(self, inputs: dict) -> GeneratedRows | None:
        """The rows of this micro-batch the policy gives to the student at this step,
        answered by it and scored by the teacher; None when there are none."""
        if self.student_answers is None:
            return None
        module = self.distillation_module
        answered = self.student_answers.answer(
            inputs, self.state.global_step, module.student, module.adapter, self._prepare_inputs
        )
        if answered is None:
            return None
        rows, batch = answered
        return GeneratedRows(rows.to(inputs["input_ids"].device), *self.loss_inputs(batch))

    def needs_data(self, generated: GeneratedRows | None, rows: int) -> bool:
        """Whether the step reads anything of the data's answers: not when the student
        answered every row, their CE is dropped, no trust reads the teacher's likelihood
        of the data's answers and every sample weighs the same (GKD's setting: one
        student pass and one teacher pass instead of two)."""
        if generated is None:
            return True
        objective = self.head.objective
        every_row = generated.rows.numel() == rows
        return not (
            every_row
            and self.distillation_module.generated_ce == "none"
            and not objective.weighting.needs_teacher_nll
            and objective.reduction == "sample"
        )

    def _check_can_generate(self) -> None:
        if not isinstance(self.data_collator, KDCollator):
            raise TypeError("on-policy training needs betakd's KDCollator (it re-encodes answers)")
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded:
            raise EngineError(
                "policy.mode: the student generates its answers with its full parameters, "
                "which FSDP and DeepSpeed ZeRO-3 shard; betakd does not gather them for "
                "generation yet: use DDP or ZeRO-1/2, or policy.mode: off_policy"
            )

    def _add_policy_metrics(self, out, generated: GeneratedRows | None) -> None:
        """Share of student-answered samples, their answers' length and whether they
        ended, and every channel's metrics on and off policy."""
        on = torch.zeros(out.valid.shape[0], dtype=torch.bool)
        lengths = ended = torch.zeros(0)
        if generated is not None:
            on[generated.rows.cpu()] = True
            labels = supervised(generated.batch["labels"])
            lengths = labels.sum(dim=1)
            last = generated.batch["input_ids"].gather(1, (labels.cumsum(1).argmax(1))[:, None])
            stops = self.student_answers.stop_ids
            ended = torch.tensor([int(t) in stops for t in last.squeeze(1).tolist()])
        self.metrics.add_policy(on, lengths, ended)
        groups = ["on_policy" if flag else "off_policy" for flag in on.tolist()]
        self.metrics.add_groups(out.energies, out.betas, out.valid, groups, prefix="policy")

    # ----------------------------------------------------------------- energy scales

    @property
    def head(self) -> DistillationHead:
        """The trained head (weighting and feature adapters), unwrapped from any engine."""
        return self.distillation_module.head

    @property
    def _weighting(self):
        return self.head.objective.weighting

    def calibrate_energy_scale(self) -> torch.Tensor:
        """Set (and return) each weighted channel's energy scale: its mean energy over the
        first ``calibration_samples`` training samples, with the initial models."""
        weighting = self._weighting
        # The energies are read before weighting; a placeholder scale lets the forward run.
        weighting.set_energy_scale(torch.ones(len(weighting.weighted_channels)))
        batches = self._first_batches(self.calibration_samples, "measuring energy scales")
        run = lambda batch: self.model(*self.loss_inputs(batch))  # noqa: E731
        scale = calibration.mean_energies(run, self.head.objective, batches)
        weighting.set_energy_scale(scale)
        return scale

    def fit_reliability(self, measured: tuple | None = None) -> dict[str, float]:
        """Fit the weighting's teacher reliability on the first ``reliability_samples``
        training samples with an answer (``measured``: their :meth:`measure_teacher`, when
        the caller has it)."""
        if measured is None:
            measured = self.measure_teacher(self.reliability_samples, "fitting the reliability")
        nll, representation = measured
        weighting = self._weighting
        return calibration.fit_reliability(
            weighting.reliability, weighting.reliability_nll(nll), representation
        )

    def report_teacher_weights(self, measured: tuple | None = None) -> dict[str, dict[str, float]]:
        """What the data trust or the reliability does to the teacher channels on the
        first ``calibration_samples`` samples (:func:`betakd.calibration.teacher_weight_report`).
        ``measured``: a :meth:`measure_teacher` of at least as many first samples, with the
        same models (the reliability's fit), read instead of another pass."""
        if measured is None:
            measured = self.measure_teacher(
                self.calibration_samples, "teacher weights at the start"
            )
        nll, representation = (
            None if v is None else v[: self.calibration_samples] for v in measured
        )
        return calibration.teacher_weight_report(self._weighting, nll, representation)

    def measure_teacher(self, samples: int, desc: str) -> tuple:
        """The teacher NLLs of the answers and h(x) of the first ``samples`` training
        samples that have an answer token, as the weighting receives them."""
        batches = self._first_batches(samples, desc)
        per_batch = lambda batch: self.score_batch(batch)[:3]  # noqa: E731
        return calibration.teacher_nll_and_representation(per_batch, batches)

    def score_batch(self, batch: dict) -> tuple:
        """One collated batch as the data trust and the reliability read it: ``(nll, h(x),
        has_answer, aligned, targets)``, the teacher NLLs of the answers ``[B]`` (or per
        weighted channel ``[B, K]``), h(x) ``[B, D]`` or None, which rows have an answer
        token, and the aligned positions and teacher targets behind them."""
        inputs, aligned, targets, image_counts = self.loss_inputs(batch)
        module = self.distillation_module
        nll, representation = module.reliability_inputs(inputs, aligned, targets, image_counts)
        has_answer = token_counts(aligned.batch_index[aligned.is_answer], aligned.batch_size) > 0
        return nll, representation, has_answer, aligned, targets

    def _first_batches(self, samples: int, desc: str):
        """The first ``samples`` training samples in data-file order, collated, with the
        model in evaluation mode and without gradients; a progress bar on the local main
        process."""
        size = self.args.per_device_train_batch_size
        batches = calibration.in_data_order(self.train_dataset, self.data_collator, samples, size)
        total = -(-min(samples, len(self.train_dataset)) // size)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield from tqdm(
                    batches, total=total, desc=desc, disable=not self.is_local_process_zero()
                )
        finally:
            self.model.train(was_training)

    def _accumulate_step_energy(self, out) -> None:
        if self._weighting.scale_momentum is None:
            return
        sums, count = self.head.objective.weighted_energy_sums(out.energies, out.valid)
        if self._step_energy is None:
            self._step_energy = [sums.detach(), count.detach().to(sums.dtype)]
        else:
            self._step_energy[0] += sums.detach()
            self._step_energy[1] += count.to(sums.dtype)

    def _commit_step_energy(self) -> None:
        """After an optimizer step: the step's mean energies, over every micro-batch and
        process, go into the running energy scale."""
        if self._step_energy is None:
            return
        sums, count = self._step_energy
        self._step_energy = None
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
            count = self.accelerator.reduce(count, reduction="sum")
        if float(count) > 0:
            self._weighting.observe_energy(sums / count)

    def _handle_non_finite(self, loss: torch.Tensor, sample_ids) -> torch.Tensor:
        where = f"step {self.state.global_step}, samples {list(sample_ids)}"
        if self.non_finite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss)}) at {where}; set non_finite.action: skip "
                "to skip such steps instead"
            )
        self.skipped_steps += 1
        logger.warning("skipping non-finite loss at %s (%d skipped)", where, self.skipped_steps)
        # A zero that still reaches every trainable parameter, so optimizers and DDP see
        # a complete (all-zero) gradient.
        params = [p for p in self.model.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    @property
    def distillation_module(self) -> DistillationModule:
        """The trained module (student + head), unwrapped from any engine wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------- metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.metrics and "loss" in logs:
            logs.update(self.metrics.drain())
        if self.skipped_steps:
            logs["skipped_non_finite_steps"] = self.skipped_steps
        super().log(logs, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.schedule_restart_at is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = restarted_scheduler(
            self.args.lr_scheduler_type,
            optimizer or self.optimizer,
            restart_at=self.schedule_restart_at,
            total_steps=num_training_steps,
            warmup_steps=self.args.get_warmup_steps,
            kwargs=self.args.lr_scheduler_kwargs,
        )
        return self.lr_scheduler

    def create_optimizer(self, model=None):
        """The student's groups as Trainer builds them, then the weighting's parameters
        (betas or the instance network, with ``head_weight_decay``) and the feature
        adapters (``adapter_weight_decay``) at the head learning rate."""
        if self.optimizer is None:
            super().create_optimizer(model=self.distillation_module.student)
            head = self.head
            for params, decay in (
                (head.objective.parameters(), self.head_weight_decay),
                (head.features.parameters(), self.adapter_weight_decay),
            ):
                params = [p for p in params if p.requires_grad]
                if params:
                    self.optimizer.add_param_group(
                        {"params": params, "lr": self.head_learning_rate, "weight_decay": decay}
                    )
        return self.optimizer

    # ----------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        module = self.distillation_module
        student_state = None
        if state_dict is not None:
            prefix = "student."
            student_state = {
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
        module.student.save_pretrained(output_dir, state_dict=student_state)
        module.head.save(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # Training arguments as JSON, not the pickle Trainer writes by default.
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.distillation_module
        student = module.student
        if hasattr(student, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model=student)
        else:
            # save_pretrained may write another key layout than the module's state_dict
            # (transformers 5 converts some families back to their hub layout), so read the
            # checkpoint through from_pretrained, which knows the conversion.
            saved = type(student).from_pretrained(resume_from_checkpoint, dtype=student.dtype)
            student.load_state_dict(saved.state_dict(), strict=True)
        module.head.load(Path(resume_from_checkpoint) / HEAD_FILE)
        logger.info("resumed student and head from %s", resume_from_checkpoint)


class TrainerAwareCallback(TrainerCallback):
    """A callback that needs the trainer itself (set when the trainer is built), e.g.
    to run extra diagnostic forward passes through :meth:`BetaKDTrainer.loss_inputs`."""

    trainer: BetaKDTrainer | None = None


class _HeadCallback(TrainerCallback):
    """Before the first step: fits the teacher reliability and measures the energy scales
    (unless a resumed or ``init_from`` head brought them). Before every optimizer step:
    the scheduled channel gains; after it: the running energy scales."""

    def __init__(self, trainer: BetaKDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        weighting = trainer._weighting
        measured = None
        # First: the calibration's forward passes go through the weighting, which needs it.
        if weighting.reliability is not None and not weighting.reliability.fitted:
            measured = trainer.measure_teacher(trainer.reliability_samples, "fitting the reliability")  # fmt: skip
            trainer.fit_reliability(measured)
        if weighting.needs_energy_scale and not weighting.has_energy_scale:
            trainer.calibrate_energy_scale()
        if weighting.needs_teacher_nll and state.global_step == 0:
            # The models have not changed since the fit: its measurements serve the report.
            trainer.report_teacher_weights(measured)
        # After a checkpoint's optimizer state (and its learning rate) loaded: a run
        # resumed with another length or a restarted schedule takes the new schedule's
        # rate from its first step on (unchanged when the schedule is the same).
        apply_current_lr(self.trainer.lr_scheduler)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.head.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._commit_step_energy()


COMPLETE_MARKER = "betakd_complete.json"


def mark_complete(checkpoint: Path) -> None:
    """Written last and atomically: a checkpoint without it was interrupted while saving."""
    write_json_atomic(checkpoint / COMPLETE_MARKER, {"complete": True}, indent=None)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()
