"""Online teacher vs offline teacher cache: training step time and bytes per cached token.

Builds a tiny LLaVA student and a teacher about 4x its size (parameters; the teacher
also sees 4x the image tokens), a synthetic LLaVA-format data set, writes the teacher
cache with ``betakd.cache_cli.cache_teacher`` and then times training steps both ways
on the same student, head and optimizer, alternating online and cached steps on the
same batches so the ratio compares like with like on a shared machine.

One step = collation from raw conversations (the cached path encodes no teacher
batch), teacher targets (online: teacher forward; cached: shard reads and the dense
rebuild from top-k + tail), student forward/backward and the optimizer step, i.e.
what ``BetaKDTrainer`` does per step. The step is ``BetaKDTrainer.compute_loss`` itself
for both, with the cached teacher source swapped in for the cached steps.

Bytes per cached token are read from the shard files: the file bytes (headers and
per-sample offsets included) minus the per-sample feature tensors (``visual``,
``visual_offsets``, ``representation``), divided by the answer tokens. The same shards
are also re-encoded with the 24-bit ids used for vocabularies over 32768 tokens
(e.g. 151936), since the tiny vocabulary (512) fits int16 ids. The feature bytes per
sample are reported separately. Targets: cached steps >= 1.5x faster than online;
<= 200 bytes per token at k = 32.

    python benchmarks/teacher_cache.py                  # about a minute on 2 CPU cores
    python benchmarks/teacher_cache.py --samples 64 --steps 12

The last printed line is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from betakd import config as cfg
from betakd import energies, models
from betakd.build import build_trainer, training_arguments
from betakd.cache_cli import cache_teacher
from betakd.data import KDCollator
from betakd.teachers import BatchMeta
from betakd.teachers import cache_format as fmt
from betakd.teachers.build import build_teacher
from betakd.testing.tiny_models import TinyDims, save_tiny_model
from betakd.testing.tiny_tokenizer import train_tokenizer

STUDENT = TinyDims(hidden=64, layers=2, heads=2, vision_hidden=32, vision_layers=1, patch_size=8)
TEACHER = TinyDims(hidden=128, layers=3, heads=4, vision_hidden=64, vision_layers=2, patch_size=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
ANSWERS = (
    "The shape is {c}. It is a small {c} square in the middle of a white background.",
    "Yes, there is a {c} shape in the image, near the top left corner of the picture.",
    "A {c} rectangle. The quick brown fox jumps over the lazy dog next to it.",
)
LARGE_VOCAB = 151936


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The options of this benchmark, which ``served_teacher.py`` extends."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--samples", type=int, default=48, help="samples in the data set")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--top-k", type=int, default=32)
    # One intra-op thread: on a shared 2-core machine, waits for a second busy thread
    # dominate the tiny models' small ops (both variants alike) and swamp the ratio.
    p.add_argument("--threads", type=int, default=1)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def write_data(root: Path, samples: int) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    names = sorted(COLOURS)
    for i in range(samples):
        colour = names[i % len(names)]
        Image.new("RGB", (40, 32), COLOURS[colour]).save(images / f"{i}.png")
        answer = ANSWERS[i % len(ANSWERS)].format(c=colour)
        records.append(
            {
                "id": f"b{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the shape in the image."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    data = root / "data.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return data, images


def make_config(root: Path, data: Path, images: Path, args) -> cfg.TrainConfig:
    return cfg.validate(
        {
            "student": {"path": str(root / "student")},
            "teacher": {
                "path": str(root / "teacher"),
                "cache_dir": str(root / "cache"),
                "cache_top_k": args.top_k,
            },
            "data": {"train_file": str(data), "image_folder": str(images)},
            "channels": {
                "logits": [{"energy": "cosine_probs"}],
                "features": [{"name": "visual", "energy": "mse"}],
            },
            "weighting": {"name": "instance", "representation": "teacher_visual"},
            "training": {
                "output_dir": str(root / "out"),
                "per_device_train_batch_size": args.batch_size,
                "use_cpu": True,
                "report_to": "none",
                "disable_tqdm": True,
            },
        }
    )


def parameters(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(path / "model.safetensors").values())


def step(trainer, optimizer, collator, conversations, teacher=None, before=None) -> float:
    """Seconds of one training step on ``conversations`` with ``teacher`` (default: the
    trainer's); ``before()`` runs first, inside the timing (the data loader's work)."""
    start = time.perf_counter()
    if before is not None:
        before()
    batch = collator(conversations)
    num_items = trainer.num_items([batch], torch.device("cpu"))
    online = trainer.teacher
    # The same trainer serves both: it asks whichever teacher source it holds.
    trainer.teacher = teacher or online
    try:
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    finally:
        trainer.teacher = online
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def shard_bytes(path: Path) -> tuple[int, int, int]:
    """(file bytes, per-sample feature tensor bytes, answer tokens) of one shard."""
    features = 0
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            if name in fmt.FEATURE_TENSORS:
                tensor = handle.get_tensor(name)
                features += tensor.numel() * tensor.element_size()
        tokens = handle.get_slice("target_ids").get_shape()[0]
    return path.stat().st_size, features, tokens


def reencode_wide(path: Path, out: Path) -> Path:
    """The shard as written for a vocabulary over 32768 tokens (24-bit ids)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    for name in ("target_ids", "topk_ids"):
        if name in tensors:
            ids = fmt.decode_ids(tensors.pop(name), None)
            for suffix, part in fmt.encode_ids(ids, "int24").items():
                tensors[name + suffix] = part
    save_file(tensors, str(out), metadata=metadata)
    return out


def storage_report(cache_dir: Path, scratch: Path) -> dict:
    index = json.loads((cache_dir / fmt.INDEX_FILE).read_text())
    files = [cache_dir / s["file"] for s in index["shards"]]
    totals = [shard_bytes(f) for f in files]
    wide = [shard_bytes(reencode_wide(f, scratch / f.name)) for f in files]
    tokens = sum(t for _, _, t in totals)
    samples = index["totals"]["samples"]

    def per_token(rows):
        return sum(size - feats for size, feats, _ in rows) / tokens

    return {
        "samples": samples,
        "tokens": tokens,
        "bytes_per_token": per_token(totals),
        "bytes_per_token_24bit_ids": per_token(wide),
        "field_bytes_per_token": index["layout"]["bytes_per_token_fields"],
        "field_bytes_per_token_24bit_ids": fmt.bytes_per_token(
            index["layout"]["top_k"], LARGE_VOCAB
        ),
        "feature_bytes_per_sample": sum(f for _, f, _ in totals) / samples,
        "all_bytes_per_token": (
            sum(s for s, _, _ in totals) + (cache_dir / fmt.INDEX_FILE).stat().st_size
        )
        / tokens,
    }


def targets_of(source, batch: dict):
    """Aligned positions and teacher targets from a teacher source, as the trainer gets them."""
    inputs = dict(batch)
    return source(inputs, BatchMeta.pop_from(inputs))


def precision_report(trainer, teacher, conversations) -> dict:
    """float16 top-k vs the online teacher's float32 log-probs, and one energy both ways."""
    batch = trainer.data_collator(conversations)
    module = trainer.model
    vocab = module.vocab_rows
    aligned, online_targets = targets_of(trainer.teacher, batch)
    online = torch.log_softmax(online_targets.tokens.logits(0, len(aligned), vocab).float(), -1)
    cached_aligned, cached_targets = targets_of(teacher, batch)
    dense = cached_targets.tokens.logits(0, len(cached_aligned), vocab)
    # The cached top-k entries (the tail entries are the uniform spread, not errors).
    top = dense.topk(int(teacher.cache.layout["top_k"]), -1).indices
    log_error = (dense.gather(1, top) - online.gather(1, top)).abs()
    prob_error = (dense.gather(1, top).exp() / online.gather(1, top).exp() - 1).abs()
    with torch.no_grad():
        student = module.student(**models.forward_inputs(batch, module.adapter)).logits
        student = aligned.student(student)[:, :vocab].float()
    energy = energies.get("cosine_probs")
    online_energy, cached_energy = energy(student, online), energy(student, dense)
    return {
        "max_abs_log_prob_error": float(log_error.max()),
        "max_rel_prob_error": float(prob_error.max()),
        "mean_tail_mass": float(1 - online.gather(1, top).exp().sum(-1).mean()),
        "cosine_probs_online": float(online_energy.mean()),
        "cosine_probs_cached": float(cached_energy.mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer()
        params = (
            parameters(save_tiny_model("llava", root / "student", tokenizer, size=STUDENT)),
            parameters(save_tiny_model("llava", root / "teacher", tokenizer, size=TEACHER)),
        )
        data, images = write_data(root, args.samples)
        config = make_config(root, data, images, args)

        start = time.perf_counter()
        cache_dir = cache_teacher(config, progress=False)
        write_seconds = time.perf_counter() - start

        trainer = build_trainer(config, training_arguments(config))
        optimizer = trainer.create_optimizer()
        raw = config.model_dump()
        raw["teacher"]["source"] = "cache"
        cached_config = cfg.validate(raw)
        module = trainer.model
        student = models.LoadedModel(module.student, trainer.processing_class, module.adapter)
        teacher = build_teacher(cached_config, student).source
        student_collator = KDCollator(trainer.data_collator.student)
        dataset = trainer.train_dataset
        batches = [
            [dataset[(i * args.batch_size + j) % len(dataset)] for j in range(args.batch_size)]
            for i in range(args.warmup + args.steps)
        ]
        online_times, cached_times = [], []
        for i, conversations in enumerate(batches):
            t_online = step(trainer, optimizer, trainer.data_collator, conversations)
            t_cached = step(trainer, optimizer, student_collator, conversations, teacher)
            if i >= args.warmup:
                online_times.append(t_online)
                cached_times.append(t_cached)

        precision = precision_report(trainer, teacher, batches[0])
        (root / "wide").mkdir()
        storage = storage_report(cache_dir, root / "wide")

    online_s, cached_s = statistics.median(online_times), statistics.median(cached_times)
    result = {
        "student_params": params[0],
        "teacher_params": params[1],
        "teacher_to_student_params": params[1] / params[0],
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "top_k": args.top_k,
        "online_step_s": online_s,
        "cached_step_s": cached_s,
        "speedup": online_s / cached_s,
        # The fastest step of each: less sensitive to other jobs on a shared machine.
        "online_step_min_s": min(online_times),
        "cached_step_min_s": min(cached_times),
        "speedup_min": min(online_times) / min(cached_times),
        "cache_write_s": write_seconds,
        **storage,
        **precision,
    }
    return result


def report(result: dict) -> None:
    student, teacher = result["student_params"], result["teacher_params"]
    result["targets_met"] = {
        "speedup>=1.5": result["speedup"] >= 1.5,
        "bytes_per_token<=200": result["bytes_per_token"] <= 200
        and result["bytes_per_token_24bit_ids"] <= 200,
    }
    print(f"teacher/student parameters: {teacher}/{student} = {teacher / student:.2f}x")
    print(
        f"step time (median of {result['steps']}, batch {result['batch_size']}): online "
        f"{result['online_step_s'] * 1e3:.1f} ms | cached {result['cached_step_s'] * 1e3:.1f} ms"
        f" | speedup {result['speedup']:.2f}x (target >= 1.5x); fastest steps "
        f"{result['online_step_min_s'] * 1e3:.1f} vs {result['cached_step_min_s'] * 1e3:.1f} ms"
        f" = {result['speedup_min']:.2f}x"
    )
    print(
        f"bytes per cached token at k={result['top_k']}: {result['bytes_per_token']:.1f} "
        f"(int16 ids) | {result['bytes_per_token_24bit_ids']:.1f} (24-bit ids, V > 32768) "
        f"| fields alone {result['field_bytes_per_token']} / "
        f"{result['field_bytes_per_token_24bit_ids']} (target <= 200)"
    )
    print(
        f"per-sample features: {result['feature_bytes_per_sample']:.0f} bytes; all files "
        f"{result['all_bytes_per_token']:.1f} bytes per token; cache written in "
        f"{result['cache_write_s']:.1f} s"
    )
    print(
        f"float16 top-k: max |log p error| {result['max_abs_log_prob_error']:.2e}, max "
        f"relative p error {result['max_rel_prob_error']:.2e}; cosine_probs online "
        f"{result['cosine_probs_online']:.5f} vs cached {result['cosine_probs_cached']:.5f} "
        f"(tail mass {result['mean_tail_mass']:.3f})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    report(main())
