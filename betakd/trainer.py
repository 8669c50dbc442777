"""BetaKDTrainer: ``transformers.Trainer`` with a frozen teacher and a Beta-KD objective.

Everything around the loss comes from the ecosystem (accelerate, DeepSpeed, FSDP,
checkpointing, ``report_to``, progress bars). What this subclass adds:

* the loss: teacher targets (no grad) -> aligned positions -> channels -> weighting;
* batch normalisation by the sample (or token) count of the whole accumulated batch
  across processes, so accumulation and DDP equal one large batch;
* the weighting and feature adapters in their own optimizer group and learning rate;
* the weighting's metrics (energies, betas, bounds) averaged into every log line;
* checkpoints that hold a standard student (``save_pretrained``) plus
  ``betakd_head.safetensors``; resuming restores both;
* a policy for non-finite losses: stop with the step and sample ids, or skip the step.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from betakd.align import align_positions
from betakd.distill import HEAD_FILE, DistillationModule
from betakd.teachers import OnlineTeacher

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN or infinite loss and the policy is to stop."""


class BetaKDTrainer(Trainer):
    def __init__(
        self,
        *args,
        teacher: OnlineTeacher,
        head_learning_rate: float,
        head_weight_decay: float = 0.0,
        include_prompt: bool = False,
        non_finite: str = "stop",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, DistillationModule):
            raise TypeError("BetaKDTrainer trains a betakd.distill.DistillationModule")
        self.teacher = teacher.prepare(self.accelerator)
        self.head_learning_rate = head_learning_rate
        self.head_weight_decay = head_weight_decay
        self.include_prompt = include_prompt
        self.non_finite = non_finite
        self.skipped_steps = 0
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_count = 0
        # compute_loss divides by the item count of the whole accumulated batch itself.
        self.loss_is_scaled_for_ga = True

    # ----------------------------------------------------------------- loss

    def _get_num_items_in_batch(self, batch_samples, device):
        """Samples (or answer tokens) in the accumulated batch, summed over processes."""
        token_reduction = self._module.head.objective.reduction == "token"
        total = torch.zeros((), dtype=torch.long)
        for batch in batch_samples:
            per_row = (batch["labels"][..., 1:] != IGNORE_INDEX).sum(dim=-1)
            total += per_row.sum() if token_reduction else (per_row > 0).sum()
        total = total.to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_batch = inputs.pop("teacher", None)
        sample_ids = inputs.pop("sample_ids")
        sample_index = inputs.pop("sample_index", None)
        image_counts = inputs.pop("image_counts").tolist()
        if teacher_batch is None:
            # Offline cache (betakd.cache.CachedTeacher): positions from the student batch.
            aligned = self.teacher.align(inputs, sample_index, sample_ids)
            targets = self.teacher(None, aligned, image_counts, sample_index)
        else:
            aligned = align_positions(
                inputs,
                teacher_batch,
                student_adapter=self._module.adapter,
                teacher_adapter=self.teacher.adapter,
                include_prompt=self.include_prompt,
                sample_ids=sample_ids,
            )
            targets = self.teacher(teacher_batch, aligned, image_counts)
        out = model(inputs, aligned, targets, image_counts, num_items_in_batch)
        loss = out.loss
        if self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is normalised by the global
            # item count, so undo the average.
            loss = loss * self.args.world_size
        if not torch.isfinite(loss):
            loss = self._handle_non_finite(loss, sample_ids)
        elif model.training:
            self._accumulate_metrics(out.metrics)
        return (loss, out) if return_outputs else loss

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
    def _module(self) -> DistillationModule:
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------- metrics

    def _accumulate_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key != "loss":
                self._metric_sums[key] += value
        self._metric_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._metric_count and "loss" in logs:
            for key, value in self._metric_sums.items():
                logs[key] = value / self._metric_count
            self._metric_sums.clear()
            self._metric_count = 0
        if self.skipped_steps:
            logs["skipped_non_finite_steps"] = self.skipped_steps
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model=self._module.student)
            head_params = [p for p in self._module.head.parameters() if p.requires_grad]
            if head_params:
                self.optimizer.add_param_group(
                    {
                        "params": head_params,
                        "lr": self.head_learning_rate,
                        "weight_decay": self.head_weight_decay,
                    }
                )
        return self.optimizer

    # ----------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        module = self._module
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
        module = self._module
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


COMPLETE_MARKER = "betakd_complete.json"


def mark_complete(checkpoint: Path) -> None:
    """Written last and atomically: a checkpoint without it was interrupted while saving."""
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"complete": True}))
    os.replace(tmp, checkpoint / COMPLETE_MARKER)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()
