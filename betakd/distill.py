"""One distillation step's loss: the student, its channels and the weighting, as one module.

:class:`DistillationModule` holds the student and a :class:`DistillationHead` (the
weighting and the feature adapters). Keeping them in one ``nn.Module`` lets DDP, FSDP
and DeepSpeed synchronise every trainable parameter, betas included; the teacher stays
outside (see ``betakd.teachers``). The student is saved on its own with
``save_pretrained``; the head goes to ``betakd_head.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from betakd import align, chunked, energies, weighting
from betakd.align import AlignedPositions
from betakd.config import TrainConfig
from betakd.features import FeatureChannel
from betakd.models import FamilyAdapter, forward_inputs, slice_vocab
from betakd.objective import DistillationObjective, ObjectiveOutput, per_sample_mean, token_counts
from betakd.teachers import TeacherTargets

HEAD_FILE = "betakd_head.safetensors"


@dataclass
class ChannelValues:
    """One micro-batch's unweighted channels: what the objective weighs."""

    ce: Tensor  # [B]
    energies: dict[str, Tensor]  # teacher channel -> [B]
    representation: Tensor | None  # [B, D] for an instance weighting
    counts: Tensor  # [B] supervised answer tokens per sample
    teacher_nll: Tensor | None = None  # [B] teacher's NLL of the answers, for data trust


@dataclass(frozen=True)
class LogitChannelSpec:
    name: str
    energy: str
    options: dict
    answer_only: bool


class DistillationHead(nn.Module):
    """The trainable parts besides the student: the objective (weighting) and feature adapters."""

    def __init__(
        self,
        objective: DistillationObjective,
        logit_channels: Sequence[LogitChannelSpec],
        feature_channels: dict[str, FeatureChannel],
    ) -> None:
        super().__init__()
        self.objective = objective
        self.logit_channels = list(logit_channels)
        self.energy_fns = {c.name: energies.get(c.energy, **c.options) for c in logit_channels}
        self.features = nn.ModuleDict(feature_channels)

    @classmethod
    def from_config(
        cls, config: TrainConfig, *, teacher_dim: int | None, student_dim: int | None, rep_dim: int
    ) -> DistillationHead:
        channels = config.channels
        specs = [
            LogitChannelSpec(c.channel, c.energy, dict(c.options), c.positions == "answer")
            for c in channels.logits
        ]
        feats = {}
        for f in channels.features:
            if teacher_dim is None or student_dim is None:
                raise ValueError(
                    f"feature channel {f.name!r} needs visual tokens, but a model has none "
                    "(text-only student or teacher)"
                )
            feats[f.name] = FeatureChannel(
                teacher_dim,
                student_dim,
                f.energy,
                adapter=f.adapter,
                normalize=f.normalize,
                rank=f.rank,
            )
        options = dict(config.weighting.options)
        if config.weighting.needs_representation:
            options.setdefault("input_dim", rep_dim)
        built = weighting.build(config.weighting.name, ["ce", *channels.names()], **options)
        objective = DistillationObjective(built, reduction=config.weighting.reduction)
        return cls(objective, specs, feats)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / HEAD_FILE
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"channels": ",".join(self.objective.channels)})
        return path

    def load(self, path: str | Path) -> None:
        """Load a saved head (a file or the folder holding it); channels must match."""
        path = Path(path)
        if path.is_dir():
            path = path / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {HEAD_FILE} at {path}")
        state = load_file(str(path))
        mine = self.state_dict()
        problems = sorted(set(state) ^ set(mine)) + sorted(
            k for k in set(state) & set(mine) if state[k].shape != mine[k].shape
        )
        if problems:
            raise ValueError(
                f"{path} does not fit this run's channels/weighting; differing entries: {problems}"
            )
        self.load_state_dict(state)


class DistillationModule(nn.Module):
    """Student + head; ``forward`` returns the objective's output for one micro-batch."""

    def __init__(
        self,
        student: nn.Module,
        head: DistillationHead,
        adapter: FamilyAdapter,
        vocab_rows: int,
        chunk_size: int | None = None,
        chunk_compile: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.head = head
        self.adapter = adapter
        self.vocab_rows = vocab_rows
        self.chunk_size = chunk_size
        self.chunk_compile = chunk_compile

    def forward(
        self,
        batch: dict,
        aligned: AlignedPositions,
        teacher: TeacherTargets,
        image_counts: Sequence[int],
        num_items: Tensor | int | None = None,
    ) -> ObjectiveOutput:
        values = self.channel_values(batch, aligned, teacher, image_counts)
        return self.head.objective(
            values.ce,
            values.energies,
            values.representation,
            counts=values.counts,
            num_items=num_items,
            teacher_nll=values.teacher_nll,
        )

    def channel_values(
        self,
        batch: dict,
        aligned: AlignedPositions,
        teacher: TeacherTargets,
        image_counts: Sequence[int],
    ) -> ChannelValues:
        """The student's forward pass and every channel's per-sample value, unweighted."""
        if self.chunk_size is not None:
            out = self.student(
                **forward_inputs(batch, self.adapter), output_hidden_states=True, logits_to_keep=1
            )
            ce, channel_energies = self._chunked_channels(out, teacher, aligned)
        else:
            out = self.student(**forward_inputs(batch, self.adapter))
            student_logits = slice_vocab(aligned.student(out.logits), self.vocab_rows)
            answer = aligned.is_answer
            ce_tokens = F.cross_entropy(
                student_logits[answer].float(), aligned.token_ids[answer], reduction="none"
            )
            ce = per_sample_mean(ce_tokens, aligned.batch_index[answer], aligned.batch_size)
            channel_energies = self._logit_energies(student_logits, teacher.logits, aligned)
        if self.head.features:
            channel_energies.update(self._feature_energies(out, teacher, image_counts))
        answer_index = aligned.batch_index[aligned.is_answer]
        return ChannelValues(
            ce,
            channel_energies,
            teacher.representation,
            token_counts(answer_index, aligned.batch_size),
            self._teacher_nll(teacher, aligned)
            if self.head.objective.weighting.needs_teacher_nll
            else None,
        )

    def _teacher_nll(self, teacher: TeacherTargets, aligned: AlignedPositions) -> Tensor:
        """The teacher's mean NLL of each sample's answer tokens ``[B]``."""
        source = teacher.logit_source
        if source is None and teacher.logits is not None:
            source = chunked.DenseTeacher(teacher.logits)
        if source is None:
            raise ValueError("a trust measured against the data needs the teacher's logits")
        nll = chunked.teacher_token_nll(source, aligned.token_ids, self.vocab_rows)
        answer = aligned.is_answer
        return per_sample_mean(nll[answer], aligned.batch_index[answer], aligned.batch_size)

    def _chunked_channels(
        self, out, teacher: TeacherTargets, aligned: AlignedPositions
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CE and logit energies from hidden states, never building [N, V] logits."""
        answer = aligned.is_answer
        if not bool(answer.all()):
            raise ValueError("chunked energies cover answer tokens only")
        source = teacher.logit_source
        if source is None and teacher.logits is not None:
            source = chunked.DenseTeacher(teacher.logits)  # the offline cache
        head = self.student.get_output_embeddings()
        fns = {c.name: self.head.energy_fns[c.name] for c in self.head.logit_channels}
        result = chunked.chunked_channels(
            aligned.student(out.hidden_states[-1]),
            head.weight[: self.vocab_rows],
            source if fns else None,
            energies=fns,
            labels=aligned.token_ids,
            bias=None if head.bias is None else head.bias[: self.vocab_rows],
            chunk_size=self.chunk_size,
            compile=self.chunk_compile,
        )
        return result.per_sample(aligned.batch_index, aligned.batch_size)

    def _logit_energies(
        self, student: Tensor, teacher: Tensor | None, aligned: AlignedPositions
    ) -> dict[str, Tensor]:
        result = {}
        for spec in self.head.logit_channels:
            if teacher is None:
                raise ValueError(f"channel {spec.name!r} needs teacher logits")
            rows = aligned.is_answer if spec.answer_only else slice(None)
            per_token = self.head.energy_fns[spec.name](student[rows], teacher[rows])
            result[spec.name] = per_sample_mean(
                per_token, aligned.batch_index[rows], aligned.batch_size
            )
        return result

    def _feature_energies(
        self, out, teacher: TeacherTargets, image_counts: Sequence[int]
    ) -> dict[str, Tensor]:
        if teacher.visual is None:
            raise ValueError("feature channels need the teacher's visual tokens")
        student_visual = self.adapter.visual_tokens(out, image_counts)
        pooled = align.pool_visual_pair(student_visual, teacher.visual)
        result = {}
        for name, channel in self.head.features.items():
            # Samples without an image have no visual tokens: their feature energy is 0.
            result[name] = channel(pooled.student, pooled.teacher) * pooled.mask
        return result

    # Trainer compatibility: gradient checkpointing and config live on the student.
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.student.gradient_checkpointing_enable(**kwargs)

    @property
    def config(self):
        return self.student.config
