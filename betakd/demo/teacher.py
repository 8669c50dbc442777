"""Train, evaluate and cache the `betakd demo` teacher (and build the demo student).

The teacher is trained once with plain cross-entropy on the teacher split (clean
answers, blind slice removed) and cached under ``~/.cache/betakd/demo-teacher-<hash>``,
where the hash covers everything that changes its weights (data, tokenizer, sizes,
training settings). The samples are encoded with the same ``betakd.data`` encoder and
chat template that ``betakd train`` uses, so the teacher sees exactly the prompts it
will be distilled on.

Run ``python -m betakd.demo.teacher`` to train (or find) the cached teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from betakd.data import IGNORE_INDEX
from betakd.demo.config import DemoConfig, load_demo_config
from betakd.demo.easyvqa_data import DemoData, build_demo_data, read_jsonl, train_demo_tokenizer

TEACHER_INFO = "demo_teacher.json"


# ------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$BETAKD_CACHE``, else ``$XDG_CACHE_HOME/betakd``, else ``~/.cache/betakd``."""
    if os.environ.get("BETAKD_CACHE"):
        return Path(os.environ["BETAKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "betakd"


def prepare_data(config: DemoConfig, root: Path | None = None) -> DemoData:
    root = root or cache_root()
    return build_demo_data(root / f"demo-data-{config.data_key()}", config.data)


def demo_tokenizer(config: DemoConfig, root: Path | None = None):
    root = root or cache_root()
    return train_demo_tokenizer(
        root / f"demo-tokenizer-{config.tokenizer_key()}", config.vocab_size
    )


def teacher_dir(config: DemoConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"demo-teacher-{config.teacher_key()}"


# ------------------------------------------------------------------------------ models


def build_demo_model(config: DemoConfig, role: str, seed: int = 0):
    """A freshly initialised tiny LLaVA ``(model, processor)`` for "teacher" or "student"."""
    from betakd.testing.tiny_models import build_tiny_model

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    dims = getattr(config, role)
    model, processor = build_tiny_model(
        "llava",
        demo_tokenizer(config),
        size=dims,
        image_size=config.image_size,
        seed=seed,
    )
    return model, processor


def save_student_init(config: DemoConfig, seed: int, out_dir: str | os.PathLike) -> Path:
    """Save the untrained demo student (model + processor) for ``student.path``."""
    model, processor = build_demo_model(config, "student", seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- encoding


def encode_file(path: Path, image_folder: Path, processor, model) -> tuple[list, list[dict]]:
    """Encode every record of a JSONL file once, with the library's sample encoder."""
    from betakd.data import SampleEncoder, open_images, parse_record
    from betakd.models import get_adapter

    encoder = SampleEncoder(processor, get_adapter(model, processor))
    records = read_jsonl(path)
    encoded = []
    for index, record in enumerate(records):
        conversation = parse_record(record, index, image_folder)
        encoded.append(encoder.encode(conversation, open_images(conversation)))
    return [encoder, encoded], records


def _batch(encoder, samples: Sequence) -> dict:
    from betakd.data import pad_encoded
    from betakd.models import forward_inputs

    batch = pad_encoded(list(samples), encoder)
    return {**forward_inputs(batch, encoder.adapter), "labels": batch["labels"]}


def first_answer_predictions(model, encoder, samples: Sequence, batch_size: int = 256):
    """Argmax over the first answer token per sample (easy-VQA answers are one token).

    Returns ``(predicted_ids, target_ids)``; a cheap stand-in for greedy exact match.
    """
    predictions, targets = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = _batch(encoder, samples[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            first = (labels != IGNORE_INDEX).float().argmax(dim=1)  # first answer position
            rows = torch.arange(len(first))
            predictions.append(logits[rows, first - 1].argmax(-1))
            targets.append(labels[rows, first])
    return torch.cat(predictions), torch.cat(targets)


def answer_nll(model, encoder, samples: Sequence, batch_size: int = 256) -> list[float]:
    """The model's mean negative log-likelihood of each sample's answer tokens (nats):
    what the demo's data trust (``trust: {reference: data}``) reads from the teacher."""
    values: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = _batch(encoder, samples[start : start + batch_size])
            labels = batch.pop("labels")[:, 1:]
            log_probs = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
            answer = labels != IGNORE_INDEX
            token_nll = -log_probs.gather(2, labels.clamp_min(0)[..., None])[..., 0]
            values += ((token_nll * answer).sum(1) / answer.sum(1).clamp_min(1)).tolist()
    return values


def accuracy_report(correct: torch.Tensor, records: Sequence[dict]) -> dict[str, float]:
    """Accuracy (%) overall, outside / inside the blind slice, and per question type."""
    blind = torch.tensor([bool(r["meta"]["blind"]) for r in records])
    qtypes = [r["meta"]["qtype"] for r in records]

    def pct(mask: torch.Tensor) -> float:
        return round(100.0 * correct[mask].float().mean().item(), 2) if mask.any() else math.nan

    report = {"all": pct(torch.ones_like(blind)), "outside_blind": pct(~blind), "blind": pct(blind)}
    for qtype in sorted(set(qtypes)):
        mask = torch.tensor([q == qtype for q in qtypes])
        report[f"{qtype}_outside_blind"] = pct(mask & ~blind)
    return report


# ---------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup: int) -> float:
    # Linear warm-up, then cosine decay to zero: the teacher is trained exactly `total` steps.
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_teacher(config: DemoConfig, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train the teacher with cross-entropy on the teacher split and save it in ``out_dir``.

    Returns the info written to ``demo_teacher.json`` (sizes, time, test accuracy).
    """
    from tqdm.auto import tqdm

    settings = config.teacher_training
    data = prepare_data(config)
    model, processor = build_demo_model(config, "teacher", settings.seed)
    (encoder, train), _ = encode_file(data.train_teacher, data.image_folder, processor, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, settings.steps, settings.warmup_steps)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    start = time.time()
    bar = tqdm(range(settings.steps), desc="demo teacher", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(train), (settings.batch_size,), generator=generator)
        loss = model(**_batch(encoder, [train[int(r)] for r in rows])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - start

    (test_encoder, test), records = encode_file(data.test, data.image_folder, processor, model)
    predicted, target = first_answer_predictions(model, test_encoder, test)
    info = {
        "key": config.teacher_key(),
        "parameters": parameter_count(model),
        "image_tokens": (config.image_size // config.teacher.patch_size) ** 2,
        "train_samples": len(train),
        "train_seconds": round(train_seconds, 1),
        "test_accuracy": accuracy_report(predicted == target, records),
        "config": {
            "teacher": asdict(config.teacher),
            "teacher_training": asdict(config.teacher_training),
            "data": asdict(config.data),
            "vocab_size": config.vocab_size,
            "image_size": config.image_size,
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)
    (out / TEACHER_INFO).write_text(json.dumps(info, indent=2))
    return info


def ensure_teacher(
    config: DemoConfig | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """The cached teacher's folder, training it first when it is missing (or ``force``)."""
    config = config or load_demo_config()
    target = teacher_dir(config)
    if (target / TEACHER_INFO).exists() and not force:
        return target
    # Train into a scratch folder and rename, so an interrupted run never looks cached.
    scratch = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    train_teacher(config, scratch, progress=progress)
    if target.exists():
        shutil.rmtree(target)
    os.replace(scratch, target)
    return target


def teacher_info(path: str | os.PathLike) -> dict:
    """The metrics and config saved next to a trained demo teacher."""
    info_path = Path(path) / TEACHER_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: not a trained demo teacher")
    return json.loads(info_path.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train (or find) the cached betakd demo teacher.")
    parser.add_argument("--config", default=None, help="YAML like betakd/demo/defaults.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override teacher_training.steps")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    # The demo models are tiny: one thread is as fast as two and leaves a core free.
    torch.set_num_threads(1)
    config = load_demo_config(args.config)
    if args.steps is not None:
        config = replace(
            config, teacher_training=replace(config.teacher_training, steps=args.steps)
        )
    path = ensure_teacher(config, force=args.force)
    print(json.dumps({"teacher": str(path), **teacher_info(path)}, indent=2))


if __name__ == "__main__":
    main()
