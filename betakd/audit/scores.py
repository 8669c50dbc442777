"""Per-sample scores of the training data under each teacher, without training.

For every usable sample, in data-file order: each teacher's NLL of the data's answer
(the mean over its answer tokens, as the data trust and the teacher reliability read
it in training), the input representation h(x) the reliability reads, and the
teacher's greedy answer as far as one forward pass with the data's answer as context
tells it (no generation), with whether it is the label. They are computed by the
same trainer code as in `betakd train` (`loss_inputs`, `reliability_inputs`), so the
numbers are training's.

Scores are written a part at a time (safetensors, atomic); a killed audit keeps its
finished parts and continues after them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from betakd import files
from betakd.models import tokenizer_of
from betakd.weighting import CE

PART_NAME = "part-{:05d}.safetensors"
PART_GLOB = "part-*.safetensors"
METADATA_KEY = "betakd_audit"


class AuditError(RuntimeError):
    """The audit cannot run as asked (an error naming what to change)."""


@dataclass
class SampleScores:
    """Scores of the usable samples, in data-file order; ``T`` teachers. The input
    representations stay on disk, read a part at a time (memory bounded)."""

    teachers: list[str | None]  # column order of `nll` (None: the single teacher)
    indices: Tensor  # [N] rows of the data file
    positions: Tensor  # [N] positions in the training data set (what training's fit reads)
    ids: list[str]
    nll: Tensor  # [N, T] each teacher's mean NLL of the data's answer tokens
    teacher_answers: list[list[str]]  # [N][T] each teacher's greedy answer, as far as known
    agree: Tensor  # [N, T] whether each teacher's greedy answer is the label
    parts: list[Path]  # the part files, in order, holding h(x) of the reliability

    def __len__(self) -> int:
        return len(self.ids)

    def representation_chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """``(rows, h(x) [rows, D])`` part by part, in sample order."""
        start = 0
        for path in self.parts:
            with safe_open(str(path), framework="pt") as handle:
                if "representation" not in handle.keys():
                    continue
                chunk = handle.get_tensor("representation")
            yield slice(start, start + len(chunk)), chunk
            start += len(chunk)

    def first_representations(self, n: int) -> Tensor:
        """h(x) of the first ``n`` samples."""
        chunks, have = [], 0
        for _, chunk in self.representation_chunks():
            if have >= n:
                break
            chunks.append(chunk[: n - have])
            have += len(chunks[-1])
        return torch.cat(chunks)


def teacher_columns(trainer) -> list[str | None]:
    """The teachers in the order of the weighting's per-teacher NLL columns."""
    head = trainer.head
    weighted = head.objective.weighting.weighted_channels
    return list(dict.fromkeys(head.channel_teachers[c] for c in weighted if c != CE))


def score_samples(
    trainer, folder: str | Path, *, fingerprint: dict, part_size: int = 256, progress: bool = True
) -> SampleScores:
    """Score every sample of ``trainer.train_dataset``; parts go to ``folder``.

    ``fingerprint`` identifies what is scored (config, data, teachers); parts written
    under another fingerprint are refused, never mixed in.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in files.leftover_temp_files(folder):
        stale.unlink()
    dataset = trainer.train_dataset
    teachers = teacher_columns(trainer)
    plan = [range(s, min(s + part_size, len(dataset))) for s in range(0, len(dataset), part_size)]
    fingerprint_json = json.dumps(fingerprint, sort_keys=True)
    parts = []
    with tqdm(total=len(dataset), desc="auditing", unit="sample", disable=not progress) as bar:
        for number, rows in enumerate(plan):
            path = folder / PART_NAME.format(number)
            if not _part_is_done(path, fingerprint_json, rows, dataset):
                part = score_rows(trainer, rows, teachers)
                _write_part(path, part, fingerprint_json)
            parts.append(_read_part(path))
            bar.update(len(rows))
    return _concatenate(parts, teachers)


@torch.no_grad()
def score_rows(trainer, rows: range, teachers: list[str | None]) -> dict:
    """The scores of the training data set's samples at positions ``rows`` (one part)."""
    vocab_rows = trainer.distillation_module.vocab_rows
    weighting = trainer.head.objective.weighting
    tokenizer = tokenizer_of(trainer.processing_class)
    size = trainer.args.per_device_train_batch_size
    was_training = trainer.model.training
    trainer.model.eval()
    out: dict = {key: [] for key in ("index", "position", "ids", "nll", "representation", "answers", "agree")}  # fmt: skip
    try:
        for start in range(rows.start, rows.stop, size):
            conversations = [trainer.train_dataset[i] for i in range(start, min(rows.stop, start + size))]  # fmt: skip
            scored = trainer.calibration.score_batch(trainer.data_collator(conversations))
            nll, representation, has_answer, aligned, targets = scored
            if representation is None:
                raise AuditError("the audit needs an input representation h(x); none was computed")
            per_teacher = weighting.reliability_nll(nll).float().cpu()
            answers = [
                _teacher_answers(targets.of(t), aligned, vocab_rows, tokenizer) for t in teachers
            ]
            for row, conversation in enumerate(conversations):
                if not has_answer[row]:
                    continue  # nothing to score (the encoder cut the whole answer)
                out["index"].append(conversation.index)
                out["position"].append(start + row)
                out["ids"].append(conversation.id)
                out["nll"].append(per_teacher[row])
                out["representation"].append(representation[row].float().cpu())
                out["answers"].append([a[row][0] for a in answers])
                out["agree"].append([a[row][1] for a in answers])
    finally:
        trainer.model.train(was_training)
    return out


def _teacher_answers(targets, aligned, vocab_rows: int, tokenizer) -> list[tuple[str, bool]]:
    """Per sample: the teacher's greedy answer as far as it is known from one forward
    pass, and whether it is the label.

    With the label as context, the teacher's most likely token at each answer position
    is its greedy choice as long as the label's earlier tokens are its own: its greedy
    answer is the label up to the first position where it prefers another token, then
    that token (shown with "..." when the label's text goes on). It is the label exactly when it
    prefers the label's token everywhere (the end of the turn included).
    """
    if targets.tokens is None:
        raise AuditError("the audit needs the teacher's logits: give it a logit channel")
    n = len(aligned)
    chunk = 1024  # rows of [chunk, vocabulary] logits at a time
    parts = [targets.tokens.logits(s, min(s + chunk, n), vocab_rows).argmax(-1) for s in range(0, n, chunk)]  # fmt: skip
    best = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.long)
    rows, answer = aligned.batch_index.cpu(), aligned.is_answer.cpu()
    labels = aligned.token_ids.cpu()
    result = []
    for r in range(aligned.batch_size):
        mine = (rows == r) & answer
        label, chosen = labels[mine].tolist(), best[mine].tolist()
        differ = next((k for k, (a, b) in enumerate(zip(label, chosen)) if a != b), None)
        if differ is None:
            result.append((tokenizer.decode(label, skip_special_tokens=True).strip(), True))
            continue
        text = tokenizer.decode(label[:differ] + [chosen[differ]], skip_special_tokens=True)
        # "..." only where the label goes on with text (not just its end of turn).
        rest = tokenizer.decode(label[differ + 1 :], skip_special_tokens=True).strip()
        result.append((text.strip() + (" ..." if rest else ""), False))
    return result


def _write_part(path: Path, part: dict, fingerprint_json: str) -> None:
    if part["index"]:
        tensors = {
            "index": torch.tensor(part["index"], dtype=torch.long),
            "position": torch.tensor(part["position"], dtype=torch.long),
            "nll": torch.stack(part["nll"]),
            "agree": torch.tensor(part["agree"], dtype=torch.bool),
            "representation": torch.stack(part["representation"]),
        }
    else:
        tensors = {"index": torch.zeros(0, dtype=torch.long)}
    # One metadata key: the order of several is not deterministic in the file.
    metadata = {
        METADATA_KEY: json.dumps(
            {"fingerprint": fingerprint_json, "ids": part["ids"], "answers": part["answers"]},
            ensure_ascii=False,
        )
    }
    files.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_meta(handle) -> dict:
    return json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))


def _part_is_done(path: Path, fingerprint_json: str, rows: range, dataset) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        meta = _read_meta(handle)
        stored = handle.get_tensor("index").tolist()
    if meta.get("fingerprint") != fingerprint_json:
        raise AuditError(
            f"{path} was written by an audit of another config, data set or teacher; "
            f"delete {path.parent} or choose another --output"
        )
    expected = {dataset[i].index for i in rows}
    if not set(stored) <= expected:
        raise AuditError(f"{path} holds other samples than this audit puts there; delete it")
    return True


def _read_part(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        meta = _read_meta(handle)
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "representation"}
    return {**tensors, "ids": meta["ids"], "answers": meta["answers"], "path": path}


def _concatenate(parts: Sequence[dict], teachers: list[str | None]) -> SampleScores:
    scored = [p for p in parts if p["index"].numel()]
    if not scored:
        raise AuditError("no sample has an answer token to score")
    return SampleScores(
        teachers=teachers,
        indices=torch.cat([p["index"] for p in scored]),
        positions=torch.cat([p["position"] for p in scored]),
        ids=[i for p in scored for i in p["ids"]],
        nll=torch.cat([p["nll"] for p in scored]),
        teacher_answers=[a for p in scored for a in p["answers"]],
        agree=torch.cat([p["agree"] for p in scored]),
        parts=[p["path"] for p in scored],
    )
