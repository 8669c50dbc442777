"""One distillation step's loss: the student, its channels and the weighting, as one module.

:class:`DistillationModule` holds the student and a :class:`DistillationHead` (the
weighting and the feature adapters). Keeping them in one ``nn.Module`` lets DDP, FSDP
and DeepSpeed synchronise every trainable parameter, betas included; the teacher stays
outside (see ``betakd.teachers``). The student is saved on its own with
``save_pretrained``; the head goes to ``betakd_head.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from betakd import align, chunked, energies, weighting
from betakd.align import AlignedPositions
from betakd.cross_tokenizer import group_loss
from betakd.cross_tokenizer.groups import sum_by_group
from betakd.features import FeatureChannel
from betakd.models import FamilyAdapter, forward_inputs, slice_vocab, with_image_outputs
from betakd.objective import (
    GENERATED_CE,
    ChannelValues,
    DistillationObjective,
    ObjectiveOutput,
    per_sample_mean,
    token_counts,
    with_generated,
)
from betakd.onpolicy import GeneratedRows
from betakd.reliability import TeacherReliability
from betakd.teachers.protocol import TeacherTargets
from betakd.teachers.targets import GroupedTargets

HEAD_FILE = "betakd_head.safetensors"


@dataclass(frozen=True)
class LogitChannelSpec:
    name: str
    energy: str
    options: dict
    answer_only: bool
    teacher: str | None = None  # which teacher it reads (None: the single teacher)


class DistillationHead(nn.Module):
    """The trainable parts besides the student: the objective (weighting) and feature adapters."""

    def __init__(
        self,
        objective: DistillationObjective,
        logit_channels: Sequence[LogitChannelSpec],
        feature_channels: dict[str, FeatureChannel],
        feature_teachers: Mapping[str, str | None] | None = None,
        anneal_steps: Mapping[str, int] | None = None,
    ) -> None:
        """``feature_teachers``: feature channel -> the teacher it reads (default: the
        single teacher for every one). ``anneal_steps``: channel -> the optimizer steps
        over which its weight falls linearly to zero (:meth:`set_step`)."""
        super().__init__()
        self.anneal_steps = dict(anneal_steps or {})
        self.objective = objective
        self.logit_channels = list(logit_channels)
        self.energy_fns = {c.name: energies.get(c.energy, **c.options) for c in logit_channels}
        self.features = nn.ModuleDict(feature_channels)
        feature_teachers = dict(feature_teachers or {})
        self.channel_teachers: dict[str, str | None] = {
            **{c.name: c.teacher for c in self.logit_channels},
            **{name: feature_teachers.get(name) for name in feature_channels},
        }

    def set_step(self, step: int) -> None:
        """Set the scheduled channels' gains for optimizer step ``step`` (from 0)."""
        if self.anneal_steps:
            self.objective.weighting.set_channel_gains(
                {name: max(0.0, 1.0 - step / steps) for name, steps in self.anneal_steps.items()}
            )

    @property
    def teachers(self) -> list[str | None]:
        """The teachers the channels read, each once, in channel order."""
        return list(dict.fromkeys(self.channel_teachers.values()))

    def param_groups(
        self, learning_rate: float, weighting_decay: float, adapter_decay: float
    ) -> list[dict]:
        """Optimizer groups of the trainable head: the weighting's parameters (betas or
        the instance network) and the feature adapters, each with its weight decay."""
        groups = []
        for params, decay in (
            (self.objective.parameters(), weighting_decay),
            (self.features.parameters(), adapter_decay),
        ):
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": learning_rate, "weight_decay": decay})
        return groups

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
            k for k in set(state) & set(mine) if _shape_differs(k, state[k], mine[k])
        )
        if problems:
            raise ValueError(
                f"{path} does not fit this run's channels/weighting; differing entries: {problems}"
            )
        self.load_state_dict(state)


def _shape_differs(key: str, saved: Tensor, mine: Tensor) -> bool:
    """Whether a saved head entry cannot be loaded into this one; the reliability's fit
    set has as many rows as the fit had samples."""
    if key.rsplit(".", 1)[-1] in TeacherReliability.FIT_SET_BUFFERS:
        return saved.shape[1:] != mine.shape[1:]
    return saved.shape != mine.shape


class DistillationModule(nn.Module):
    """Student + head; ``forward`` returns the objective's output for one micro-batch.

    With ``chunk_size``, CE and the logit energies come from the student's final hidden
    states a chunk at a time (:mod:`betakd.chunked`). When the loss's gradient with
    respect to them does not depend on their values (the weighting's betas do not
    depend on the current energies, except through stop-gradients of constants), the
    chunks compute their gradients in the forward pass (single pass); otherwise they
    are recomputed in backward. Which one applies is measured, not declared: see
    :meth:`channel_values`.
    """

    def __init__(
        self,
        student: nn.Module,
        head: DistillationHead,
        adapter: FamilyAdapter,
        vocab_rows: int,
        chunk_size: int | None = None,
        chunk_compile: bool = False,
        student_representation: str | None = None,
        generated_ce: str = "data",
    ) -> None:
        """``student_representation``: a kind of :func:`betakd.align.instance_representation`
        (``teacher_visual`` or ``teacher_answer_hidden``) taken of the student, detached,
        and appended to the teacher's for the weighting; None: the teacher's alone.
        ``generated_ce``: the CE of rows answered by the student (see
        :func:`with_generated`)."""
        super().__init__()
        self.student = student
        self.head = head
        self.adapter = adapter
        self.vocab_rows = vocab_rows
        self.chunk_size = chunk_size
        self.chunk_compile = chunk_compile
        self.student_representation = student_representation
        if generated_ce not in GENERATED_CE:
            raise ValueError(f"generated_ce must be one of {GENERATED_CE}, got {generated_ce!r}")
        self.generated_ce = generated_ce

    def forward(
        self,
        batch: dict | None,
        aligned: AlignedPositions | None,
        teacher: TeacherTargets | None,
        image_counts: Sequence[int] | None,
        num_items: Tensor | int | None = None,
        generated: GeneratedRows | None = None,
    ) -> ObjectiveOutput:
        """The objective on a micro-batch; with ``generated``, its rows ``generated.rows``
        take their energies from the student's own answers (:func:`with_generated`).
        ``batch`` (and the other data arguments) None: every row is the student's and no
        value comes from the data's answers (``generated_ce`` none, no data trust)."""
        if generated is None:
            values = self.channel_values(batch, aligned, teacher, image_counts, num_items=num_items)
        elif batch is None:
            values = self._generated_only(generated, num_items)
        else:
            values = self._values_with_generated(
                batch, aligned, teacher, image_counts, generated, num_items
            )
        return self.loss(values, num_items)

    @property
    def student_rows_need_data(self) -> bool:
        """Whether rows the student answered read the data's answers: their CE, a data
        trust or reliability (the teacher's likelihood of the data's answers), or a
        weight per answer token."""
        objective = self.head.objective
        return (
            self.generated_ce != "none"
            or objective.weighting.needs_teacher_nll
            or objective.reduction != "sample"
        )

    def loss(self, values: ChannelValues, num_items: Tensor | int | None) -> ObjectiveOutput:
        return self.head.objective(
            values.ce,
            values.energies,
            values.representation,
            counts=values.counts,
            num_items=num_items,
            teacher_nll=values.teacher_nll,
        )

    def _generated_only(self, generated: GeneratedRows, num_items) -> ChannelValues:
        """Every row answered by the student, without CE: one student pass."""
        if self.generated_ce != "none":
            raise ValueError("without the data's answers there is no CE: generated_ce must be none")
        rows = generated.batch["input_ids"].shape[0]
        if not torch.equal(generated.rows.cpu(), torch.arange(rows)):
            raise ValueError("without the data's answers every row must be the student's")

        def without_ce(values: ChannelValues) -> ChannelValues:
            return replace(values, ce=torch.zeros_like(values.ce))

        values = self.channel_values(
            generated.batch,
            generated.aligned,
            generated.teacher,
            generated.image_counts,
            num_items=num_items,
            into=without_ce,
        )
        return without_ce(values)

    def _values_with_generated(
        self, batch, aligned, teacher, image_counts, generated: GeneratedRows, num_items
    ) -> ChannelValues:
        """Two student passes: the data's answers (CE, data trust, the other rows), then
        the student's own answers of ``generated.rows`` (their energies). Each pass's
        chunks assume the merged loss (the other pass's values held fixed). When both
        passes hold the very same images (every row the student's), the second reuses the
        first's image encoding."""
        rows, ce = generated.rows, self.generated_ce
        data = self.channel_values(
            batch,
            aligned,
            teacher,
            image_counts,
            num_items=num_items,
            into=lambda d: with_generated(d, d.detached().rows(rows), rows, ce),
        )
        fixed = data.detached()
        same_images = generated.batch.get("pixel_values") is batch.get("pixel_values")
        own = self.channel_values(
            generated.batch,
            generated.aligned,
            generated.teacher,
            generated.image_counts,
            num_items=num_items,
            into=lambda g: with_generated(fixed, g, rows, ce),
            image_outputs=data.image_outputs if same_images else None,
        )
        return with_generated(data, own, rows, ce)

    def channel_values(
        self,
        batch: dict,
        aligned: AlignedPositions,
        teacher: TeacherTargets,
        image_counts: Sequence[int],
        *,
        num_items: Tensor | int | None = None,
        into: Callable[[ChannelValues], ChannelValues] | None = None,
        image_outputs=None,
    ) -> ChannelValues:
        """The student's forward pass and every channel's per-sample value, unweighted.

        ``num_items`` is the objective's normaliser (see ``forward``): with
        ``chunk_size`` it lets the chunks take their gradients in the forward pass when
        the objective's gradient with respect to CE and the logit energies is the same at
        two different values of them (it then cannot depend on them: the loss is affine
        in them). Whatever loss is built from the values later, gradients stay exact: the
        chunks recompute in backward if the gradient they receive is another one.
        ``into`` maps these values to the ones the loss is built from (default: as they
        are), for the chunks' assumed gradient. ``image_outputs``: an earlier pass's image
        encoder output for this batch's images, reused instead of encoding them again.
        """
        chunked_mode = self.chunk_size is not None
        # Chunked: only the last position's logits are built; the hidden states feed chunks.
        extra = {"output_hidden_states": True, "logits_to_keep": 1} if chunked_mode else {}
        if self.student_representation == "teacher_answer_hidden":
            extra["output_hidden_states"] = True
        inputs = with_image_outputs(forward_inputs(batch, self.adapter), image_outputs)
        out = self.student(**inputs, **extra)
        representation = self._representation(out, teacher, aligned, image_counts)
        features = self._feature_energies(out, teacher, image_counts) if self.head.features else {}
        counts = token_counts(aligned.batch_index[aligned.is_answer], aligned.batch_size)
        teacher_nll = (
            self._teacher_nll(teacher, aligned)
            if self.head.objective.weighting.needs_teacher_nll
            else None
        )
        if chunked_mode:

            def loss_of(ce: Tensor, logit_energies: dict[str, Tensor]) -> Tensor:
                """The objective's loss for given CE and logit energies, all else as is."""
                detached = {name: value.detach() for name, value in features.items()}
                values = ChannelValues(
                    ce, {**logit_energies, **detached}, representation, counts, teacher_nll
                )
                return self.loss(into(values) if into else values, num_items).loss

            ce, logit_energies = self._chunked_channels(out, teacher, aligned, loss_of)
        else:
            ce, logit_energies = self._dense_channels(out, teacher, aligned)
        return ChannelValues(
            ce,
            {**logit_energies, **features},
            representation,
            counts,
            teacher_nll,
            getattr(out, "image_outputs", None),
        )

    def reliability_inputs(
        self,
        batch: dict,
        aligned: AlignedPositions,
        teacher: TeacherTargets,
        image_counts: Sequence[int],
    ) -> tuple[Tensor, Tensor | None]:
        """What the teacher reliability is fitted on, per sample: the teacher NLLs of the
        answers (as the weighting receives them) and h(x). The student runs only when
        h(x) includes its own representation."""
        out = None
        if self.student_representation is not None:
            hidden = self.student_representation == "teacher_answer_hidden"
            extra = {"output_hidden_states": True} if hidden else {}
            out = self.student(**forward_inputs(batch, self.adapter), **extra)
        return (
            self._teacher_nll(teacher, aligned),
            self._representation(out, teacher, aligned, image_counts),
        )

    def _representation(
        self, out, teacher: TeacherTargets, aligned: AlignedPositions, image_counts
    ) -> Tensor | None:
        """The weighting's ``h(x)``: the teacher's, then the student's own (detached)."""
        if self.student_representation is None:
            return teacher.representation
        if self.student_representation == "teacher_answer_hidden":
            own = align.pooled_answer_hidden(out.hidden_states[-1], aligned, side="student")
        elif self.student_representation == "teacher_visual":
            own = align.pooled_visual(self.adapter.visual_tokens(out, image_counts))
        else:
            raise ValueError(f"no student representation of kind {self.student_representation!r}")
        own = own.detach().float()
        if teacher.representation is None:
            return own
        return torch.cat([teacher.representation, own.to(teacher.representation.device)], dim=1)

    def _teacher_nll(self, teacher: TeacherTargets, aligned: AlignedPositions) -> Tensor:
        """Each teacher's mean NLL of each sample's answer tokens: ``[B]`` for a single
        teacher, else ``[B, K]`` with the NLL of the teacher of each weighted channel."""
        nll = {name: self._answer_nll(teacher.of(name), aligned) for name in self.head.teachers}
        if teacher.members is None:
            return nll[None]
        channels = self.head.objective.weighting.weighted_channels
        # The CE column has no teacher; the weighting does not apply a trust to it.
        first = next(iter(nll.values()))
        columns = [
            nll[self.head.channel_teachers[c]] if c != weighting.CE else first for c in channels
        ]
        return torch.stack(columns, dim=1)

    def _answer_nll(self, teacher: TeacherTargets, aligned: AlignedPositions) -> Tensor:
        if teacher.groups is not None:  # under the teacher's own tokens
            return teacher.groups.answer_nll.to(aligned.batch_index.device)
        if teacher.answer_log_probs is not None:
            nll = -teacher.answer_log_probs.float()
        elif teacher.tokens is None:
            raise ValueError("a trust measured against the data needs the teacher's logits")
        else:
            nll = chunked.teacher_token_nll(
                teacher.tokens, aligned.token_ids, self.vocab_rows, self.chunk_size
            )
        answer = aligned.is_answer
        return per_sample_mean(nll[answer], aligned.batch_index[answer], aligned.batch_size)

    def _dense_channels(
        self, out, teacher: TeacherTargets, aligned: AlignedPositions
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CE and logit energies on full ``[N, V]`` student and teacher logits."""
        student_logits = slice_vocab(aligned.student(out.logits), self.vocab_rows)
        answer = aligned.is_answer
        ce_tokens = F.cross_entropy(
            student_logits[answer].float(), aligned.token_ids[answer], reduction="none"
        )
        ce = per_sample_mean(ce_tokens, aligned.batch_index[answer], aligned.batch_size)
        result = {}
        built: dict[str | None, Tensor] = {}
        for spec in self.head.logit_channels:
            grouped = teacher.of(spec.teacher).groups
            if grouped is not None:
                result[spec.name] = self._group_energy(spec.name, grouped, student_logits, aligned)
                continue
            if spec.teacher not in built:
                tokens = teacher.of(spec.teacher).tokens
                if tokens is None:
                    raise ValueError(f"channels {self._logit_names()} need teacher logits")
                built[spec.teacher] = tokens.logits(0, tokens.num_tokens, self.vocab_rows)
            rows = aligned.is_answer if spec.answer_only else slice(None)
            per_token = self.head.energy_fns[spec.name](
                student_logits[rows], built[spec.teacher][rows]
            )
            result[spec.name] = per_sample_mean(
                per_token, aligned.batch_index[rows], aligned.batch_size
            )
        return ce, result

    def _group_loss(self, name: str, grouped: GroupedTargets):
        """The group loss of a channel: ``(student logits, student rest, teacher logits,
        teacher rest) -> [G]`` (:mod:`betakd.cross_tokenizer.group_loss`)."""
        if grouped.loss == "uld":
            return group_loss.uld
        energy, shared = self.head.energy_fns[name], grouped.shared
        if grouped.loss == "prefix":
            return lambda zs, rs, zt, rt: group_loss.prefix(energy, zs, zt, shared)
        return lambda zs, rs, zt, rt: group_loss.hybrid(energy, zs, rs, zt, rt, shared)

    def _group_energy(
        self,
        name: str,
        grouped: GroupedTargets,
        student_logits: Tensor,
        aligned: AlignedPositions,
    ) -> Tensor:
        """``[B]``: a channel's mean energy per group of answer text, for a teacher of
        another vocabulary, from the student's logits at its answer tokens."""
        groups = grouped.groups
        rest_rows = groups.student_rest
        rest_log_prob = -F.cross_entropy(
            student_logits[rest_rows].float(), aligned.token_ids[rest_rows], reduction="none"
        )
        student_rest = sum_by_group(rest_log_prob, groups.student_rest_group, len(groups))
        student_first = student_logits[groups.student_first]
        teacher_first = grouped.first.logits(0, grouped.num_groups, grouped.teacher_vocab)
        values = self._group_loss(name, grouped)(
            student_first,
            student_rest,
            teacher_first.to(student_first.device),
            grouped.rest_log_prob.to(student_first.device),
        )
        return per_sample_mean(values, groups.sample, groups.batch_size)

    def _chunked_group_energy(
        self, name: str, grouped: GroupedTargets, hidden: Tensor, ce_tokens: Tensor, head
    ) -> Tensor:
        """The same from the student's hidden states, a chunk of groups at a time (the
        rest tokens' log-probabilities are the chunked CE's)."""
        groups = grouped.groups
        student_rest = sum_by_group(
            -ce_tokens[groups.student_rest], groups.student_rest_group, len(groups)
        )
        values = group_loss.chunked_group_values(
            self._group_loss(name, grouped),
            hidden[groups.student_first],
            head.weight[: self.vocab_rows],
            None if head.bias is None else head.bias[: self.vocab_rows],
            student_rest,
            grouped.first,
            grouped.rest_log_prob.to(hidden.device),
            grouped.teacher_vocab,
            self.chunk_size,
        )
        return per_sample_mean(values, groups.sample, groups.batch_size)

    def _chunked_channels(
        self, out, teacher: TeacherTargets, aligned: AlignedPositions, loss_of
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CE and logit energies from hidden states, never building [N, V] logits."""
        if not bool(aligned.is_answer.all()):
            raise ValueError("chunked energies cover answer tokens only")
        of_channel = {c.name: teacher.of(c.teacher).groups for c in self.head.logit_channels}
        grouped = {name: groups for name, groups in of_channel.items() if groups is not None}
        plain = [c for c in self.head.logit_channels if c.name not in grouped]
        names = [c.name for c in plain]
        tokens = {c.teacher: teacher.of(c.teacher).tokens for c in plain}
        if any(t is None for t in tokens.values()):
            raise ValueError(f"channels {names} need teacher logits")
        head = self.student.get_output_embeddings()
        hidden = aligned.student(out.hidden_states[-1])
        result = chunked.chunked_channels(
            hidden,
            head.weight[: self.vocab_rows],
            tokens,
            energies={name: self.head.energy_fns[name] for name in names},
            energy_teachers={c.name: c.teacher for c in plain},
            labels=aligned.token_ids,
            bias=None if head.bias is None else head.bias[: self.vocab_rows],
            chunk_size=self.chunk_size,
            compile=self.chunk_compile,
            # The group energies read the CE's per-token values too: its gradient is
            # then not the objective's alone, so the chunks recompute in backward.
            upstream=None if grouped else _known_upstream(loss_of, names, aligned),
        )
        ce, energies = result.per_sample(aligned.batch_index, aligned.batch_size)
        for name, targets in grouped.items():
            energies[name] = self._chunked_group_energy(name, targets, hidden, result.ce, head)
        return ce, {c.name: energies[c.name] for c in self.head.logit_channels}

    def _logit_names(self) -> list[str]:
        return [c.name for c in self.head.logit_channels]

    def _feature_energies(
        self, out, teacher: TeacherTargets, image_counts: Sequence[int]
    ) -> dict[str, Tensor]:
        student_visual = self.adapter.visual_tokens(out, image_counts)
        pooled = {}
        result = {}
        for name, channel in self.head.features.items():
            source = self.head.channel_teachers[name]
            if source not in pooled:
                visual = teacher.of(source).visual
                if visual is None:
                    raise ValueError("feature channels need the teacher's visual tokens")
                pooled[source] = align.pool_visual_pair(student_visual, visual)
            pair = pooled[source]
            # Samples without an image have no visual tokens: their feature energy is 0.
            result[name] = channel(pair.student, pair.teacher, pair.tokens) * pair.mask
        return result

    # Trainer compatibility: gradient checkpointing and config live on the student.
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.student.gradient_checkpointing_enable(**kwargs)

    @property
    def config(self):
        return self.student.config


def _known_upstream(loss_of, names: list[str], aligned: AlignedPositions) -> Tensor | None:
    """d(loss)/d(per-token CE and logit energies) ``[N, 1 + K]`` (columns: CE, then
    ``names``) when it does not depend on their values; else None.

    ``loss_of(ce [B], {name: energy [B]})`` is differentiated at two different values of
    the per-token columns; equal gradients mean a loss affine in them. From the
    weightings' code: equal, fixed, task, instance and reference weightings, hyperpriors,
    energy scales, closed form with one scale per channel and trust measured against
    the data are; closed form per sample (or per micro-batch mean) and trust measured
    against the student's energies are not (their betas follow the current energies),
    and get None: the chunks then recompute in backward.
    """
    if not torch.is_grad_enabled():
        return None

    def gradient(value: float) -> Tensor:
        probe = torch.full((len(aligned), 1 + len(names)), value, device=aligned.token_ids.device)
        probe.requires_grad_(True)
        columns = chunked.ChunkedOutput(probe[:, 0], dict(zip(names, probe[:, 1:].unbind(1))))
        ce, energies = columns.per_sample(aligned.batch_index, aligned.batch_size)
        return torch.autograd.grad(loss_of(ce, energies), probe)[0]

    first = gradient(1.0)
    return first if torch.equal(first, gradient(2.0)) else None
