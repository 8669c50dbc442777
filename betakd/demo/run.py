"""`betakd demo`: distill an easy-VQA student with every weighting and report what won.

Every run goes through the public path (a YAML-equivalent config -> ``run_training``)
and every accuracy through the evaluation harness (``betakd.eval.generate`` + the
easy-VQA scorer), so the demo exercises what a user's data would.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from betakd import config as cfg
from betakd.demo import report
from betakd.demo.teacher import (
    DemoConfig,
    ensure_teacher,
    load_demo_config,
    prepare_data,
    save_student_init,
    teacher_info,
)
from betakd.eval import easyvqa
from betakd.eval.runner import generate
from betakd.eval.samples import Sample
from betakd.train import run_training

logger = logging.getLogger(__name__)

STRATEGIES = ("ce_only", "equal", "fixed", "task", "instance", "closed_form")
KD_CHANNELS = ("cosine_probs", "visual")
BETA_BOUNDS = (math.exp(-5), math.exp(5))


@dataclass(frozen=True)
class DemoSettings:
    """What one `betakd demo` invocation runs."""

    seeds: tuple[int, ...] = (0, 1)
    strategies: tuple[str, ...] = STRATEGIES
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-3
    weighting_learning_rate: float = 0.02
    test_questions: int = 1000
    eval_batch_size: int = 128
    logging_steps: int = 10
    train_limit: int | None = None  # first N student training questions (None: all)


def settings_from(config: DemoConfig) -> DemoSettings:
    """The student runs as ``defaults.yaml`` (``student_training``) describes them."""
    student = config.student_training
    return DemoSettings(
        seeds=tuple(student.seeds),
        steps=student.steps,
        batch_size=student.batch_size,
        learning_rate=student.learning_rate,
    )


QUICK = DemoSettings(seeds=(0,), steps=12, test_questions=64, logging_steps=4, train_limit=384)
QUICK_TEACHER_STEPS = 40


@dataclass
class RunRecord:
    strategy: str
    seed: int
    accuracy: dict
    train_seconds: float
    beta_history: dict = field(default_factory=dict)
    separation: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)


def demo_config(quick: bool) -> DemoConfig:
    config = load_demo_config()
    if quick:
        # A smoke run: the same models and data, a teacher trained for a few steps only
        # (cached under its own key), so the pipeline runs end to end in about 2 minutes.
        config = replace(
            config,
            data=replace(config.data, teacher_max_train=512, max_test=200),
            teacher_training=replace(config.teacher_training, steps=QUICK_TEACHER_STEPS),
        )
    return config


# ----------------------------------------------------------------------------- evaluation


def test_samples(test_file: Path, image_folder: Path, limit: int, seed: int = 0) -> list[dict]:
    """A fixed random subset of the test split (same for every run)."""
    records = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(records)
    return records[:limit]


def _as_sample(record: dict, image_folder: Path) -> Sample:
    # The prompt is exactly the training prompt (image, then the question): tiny models
    # have seen no other phrasing.
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    return Sample(record["id"], question, str(image_folder / record["image"]))


def evaluate(model_dir: Path, records: list[dict], image_folder: Path, batch_size: int) -> dict:
    """Generation-based exact match (%): overall, per question type, blind slice vs rest."""
    from betakd.models import load_model, load_processor

    model = load_model(model_dir, dtype="float32", frozen=True)
    processor = load_processor(model_dir)
    samples = [_as_sample(r, image_folder) for r in records]
    predictions = generate(
        model, processor, samples, batch_size=batch_size, max_new_tokens=4, progress=False
    )
    by_id = {p["question_id"]: p["text"] for p in predictions}
    return accuracy_by_slice(by_id, records)


def accuracy_by_slice(predictions: dict[str, str], records: list[dict]) -> dict:
    def pct(rows: list[dict]) -> float | None:
        if not rows:
            return None
        hits = sum(
            easyvqa.is_correct(predictions[r["id"]], r["conversations"][1]["value"]) for r in rows
        )
        return round(100.0 * hits / len(rows), 2)

    outside = [r for r in records if not r["meta"]["blind"]]
    inside = [r for r in records if r["meta"]["blind"]]
    result = {"all": pct(records), "outside_blind": pct(outside), "blind": pct(inside)}
    for qtype in sorted({r["meta"]["qtype"] for r in records}):
        result[qtype] = pct([r for r in records if r["meta"]["qtype"] == qtype])
    return result


# ----------------------------------------------------------------------------- training


def train_config(
    strategy: str,
    seed: int,
    *,
    student: Path,
    teacher: Path,
    data,
    out: Path,
    settings: DemoSettings,
    fixed_weights: dict | None,
    cache_dir: Path | None = None,
) -> cfg.TrainConfig:
    """The `betakd train` config of one demo run (what a user would write in YAML)."""
    channels = {"logits": [], "features": []}
    weighting: dict = {"name": "equal"}
    if strategy != "ce_only":
        channels = {
            "logits": [{"energy": "cosine_probs"}],
            "features": [{"name": "visual", "energy": "mse"}],
        }
        weighting = {"name": strategy, "learning_rate": settings.weighting_learning_rate}
    if strategy == "fixed":
        weighting["options"] = {"weights": fixed_weights}
    # Learned and closed-form betas are kept in the reference code's range [e^-5, e^5],
    # smoothly (no dead zone): unbounded, the visual channel's beta follows its energy
    # towards zero and grows past 10^4 within 250 steps, which destabilised runs.
    if strategy == "task":
        weighting["options"] = {"bounds": list(BETA_BOUNDS)}
    if strategy == "instance":
        weighting["representation"] = "teacher_visual"
        weighting["options"] = {
            "hidden": 32,
            "normalize_input": True,
            "bounds": list(BETA_BOUNDS),
        }
    if strategy == "closed_form":
        weighting["options"] = {"min_energy": 1 / (2 * BETA_BOUNDS[1])}
    raw = {
        "student": {"path": str(student)},
        "teacher": (
            {"path": str(teacher), "source": "cache", "cache_dir": str(cache_dir)}
            if cache_dir is not None
            else {"path": str(teacher)}
        ),
        "data": {
            "train_file": str(data.train_student),
            "image_folder": str(data.image_folder),
            "limit": settings.train_limit,
        },
        "channels": channels,
        "weighting": weighting,
        "training": {
            "output_dir": str(out),
            "max_steps": settings.steps,
            "per_device_train_batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,
            "logging_steps": settings.logging_steps,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": seed,
            "data_seed": seed,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
        },
    }
    return cfg.validate(raw, source=f"demo {strategy} seed {seed}")


def initial_scale_weights(history: list[dict]) -> dict[str, float]:
    """The paper's manual baseline: weight each channel so that it starts at CE's scale."""
    first = next(h for h in history if "ce/energy" in h)
    return {c: first["ce/energy"] / max(first[f"{c}/energy"], 1e-8) for c in KD_CHANNELS}


def beta_history(history: list[dict]) -> dict[str, list[list[float]]]:
    """Per channel: [step, beta mean, min, max] at every logging step."""
    result: dict[str, list[list[float]]] = {}
    for channel in KD_CHANNELS:
        key = f"{channel}/beta_mean"
        rows = [
            [h["step"], h[key], h[f"{channel}/beta_min"], h[f"{channel}/beta_max"]]
            for h in history
            if key in h
        ]
        if rows:
            result[channel] = rows
    return result


def final_instance_betas(trainer, cache_dir: Path, train_file: Path, limit: int | None) -> dict:
    """Betas the trained instance network predicts for every training sample.

    Reads each sample's representation h(x) from the teacher cache, so no teacher runs.
    """
    from betakd.teachers import TeacherCache

    cache = TeacherCache(cache_dir)
    records = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    records = records[:limit] if limit else records
    rows = [cache.sample(i).representation.float() for i in range(len(records))]
    weighting = trainer._module.head.objective.weighting
    with torch.no_grad():
        log_beta = weighting.positive.log_beta(weighting.net(torch.stack(rows)))
    table = {}
    for k, channel in enumerate(weighting.weighted_channels):
        betas = log_beta[:, k].exp().tolist()
        groups = {"noisy": [], "clean": [], "blind": [], "rest": []}
        for record, beta in zip(records, betas):
            groups["noisy" if record["meta"]["noisy"] else "clean"].append(beta)
            groups["blind" if record["meta"]["blind"] else "rest"].append(beta)
        # Beta-KD should trust the teacher less where it is wrong: AUC of "lower beta"
        # for the blind slice (and for noisy labels) against the rest.
        groups["auc_blind_lower"] = report.roc_auc(groups["rest"], groups["blind"])
        groups["auc_noisy_lower"] = report.roc_auc(groups["clean"], groups["noisy"])
        table[channel] = groups
    return table


def ensure_teacher_cache(config: DemoConfig, teacher: Path, student_init: Path, data, settings):
    """The teacher's outputs on the student's training data, computed once and cached.

    Every KD run then reads the teacher from this cache (`teacher.source: cache`), which
    is what makes twelve runs fit in a few minutes on a CPU.
    """
    from betakd.cache_cli import cache_teacher
    from betakd.demo.teacher import cache_root

    limit = settings.train_limit or "all"
    cache_dir = (
        cache_root() / f"demo-teacher-cache-{config.teacher_key()}-{config.data_key()}-{limit}"
    )
    # "instance" needs every cached field (logits, visual tokens, h(x)): one cache serves all.
    writer_config = train_config(
        "instance",
        0,
        student=student_init,
        teacher=teacher,
        data=data,
        out=cache_dir / "unused-output",
        settings=settings,
        fixed_weights=None,
    )
    raw = writer_config.model_dump()
    raw["teacher"]["cache_dir"] = str(cache_dir)
    return cache_teacher(cfg.validate(raw), batch_size=64, progress=True)


def run_one(
    strategy, seed, *, student_init, teacher, data, out, settings, fixed, tests, cache_dir
) -> tuple[RunRecord, list[dict]]:
    run_dir = out / "runs" / f"{strategy}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own scratch from an earlier demo
    config = train_config(
        strategy,
        seed,
        student=student_init,
        teacher=teacher,
        data=data,
        out=run_dir,
        settings=settings,
        fixed_weights=fixed,
        cache_dir=cache_dir,
    )
    start = time.time()
    result = run_training(config)
    seconds = time.time() - start
    accuracy = evaluate(run_dir, tests, data.image_folder, settings.eval_batch_size)
    record = RunRecord(
        strategy=strategy,
        seed=seed,
        accuracy=accuracy,
        train_seconds=round(seconds, 1),
        beta_history=beta_history(result.log_history),
        weights=fixed or {},
    )
    if strategy == "instance" and cache_dir is not None:
        record.separation = final_instance_betas(
            result.trainer, cache_dir, data.train_student, settings.train_limit
        )
    return record, result.log_history


def run_demo(output_dir: str | Path = "betakd-demo", *, quick: bool = False, seeds=None) -> dict:
    """Run every strategy for every seed, then write results.json, report.md and plots."""
    from tqdm.auto import tqdm

    torch.set_num_threads(1)  # tiny models: one thread is as fast and leaves a core free
    started = time.time()
    config = demo_config(quick)
    settings = QUICK if quick else settings_from(config)
    if seeds:
        settings = replace(settings, seeds=tuple(seeds))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = prepare_data(config)
    teacher_start = time.time()
    teacher = ensure_teacher(config, progress=True)
    teacher_seconds = time.time() - teacher_start
    tests = test_samples(data.test, data.image_folder, settings.test_questions)
    teacher_accuracy = evaluate(teacher, tests, data.image_folder, settings.eval_batch_size)
    first_init = _student_init(config, out, settings.seeds[0])
    cache_dir = ensure_teacher_cache(config, teacher, first_init, data, settings)

    runs: list[RunRecord] = []
    jobs = [(seed, s) for seed in settings.seeds for s in settings.strategies]
    progress = tqdm(jobs, desc="betakd demo", unit="run")
    fixed: dict[int, dict] = {}
    for seed, strategy in progress:
        progress.set_postfix(strategy=strategy, seed=seed)
        student_init = _student_init(config, out, seed)
        if strategy == "fixed" and seed not in fixed:
            fixed[seed] = _fixed_from_probe(
                seed, student_init, teacher, data, out, settings, cache_dir
            )
        record, history = run_one(
            strategy,
            seed,
            student_init=student_init,
            teacher=teacher,
            data=data,
            out=out,
            settings=settings,
            fixed=fixed.get(seed) if strategy == "fixed" else None,
            tests=tests,
            cache_dir=cache_dir,
        )
        if strategy == "equal":
            fixed[seed] = initial_scale_weights(history)
        runs.append(record)
        logger.info("%s seed %d: %s", strategy, seed, record.accuracy)

    results = {
        "settings": asdict(settings),
        "quick": quick,
        "teacher": {
            "path": str(teacher),
            "accuracy": teacher_accuracy,
            "info": teacher_info(teacher),
            "seconds_this_run": round(teacher_seconds, 1),
        },
        "data": data.manifest,
        "runs": [asdict(r) for r in runs],
        "wall_seconds": round(time.time() - started, 1),
        "machine": report.machine_description(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write_report(results, out)
    return results


def _student_init(config: DemoConfig, out: Path, seed: int) -> Path:
    """The untrained student of a seed (every strategy starts from the same weights)."""
    path = out / "init" / f"student-seed{seed}"
    if not (path / "config.json").exists():
        save_student_init(config, seed, path)
    return path


def _fixed_from_probe(seed, student_init, teacher, data, out, settings, cache_dir) -> dict:
    """Initial loss scales from a two-step equal run, when `equal` is not part of the demo."""
    probe = replace(settings, steps=1, logging_steps=1)
    shutil.rmtree(out / "runs" / f"scale-probe-seed{seed}", ignore_errors=True)
    config = train_config(
        "equal",
        seed,
        student=student_init,
        teacher=teacher,
        data=data,
        out=out / "runs" / f"scale-probe-seed{seed}",
        settings=probe,
        fixed_weights=None,
        cache_dir=cache_dir,
    )
    return initial_scale_weights(run_training(config).log_history)
