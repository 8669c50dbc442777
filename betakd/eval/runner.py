"""Batched greedy generation that resumes and does not depend on the batch size.

Published VQA numbers drift with batch size and padding side. Three choices
keep a sample's output independent of its batch: left padding (every prompt
ends at the last column, so generation starts at the same place for all rows),
an attention mask over the padding, and position ids counted from each row's
first real token (transformers derives them from the attention mask during
`generate`). Decoding is greedy (`do_sample=False`, one beam).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from betakd.eval.records import (
    EvalDataError,
    PredictionsMismatch,
    append_jsonl,
    drop_torn_last_line,
    iter_jsonl,
    question_id,
    require,
)
from betakd.eval.samples import Sample, as_sample, load_image
from betakd.models import stop_token_ids, tokenizer_of


def generate(
    model: Any,
    processor: Any,
    samples: Iterable[Sample | Mapping[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    output_jsonl: str | Path | None = None,
    *,
    model_id: str | None = None,
    producer: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers for `samples`, one record per sample, in sample order.

    `model` is any loaded generative model (a VLM from
    `AutoModelForImageTextToText` or a causal LM); `processor` is its processor
    (or tokenizer for text-only models) and must carry a chat template.
    With `output_jsonl`, each finished batch is appended to that file at once;
    samples already present there (from an interrupted run) are not generated
    again, and records another model wrote there are refused
    (`PredictionsMismatch`): a file holds one model's answers. `producer`
    identifies the model and settings (`betakd eval` gives the model folder,
    a digest of its weights, dtype and max_new_tokens); without it, the model's
    name and `max_new_tokens`. Records have the LLaVA answer-file fields
    `question_id`, `prompt`, `text`, `model_id`, `producer`, plus the sample's
    extra fields. Every image is opened before the first answer is generated,
    so a missing or broken one stops the run at once, naming file and question.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    todo = _unique_samples(samples)
    model_id = model_id or _model_name(model)
    producer = dict(producer or {"model_id": model_id, "max_new_tokens": max_new_tokens})
    path = Path(output_jsonl) if output_jsonl is not None else None
    done = _resume(path, producer) if path is not None else {}
    _check_same_prompts(todo, done, path)
    pending = [s for s in todo if s.question_id not in done]
    check_images(pending, progress=progress)
    with tqdm(
        total=len(todo), initial=len(todo) - len(pending), disable=not progress, desc="generate"
    ) as bar:
        for batch in _chunks(pending, batch_size):
            texts = decode_batch(processor, generate_batch(model, processor, batch, max_new_tokens))
            records = [_record(s, t, model_id, producer) for s, t in zip(batch, texts)]
            if path is not None:
                append_jsonl(path, records)
            done.update((r["question_id"], r) for r in records)
            bar.update(len(batch))
    return [done[s.question_id] for s in todo]


@torch.inference_mode()
def generate_batch(
    model: Any, processor: Any, batch: Sequence[Sample], max_new_tokens: int
) -> list[list[int]]:
    """Generated token ids per sample, without prompt, padding or end-of-sequence tokens."""
    tokenizer = tokenizer_of(processor)
    with _left_padding(tokenizer):
        inputs = {k: _to_model(v, model) for k, v in _encode(processor, batch).items()}
        output = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    stop = stop_token_ids(model, tokenizer)
    return [_until_stop(row.tolist(), stop) for row in new_tokens]


def decode_batch(processor: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    texts = tokenizer_of(processor).batch_decode(token_ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


def render_prompt(processor: Any, sample: Sample) -> str:
    """The sample as one user turn in the model's chat template, ready for the answer."""
    if getattr(processor, "chat_template", None) is None:
        raise EvalDataError(
            f"{type(processor).__name__} has no chat_template: evaluation prompts use the "
            "model's chat template; set one on the processor (or tokenizer) and save it"
        )
    content: str | list[dict[str, str]]
    if tokenizer_of(processor) is processor:
        # Text-only chat templates expect the content as a plain string.
        content = sample.text
    else:
        content = [{"type": "text", "text": sample.text}]
        if sample.image is not None:
            content.insert(0, {"type": "image"})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(processor: Any, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    prompts = [render_prompt(processor, s) for s in batch]
    # Per prompt, as the training encoder passes them (Gemma 3 and Idefics3 read the
    # nesting; the others flatten it).
    images = [[load_image(s.image, s.describe())] if s.image is not None else [] for s in batch]
    if not any(images):
        images = []
    # The chat template already holds the special tokens (BOS etc.); adding
    # them again would change the prompt.
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "add_special_tokens": False}
    tokenizer = tokenizer_of(processor)
    if images and tokenizer is processor:
        raise EvalDataError("samples with images need a multimodal processor, got a tokenizer")
    if tokenizer is processor:
        return dict(tokenizer(prompts, **kwargs))
    return dict(processor(text=prompts, images=images or None, **kwargs))


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    """Left padding, and a pad token if the tokenizer has none, until the block ends.

    Restored afterwards so that the caller's tokenizer keeps its settings
    (training collators pad on the right). The pad token's value never reaches
    the model (the attention mask hides padding), so a tokenizer without one
    pads with its end-of-sequence token.
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if pad is None and tokenizer.eos_token is None:
        raise EvalDataError("the tokenizer has neither a pad nor an end-of-sequence token")
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position]
    return ids


def _to_model(value: Any, model: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        # Pixel values follow the model's dtype (bf16/fp16 checkpoints).
        return value.to(device=model.device, dtype=model.dtype)
    return value.to(model.device)


def _unique_samples(samples: Iterable[Sample | Mapping[str, Any]]) -> list[Sample]:
    result = [as_sample(s, f"sample {i}") for i, s in enumerate(samples)]
    seen: set[str] = set()
    for sample in result:
        if sample.question_id in seen:
            raise EvalDataError(f"duplicate question_id {sample.question_id!r} among the samples")
        seen.add(sample.question_id)
    return result


def check_images(samples: Sequence[Sample], *, progress: bool = True) -> None:
    """Open every sample's image; one `EvalDataError` lists all that cannot be read.

    Run before generation, so that a broken image stops the run before hours
    of answers rather than after them.
    """
    problems = []
    with_images = [s for s in samples if s.image is not None]
    for sample in tqdm(with_images, disable=not progress or not with_images, desc="check images"):
        try:
            load_image(sample.image, sample.describe())
        except EvalDataError as err:
            problems.append(str(err))
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise EvalDataError(
            f"{len(problems)} of {len(with_images)} images cannot be read; nothing was "
            f"generated:\n  {shown}{more}"
        )


def _resume(path: Path, producer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Records already in `path`, by question id; creates the folder for a new file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return {}
    drop_torn_last_line(path)
    done: dict[str, dict[str, Any]] = {}
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        qid = question_id(require(record, "question_id", where), where)
        require(record, "text", where)
        if record.get("producer") != producer:
            raise PredictionsMismatch(
                f"{where}: this file holds answers of {_describe_producer(record)}, not of "
                f"this run ({_describe_producer({'producer': producer})}); evaluate into "
                "another output folder, or start this one afresh (betakd eval --overwrite)"
            )
        if qid in done:
            raise EvalDataError(f"{where}: duplicate question_id {qid!r} in predictions file")
        done[qid] = {**record, "question_id": qid}
    return done


def _check_same_prompts(
    samples: list[Sample], done: Mapping[str, Mapping], path: Path | None
) -> None:
    # A resumed file written with other prompts (another suffix, another data
    # version) would mix two protocols in one score.
    for sample in samples:
        record = done.get(sample.question_id)
        if record is not None and record.get("prompt", sample.text) != sample.text:
            raise EvalDataError(
                f"{path}: question {sample.question_id!r} was answered for another prompt "
                f"({record['prompt']!r}); write to a new predictions file"
            )


def _record(
    sample: Sample, text: str, model_id: str, producer: Mapping[str, Any]
) -> dict[str, Any]:
    # Extra fields first: they must not overwrite the runner's own fields.
    return {
        **sample.extra,
        "question_id": sample.question_id,
        "prompt": sample.text,
        "text": text,
        "model_id": model_id,
        "producer": dict(producer),
    }


def _describe_producer(record: Mapping[str, Any]) -> str:
    producer = record.get("producer")
    if not isinstance(producer, Mapping):
        return f"an unrecorded model (model_id {record.get('model_id')!r})"
    return ", ".join(f"{k}={v}" for k, v in producer.items())


def _model_name(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def _chunks(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
