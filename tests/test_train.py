"""End-to-end training through the public path: config -> BetaKDTrainer -> saved student."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from kd_configs import StopAfter, assert_same_final_state, kd_raw, losses_on_repeated_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, TrainerCallback

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.cli import main
from betakd.distill import HEAD_FILE
from betakd.runs import RESOLVED_CONFIG, OutputDirError, check_output_dir, run_training
from betakd.teachers import DenseLogits, TeacherTargets
from betakd.testing.tiny_models import FAMILIES

WEIGHTINGS = {
    "equal": {},
    "fixed": {"options": {"weights": {"cosine_probs": 2.0, "visual": 1.0}}},
    "task": {},
    "instance": {"representation": "teacher_visual"},
    "closed_form": {},
    "reference": {"options": {"level": "task"}},
}


def make_config(student, teacher, data, image_folder, out, weighting="task", **training):
    raw = kd_raw((student, teacher), data, image_folder, out, weighting, **training)
    raw["weighting"].update(WEIGHTINGS.get(weighting, {}))
    if image_folder is None and weighting == "fixed":
        raw["weighting"]["options"] = {"weights": {"cosine_probs": 2.0}}
    return cfg.validate(raw)


# Family and weighting are independent (a weighting sees per-sample energies and h(x)):
# every weighting on LLaVA, and every other family with the instance weighting, whose
# h(x) reads each family's visual tokens. Qwen2.5-VL shares Qwen2-VL's adapter; the
# text-only family has its own CLI test.
DIAGONAL = [("llava", w) for w in sorted(WEIGHTINGS)] + [
    (f, "instance") for f in FAMILIES if f not in ("llava", "qwen2_5_vl", "llama")
]


@pytest.mark.parametrize(("family", "weighting"), DIAGONAL)
def test_every_family_and_every_weighting_train(
    family, weighting, tiny_model_dir, vqa_data, tmp_path
):
    data, images = vqa_data
    student = tiny_model_dir(family, "student")
    teacher = tiny_model_dir(family, "teacher")
    config = make_config(student, teacher, data, images, tmp_path / "out", weighting)
    values, trainer = losses_on_repeated_batch(config)
    assert all(torch.isfinite(torch.tensor(values)))
    assert values[-1] < values[0], values
    metrics = trainer.metrics.means()
    assert "cosine_probs/beta_mean" in metrics and "visual/energy" in metrics


def test_text_only_distillation_runs_through_the_cli(tiny_model_dir, tmp_path):
    records = [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus one?"},
                {"from": "gpt", "value": str(i + 1)},
            ],
        }
        for i in range(8)
    ]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = make_config(
        tiny_model_dir("llama", "student"),
        tiny_model_dir("llama", "teacher"),
        data,
        None,
        tmp_path / "out",
        "instance",
    ).model_dump()
    config["weighting"]["representation"] = "teacher_confidence"
    path = tmp_path / "config.yaml"
    path.write_text(cfg.yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["train", str(path), "--set", "training.max_steps=2"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "llama"


def test_saved_student_reloads_offline_and_head_is_separate(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    config = make_config(*llava_pair, data, images, tmp_path / "out", "instance")
    result = run_training(config)
    out = result.output_dir
    student = AutoModelForImageTextToText.from_pretrained(out)
    assert student.config.model_type == "llava"
    saved = load_file(out / "model.safetensors")
    assert not any(k.startswith(("objective.", "features.", "head.")) for k in saved)
    head = load_file(out / HEAD_FILE)
    assert any(k.startswith("objective.weighting.net") for k in head)
    assert any(k.startswith("features.visual.adapter") for k in head)
    assert (out / "betakd_config.yaml").is_file()
    logged = [h for h in result.log_history if "cosine_probs/beta_mean" in h]
    assert logged, result.log_history


def straight_and_interrupted(llava_pair, vqa_data, tmp_path):
    """A 5-step run to the end in ``a``; the same run killed after step 3 in ``b``
    (checkpoints every 2 steps). Returns b's config."""
    data, images = vqa_data
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 5}
    straight = make_config(*llava_pair, data, images, tmp_path / "a", "instance", **extra)
    run_training(straight)
    broken = make_config(*llava_pair, data, images, tmp_path / "b", "instance", **extra)
    with pytest.raises(KeyboardInterrupt):
        run_training(broken, callbacks=[StopAfter(3)])
    return broken


def test_resume_matches_an_uninterrupted_run(llava_pair, vqa_data, tmp_path):
    broken = straight_and_interrupted(llava_pair, vqa_data, tmp_path)
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    with pytest.raises(OutputDirError, match="--resume"):
        run_training(broken)
    run_training(broken, resume=True)

    assert_same_final_state(tmp_path / "a", tmp_path / "b")


def test_resume_accepts_run_length_and_logging_changes_and_names_other_keys(
    llava_pair, vqa_data, tmp_path
):
    data, images = vqa_data
    out = tmp_path / "run"
    first = make_config(*llava_pair, data, images, out, "instance", max_steps=5)
    out.mkdir()
    cfg.dump(first, out / RESOLVED_CONFIG)
    longer = first.model_dump()
    longer["training"].update(max_steps=9, logging_steps=3, report_to="none", save_steps=4)
    check_output_dir(out, cfg.validate(longer), resume=True)  # accepted
    for key, change in [
        ("weighting.name", lambda raw: raw["weighting"].update(name="task")),
        ("training.learning_rate", lambda raw: raw["training"].update(learning_rate=0.5)),
        ("student.path", lambda raw: raw["student"].update(path=str(llava_pair[1]))),
    ]:
        raw = first.model_dump()
        change(raw)
        raw["training"].update(max_steps=9)
        with pytest.raises(OutputDirError, match="--resume") as refused:
            check_output_dir(out, cfg.validate(raw), resume=True)
        message = str(refused.value)
        assert key in message and "training.max_steps changed" not in message, message


def logged_learning_rates(history) -> dict[int, float]:
    return {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}


@pytest.mark.parametrize("restart", [False, True])
def test_a_resumed_run_can_train_longer(llava_pair, vqa_data, tmp_path, caplog, restart):
    """Extending a finished 4-step linear schedule to 8 steps: by default the rest follows
    the schedule planned for 8 steps (said in a warning); with schedule.restart_at the
    schedule runs afresh over the added steps, from the first one on."""
    data, images = vqa_data
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4, "logging_steps": 1}
    first = make_config(*llava_pair, data, images, tmp_path / "r", "instance", **extra)
    peak = first.training["learning_rate"]
    before = logged_learning_rates(run_training(first).log_history)
    # The logged rate at step t is the one step t used: peak * (1 - (t - 1) / 4).
    assert before == pytest.approx({t: peak * (1 - (t - 1) / 4) for t in range(1, 5)})
    longer = first.model_dump()
    longer["training"]["max_steps"] = 8
    if restart:
        longer["schedule"] = {"restart_at": 4}
    caplog.set_level(logging.INFO, logger="betakd.runs")
    seen = []
    result = run_training(cfg.validate(longer), resume=True, callbacks=[RateAtEachStep(seen)])
    assert result.trainer.state.global_step == 8
    after = {t: r for t, r in logged_learning_rates(result.log_history).items() if t > 4}
    if restart:
        # Steps 5..8 use peak * (1 - k / 4) for k = 0..3: a new decay over the added steps.
        assert seen == pytest.approx([peak * (1 - k / 4) for k in range(4)])
        assert after == pytest.approx({t: peak * (1 - (t - 5) / 4) for t in range(5, 9)})
        assert "restarts after step 4" in caplog.text
    else:
        assert after == pytest.approx({t: peak * (1 - (t - 1) / 8) for t in range(5, 9)})
        assert "planned for 4 steps, now 8" in caplog.text
        assert "--set schedule.restart_at=4" in caplog.text


class RateAtEachStep(TrainerCallback):
    """The learning rate each optimizer step of this run uses."""

    def __init__(self, seen: list[float]) -> None:
        self.seen = seen

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append(optimizer.param_groups[0]["lr"])


def test_a_copied_run_folder_resumes_where_it_now_is(llava_pair, vqa_data, tmp_path):
    straight_and_interrupted(llava_pair, vqa_data, tmp_path)
    shutil.copytree(tmp_path / "b", tmp_path / "moved")
    shutil.rmtree(tmp_path / "b")
    # The copy's own config still names the old folder; the command line says where it is.
    result = CliRunner().invoke(
        main,
        ["train", str(tmp_path / "moved" / RESOLVED_CONFIG), "--resume",
         "--set", f"training.output_dir={tmp_path / 'moved'}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "b").exists()
    assert_same_final_state(tmp_path / "a", tmp_path / "moved")


def test_second_stage_starts_from_first_stage_betas(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    first = run_training(make_config(*llava_pair, data, images, tmp_path / "s1", "task"))
    raw = make_config(*llava_pair, data, images, tmp_path / "s2", "task").model_dump()
    raw["weighting"]["init_from"] = str(first.output_dir)
    trainer = build_trainer(cfg.validate(raw), training_arguments(cfg.validate(raw)))
    stage_one = load_file(first.output_dir / HEAD_FILE)["objective.weighting.raw"]
    torch.testing.assert_close(trainer.model.head.objective.weighting.raw.detach(), stage_one)
    assert not torch.equal(stage_one, torch.zeros_like(stage_one))


def test_skipped_samples_are_counted_and_reported(llava_pair, tmp_path, vqa_data):
    data, images = vqa_data
    records = json.loads(Path(data).read_text())
    (images / "corrupt.png").write_bytes(b"not a png")
    long_question = " ".join(["word"] * 400)
    records += [
        {**records[0], "id": "missing", "image": "nope.png"},
        {**records[0], "id": "corrupt", "image": "corrupt.png"},
        {
            **records[0],
            "id": "long",
            "conversations": [
                {"from": "human", "value": "<image>\n" + long_question},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records))
    raw = make_config(*llava_pair, mixed, images, tmp_path / "out", "task").model_dump()
    raw["data"].update(max_length=160, max_skip_fraction=0.5)
    result = run_training(cfg.validate(raw))
    counts = {reason: n for reason, n in result.skips.counts().items() if n}
    assert counts == {"missing_image": 1, "corrupt_image": 1, "too_long": 1}, counts

    raw["data"]["max_skip_fraction"] = 0.1
    raw["training"]["output_dir"] = str(tmp_path / "out2")
    with pytest.raises(ValueError, match="skipped 3 of 9"):
        run_training(cfg.validate(raw))


def test_missing_model_path_and_used_output_dir(tmp_path, vqa_data, llava_pair):
    data, images = vqa_data
    config = make_config(tmp_path / "nope", llava_pair[1], data, images, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="student.path: no model directory"):
        run_training(config)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("someone else's run")
    config = make_config(*llava_pair, data, images, tmp_path / "busy")
    with pytest.raises(OutputDirError, match="not empty"):
        run_training(config)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_chunked_channels_match_the_dense_path(family, tiny_model_dir, vqa_data, tmp_path):
    """channels.chunk_size gives the dense loss and gradients without [N, V] logits."""
    data, images = vqa_data
    pair = tiny_model_dir(family, "student"), tiny_model_dir(family, "teacher")
    results = []
    for chunk_size in (None, 3):
        raw = make_config(*pair, data, images, tmp_path / f"c{chunk_size}", "instance").model_dump()
        raw["channels"]["logits"].append({"energy": "fkl", "options": {"temperature": 2.0}})
        raw["channels"]["chunk_size"] = chunk_size
        config = cfg.validate(raw)
        trainer = build_trainer(config, training_arguments(config))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=4)
        loss.backward()
        grads = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        results.append((loss.detach(), grads))
    (dense_loss, dense_grads), (chunk_loss, chunk_grads) = results
    torch.testing.assert_close(chunk_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert dense_grads.keys() == chunk_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_student_trains_and_is_saved_merged(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    raw = make_config(*llava_pair, data, images, tmp_path / "out", "instance").model_dump()
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config = cfg.validate(raw)
    trainer = build_trainer(config, training_arguments(config))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all(n.startswith("head.") or "lora_" in n for n in trainable), trainable
    assert any(n.startswith("head.objective.weighting.net") for n in trainable)
    result = run_training(config)
    saved = load_file(result.output_dir / "model.safetensors")
    assert not any("lora" in k for k in saved)
    student = AutoModelForImageTextToText.from_pretrained(result.output_dir)
    assert student.config.model_type == "llava"


def test_group_metrics_and_energy_scale_calibration(llava_pair, vqa_data, tmp_path):
    """Per-group metrics average to the batch metric; the calibrated energy scale is the
    mean energy of the first training samples, whatever the batch size."""
    data, images = vqa_data
    options = {"prior_rate_scale": 0.5, "trust": {"reference": "data"}}
    scales = []
    for batch in (2, 3):
        config = make_config(
            *llava_pair, data, images, tmp_path / f"b{batch}", "closed_form",
            per_device_train_batch_size=batch, max_steps=1, logging_steps=1,
        )  # fmt: skip
        config = cfg.validate(
            {**config.model_dump(), "weighting": {"name": "closed_form", "options": options}}
        )
        groups = {"s0": "even", "s2": "even", "s4": "even", "s1": "odd", "s3": "odd", "s5": "odd"}
        trainer = build_trainer(config, training_arguments(config), sample_groups=groups)
        scales.append(trainer.calibration.calibrate_energy_scale())
    torch.testing.assert_close(scales[0], scales[1], rtol=1e-5, atol=1e-7)
    # Direct: every sample's channel energies (weights do not matter for the scale).
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        out = trainer.model(*trainer.loss_inputs(trainer.data_collator(rows)))
    torch.testing.assert_close(scales[0], out.energies[:, 1:].mean(0), rtol=1e-5, atol=1e-7)

    # One batch of all six samples, three per group: the mean of group means is the mean.
    whole = cfg.validate(
        {**config.model_dump(), "training": {**config.training, "per_device_train_batch_size": 6}}
    )
    result = run_training(whole, sample_groups=groups)
    logged = next(h for h in result.log_history if "cosine_probs/energy" in h)
    even, odd = (logged[f"group/{g}/cosine_probs/energy"] for g in ("even", "odd"))
    assert logged["cosine_probs/energy"] == pytest.approx((even + odd) / 2, rel=1e-4)
    assert {"group/even/visual/beta_mean", "group/odd/ce/weighted"} <= set(logged)


class AveragedTeachers:
    """A kind of teacher source the trainer does not know: the mean log-probabilities of
    several sources (here, one online teacher twice), through the protocol only."""

    def __init__(self, sources, vocab_rows):
        self.sources = list(sources)
        self.vocab_rows = vocab_rows

    def prepare(self, accelerator):
        self.sources = [source.prepare(accelerator) for source in self.sources]
        return self

    def __call__(self, student_batch, meta):
        results = [source(student_batch, meta) for source in self.sources]
        aligned, first = results[0]
        log_probs = [
            torch.log_softmax(t.tokens.logits(0, len(aligned), self.vocab_rows).float(), -1)
            for _, t in results
        ]
        mean = torch.stack(log_probs).mean(0)
        return aligned, TeacherTargets(DenseLogits(mean), first.visual, first.representation)


def test_a_new_teacher_source_needs_no_change_to_the_trainer(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    config = make_config(*llava_pair, data, images, tmp_path / "out", "instance")
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    single = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=4)
    trainer.teacher = AveragedTeachers([trainer.teacher] * 2, trainer.model.vocab_rows)
    averaged = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=4)
    # The mean of identical log-probabilities is the teacher's own distribution.
    torch.testing.assert_close(averaged, single, rtol=1e-6, atol=1e-6)


def one_line_error(config_path: Path) -> str:
    """`betakd train` fails with exit code 1 and a single `Error:` line, no traceback."""
    result = CliRunner().invoke(main, ["train", str(config_path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


def test_models_betakd_cannot_use_are_named_in_one_line(
    llava_pair, vqa_data, tmp_path, monkeypatch
):
    import shutil

    from betakd import models

    data, images = vqa_data
    plain = tmp_path / "no-template"
    shutil.copytree(llava_pair[0], plain)
    (plain / "chat_template.jinja").unlink()
    path = tmp_path / "c.yaml"
    path.write_text(
        cfg.yaml.safe_dump(kd_raw((plain, llava_pair[1]), data, images, tmp_path / "o"))
    )
    line = one_line_error(path)
    assert "student.path" in line and "no chat template" in line, line

    # A family whose image tokens betakd does not know (here: LLaVA, made unknown).
    monkeypatch.delitem(models._SPECS, "llava")
    path.write_text(cfg.yaml.safe_dump(kd_raw(llava_pair, data, images, tmp_path / "o2")))
    line = one_line_error(path)
    assert "student.path" in line and "'llava' is not supported" in line, line


def test_an_annealed_feature_channel_falls_to_zero_weight(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    raw = kd_raw(llava_pair, data, images, tmp_path / "out", "fixed",
                 {"weights": {"cosine_probs": 1.0, "visual": 2.0}}, max_steps=6)  # fmt: skip
    raw["channels"]["features"][0]["anneal_steps"] = 4
    result = run_training(cfg.validate(raw))
    betas = [h["visual/beta_mean"] for h in result.log_history if "visual/beta_mean" in h]
    # Steps 0..5: 2 * max(0, 1 - step / 4); the logit channel keeps its weight.
    assert betas == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])
    logit = [
        h["cosine_probs/beta_mean"] for h in result.log_history if "cosine_probs/beta_mean" in h
    ]
    assert logit == pytest.approx([1.0] * 6)


def test_the_start_reports_teacher_weights_and_warns_when_the_trust_turns_them_off(
    llava_pair, vqa_data, tmp_path, caplog
):
    """A random tiny teacher is far from the data's answers: a data trust with a low
    threshold leaves it almost no weight. The run says so before the first step, and the
    logs show the learned beta, the trust and a regulariser computed on the learned beta."""
    data, images = vqa_data
    raw = kd_raw(llava_pair, data, images, tmp_path / "out", "task", max_steps=2, logging_steps=1)
    raw["weighting"]["options"] = {"trust": {"reference": "data", "threshold": 1.0}}
    config = cfg.validate(raw)
    caplog.set_level(logging.INFO, logger="betakd.calibration")
    trainer = build_trainer(config, training_arguments(config))
    trainer.train()

    starts = [r.getMessage() for r in caplog.records if "teacher weights at the start" in r.getMessage()]  # fmt: skip
    assert len(starts) == 1 and "teacher_nll_median" in starts[0]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "the data trust leaves 100% of the first samples" in warning
    assert "on 'cosine_probs', 'visual'" in warning  # one teacher, one warning
    assert "raise weighting.options.trust.threshold" in warning

    # Direct: the trust's factor of each sample's teacher NLL, from a full batch.
    report = trainer.calibration.report_teacher_weights()
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        nll, _ = trainer.distillation_module.reliability_inputs(
            *trainer.loss_inputs(trainer.data_collator(rows))
        )
    factor = torch.sigmoid(1.0 - nll)  # the mixture trust: 1 / (1 + exp(x - threshold))
    for values in report.values():
        assert values["teacher_nll_median"] == pytest.approx(float(torch.quantile(nll, 0.5)), rel=1e-4)  # fmt: skip
        assert values["factor_p90"] == pytest.approx(float(torch.quantile(factor, 0.9)), rel=1e-4)
        assert values["share_below_0.1"] == pytest.approx(float((factor < 0.1).float().mean()))

    logged = [h for h in trainer.state.log_history if "cosine_probs/beta_learned_mean" in h]
    assert logged
    weighting = trainer.head.objective.weighting
    for h in logged:
        for k, channel in enumerate(weighting.weighted_channels):
            if channel == "ce":
                continue
            learned, trust = h[f"{channel}/beta_learned_mean"], h[f"{channel}/trust_mean"]
            # A task weighting: one learned beta per channel, so the effective mean factors.
            assert h[f"{channel}/beta_mean"] == pytest.approx(learned * trust, rel=1e-4)
            assert trust < 0.1
            # -(d/2) log beta on the learned beta (no hyperprior here).
            expected = -float(weighting.concentration[k]) * math.log(learned)
            assert h[f"{channel}/regulariser"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
