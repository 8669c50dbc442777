"""BetaKDTrainer: ``transformers.Trainer`` with a frozen teacher and a Beta-KD objective.

Everything around the loss comes from the ecosystem (accelerate, DeepSpeed, FSDP,
checkpointing, ``report_to``, progress bars). This subclass keeps the loss (teacher
source -> channels -> weighting, normalised by the items of the whole accumulated batch
across processes, so accumulation and DDP equal one batch), the head's optimizer groups
and the wiring of its units: :class:`~betakd.calibration.HeadCalibration` and
``RunningEnergyScale``, :class:`~betakd.step_metrics.StepMetrics`,
:class:`~betakd.onpolicy.StudentAnswers`, :mod:`betakd.checkpoints` and
:mod:`betakd.non_finite`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer

from betakd.calibration import HeadCalibration, RunningEnergyScale
from betakd.callbacks import HeadCallback, TrainerAwareCallback
from betakd.checkpoints import load_student_and_head, mark_complete, save_student_and_head
from betakd.distill import DistillationHead, DistillationModule
from betakd.engines import check_engine
from betakd.non_finite import NonFiniteLosses
from betakd.objective import items_in_batch
from betakd.onpolicy import GeneratedRows, GenerationSettings, PolicyMix, StudentAnswers
from betakd.schedule import restarted_scheduler
from betakd.step_metrics import StepMetrics
from betakd.teachers.protocol import BatchMeta, TeacherSource
from betakd.teachers.vllm_client import ServedTeacherError

logger = logging.getLogger(__name__)


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
        on_policy = policy is not None and policy.fraction > 0
        check_engine(self, on_policy)
        self.teacher = teacher.prepare(self.accelerator)
        self.student_answers = None
        if on_policy:
            self.student_answers = StudentAnswers(
                policy,
                generation or GenerationSettings(),
                self.data_collator,
                self.train_dataset,
                self.distillation_module.student,
                data_optional=not self.distillation_module.student_rows_need_data,
            )
        self.head_learning_rate = head_learning_rate
        self.head_weight_decay = head_weight_decay
        self.adapter_weight_decay = adapter_weight_decay
        self.non_finite = NonFiniteLosses(non_finite)
        self.sample_groups = dict(sample_groups or {})
        self.schedule_restart_at = schedule_restart_at
        self.metrics = StepMetrics(self.head.objective.channels)
        self.calibration = HeadCalibration(
            model=lambda: self.model,
            module=self.distillation_module,
            loss_inputs=self.loss_inputs,
            dataset=self.train_dataset,
            collate=self.data_collator,
            batch_size=self.args.per_device_train_batch_size,
            calibration_samples=calibration_samples,
            reliability_samples=reliability_samples,
            show_progress=self.is_local_process_zero(),
        )
        self.running_energy_scale = RunningEnergyScale(
            self.head.objective,
            (lambda t: self.accelerator.reduce(t, reduction="sum"))
            if self.args.world_size > 1
            else None,
        )
        # First of all callbacks: others (diagnostics, user callbacks) may run the loss in
        # on_train_begin, which needs the fitted reliability and the energy scales.
        self.callback_handler.callbacks.insert(0, HeadCallback(self))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TrainerAwareCallback):
                callback.trainer = self
        # compute_loss divides by the item count of the whole accumulated batch itself.
        self.loss_is_scaled_for_ga = True

    # ----------------------------------------------------------------- loss

    def _get_num_items_in_batch(self, batch_samples, device):
        # transformers' hook for the item count of an accumulated batch (private, no
        # public one; tested with transformers 5.18-5.24): betakd's count replaces its own.
        return self.num_items(batch_samples, device)

    def num_items(self, batch_samples, device) -> torch.Tensor:
        """Samples (or answer tokens) in the accumulated batch, summed over processes."""
        labels = [batch["labels"] for batch in batch_samples]
        total = items_in_batch(labels, self.head.objective.reduction).to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs["sample_ids"]
        generated = self.generated_rows(inputs) if model.training else None
        rows = inputs["input_ids"].shape[0]
        answers = self.student_answers
        needs_data = answers is None or answers.needs_data(generated, rows)
        data = self.loss_inputs(inputs) if needs_data else (None,) * 4
        out = model(*data, num_items_in_batch, generated=generated)
        loss = out.loss
        if self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is normalised by the global
            # item count, so undo the average.
            loss = loss * self.args.world_size
        finite = bool(torch.isfinite(loss))
        loss = self.non_finite.handle(loss, self.state.global_step, sample_ids, model.parameters())
        if finite and model.training:
            self.metrics.add(out.metrics)
            groups = [self.sample_groups.get(str(i)) for i in sample_ids]
            self.metrics.add_groups(out.energies, out.betas, out.valid, groups)
            if answers is not None:
                self.metrics.add_policy_rows(out, generated, answers.stop_ids)
            self.running_energy_scale.add(out.energies, out.valid)
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

    @property
    def head(self) -> DistillationHead:
        """The trained head (weighting and feature adapters), unwrapped from any engine."""
        return self.distillation_module.head

    @property
    def distillation_module(self) -> DistillationModule:
        """The trained module (student + head), unwrapped from any engine wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------- metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.metrics and "loss" in logs:
            logs.update(self.metrics.drain())
        if self.non_finite.skipped:
            logs["skipped_non_finite_steps"] = self.non_finite.skipped
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
            for group in self.head.param_groups(
                self.head_learning_rate, self.head_weight_decay, self.adapter_weight_decay
            ):
                self.optimizer.add_param_group(group)
        return self.optimizer

    # ----------------------------------------------------------------- saving
    # Trainer has no public hooks for what a checkpoint holds or how one is read back:
    # these three private methods are overridden (tested with transformers 5.18-5.24).

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        module = self.distillation_module
        save_student_and_head(
            module.student,
            module.head,
            Path(output_dir or self.args.output_dir),
            processor=self.processing_class,
            arguments_json=self.args.to_json_string(),
            state_dict=state_dict,
        )

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.distillation_module
        load_adapter = lambda: super(BetaKDTrainer, self)._load_from_checkpoint(  # noqa: E731
            resume_from_checkpoint, model=module.student
        )
        load_student_and_head(module, Path(resume_from_checkpoint), load_adapter)
