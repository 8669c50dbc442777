"""On-policy and mixed distillation through the trainer: which rows the student answers,
how the teacher scores them, and the training loop's invariants with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kd_configs import StopAfter, assert_same_final_state, kd_raw, losses_on_repeated_batch

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.labels import supervised
from betakd.models import forward_inputs
from betakd.onpolicy import GeneratedRows, PolicyMix, answered_batch, prompt_tokens, prompts
from betakd.runs import run_training
from betakd.testing.tiny_models import FAMILIES


def policy_config(pair, data, images, out, policy, weighting="task", options=None, **training):
    raw = kd_raw(pair, data, images, out, weighting, options, **training)
    raw["policy"] = policy
    return cfg.validate(raw)


def loss_trajectory(result):
    return [h["loss"] for h in result.log_history if "loss" in h]


def sides(trainer):
    collator = trainer.data_collator
    return (
        (collator.student.adapter, collator.student.pad_token_id),
        {name: (e.adapter, e.pad_token_id) for name, e in collator.teachers.items()},
    )


def data_answers(batch) -> list[torch.Tensor]:
    """Each row's data answer (its supervised tokens, end of turn included)."""
    return [
        batch["input_ids"][row][supervised(batch["labels"][row])]
        for row in range(batch["input_ids"].shape[0])
    ]


def generated_rows_of(trainer, batch, rows, answers) -> GeneratedRows:
    """``answers`` of ``rows`` written into their own collated batch, as the trainer
    builds it."""
    index = batch["sample_index"][rows].tolist()
    sub = trainer.data_collator(trainer.train_dataset.by_index(index))
    answered = answered_batch(sub, answers, *sides(trainer))
    return GeneratedRows(torch.tensor(rows), *trainer.loss_inputs(answered))


# ------------------------------------------------------------------ the choice of rows


def test_policy_mix_draws_from_seed_step_and_samples_only():
    mix = PolicyMix("mixed", 0.3, per="sample", seed=7)
    index = torch.arange(8)
    together = mix.chosen(5, index)
    assert torch.equal(torch.cat([mix.chosen(5, index[:3]), mix.chosen(5, index[3:])]), together)
    assert torch.equal(mix.chosen(5, index.flip(0)), together.flip(0))
    draws = torch.stack([mix.chosen(step, index) for step in range(500)]).float()
    assert abs(float(draws.mean()) - 0.3) < 0.03
    per_batch = torch.stack([PolicyMix("mixed", 0.3, seed=7).chosen(s, index) for s in range(500)])
    assert bool((per_batch.all(1) | ~per_batch.any(1)).all())  # all rows or none
    assert abs(float(per_batch[:, 0].float().mean()) - 0.3) < 0.06
    assert not PolicyMix("off_policy").chosen(0, index).any()
    assert PolicyMix("on_policy").chosen(0, index).all()
    late = PolicyMix("on_policy", start_step=4)
    assert not late.chosen(3, index).any() and late.chosen(4, index).all()
    assert mix.generation_seed(3, index) == mix.generation_seed(3, index.clone())
    assert mix.generation_seed(3, index) != mix.generation_seed(4, index)


def test_config_refuses_a_cached_teacher(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    raw = kd_raw(llava_pair, data, images, tmp_path / "out")
    raw["teacher"] = {"source": "cache", "cache_dir": str(tmp_path / "cache")}
    raw["policy"] = {"mode": "mixed"}
    with pytest.raises(cfg.ConfigError, match="offline cache of the data's answers"):
        cfg.validate(raw)


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize(
    "weighting,options",
    [("task", {}), ("instance", {"hidden": 8}), ("closed_form", {"per": "sample"})],
)
def test_student_rows_answered_as_the_data_give_the_off_policy_loss_and_gradients(
    weighting, options, chunk_size, llava_pair, vqa_data, tmp_path
):
    """The two-pass merge (data pass for CE and the other rows, student-answer pass for
    the chosen rows) is exact: answers equal to the data's reproduce the one-pass loss
    and gradients, for dense and chunked channels, affine and non-affine weightings."""
    data, images = vqa_data
    policy = {"mode": "mixed", "student_fraction": 0.5, "per": "sample"}
    config = policy_config(llava_pair, data, images, tmp_path / "o", policy, weighting, options)
    config.channels.chunk_size = chunk_size
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator(list(trainer.train_dataset)[:4])
    num_items = trainer.num_items([batch], torch.device("cpu"))
    rows = [0, 2]
    generated = generated_rows_of(trainer, batch, rows, [data_answers(batch)[r] for r in rows])
    results = []
    for part in (None, generated):
        trainer.model.zero_grad()
        out = trainer.model(*trainer.loss_inputs(batch), num_items, generated=part)
        out.loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((out.loss.detach(), out.energies, grads))
    (loss_a, energies_a, grads_a), (loss_b, energies_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(energies_b, energies_a, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def by_hand(model, adapter, batch, row, answer, vocab):
    """The logits predicting ``answer`` after row ``row``'s prompt, the row alone (no
    padding), straight from the model."""
    prompt = prompt_tokens(batch)[row]
    ids = torch.cat([prompt, answer])[None]
    one = {k: v[row : row + 1] for k, v in forward_inputs(batch, adapter).items()}
    one.update(input_ids=ids, attention_mask=torch.ones_like(ids), **adapter.extra_inputs(ids))
    with torch.no_grad():
        logits = model(**one).logits[0, :, :vocab]
    return logits[prompt.numel() - 1 : prompt.numel() - 1 + answer.numel()]


@pytest.mark.parametrize("ce", ["data", "none"])
def test_energies_on_student_answers_match_scoring_them_by_hand(ce, llava_pair, vqa_data, tmp_path):
    """Energies cover each answer token (end of turn included) and nothing else: equal to
    student and teacher run by hand on prompt + answer, each row alone, without padding
    (the teacher with its own 64 image tokens, the student with 16). CE stays the data
    answer's (or 0 with ce: none)."""
    data, images = vqa_data
    config = policy_config(
        llava_pair, data, images, tmp_path / "o", {"mode": "on_policy", "ce": ce}, "equal"
    )
    trainer = build_trainer(config, training_arguments(config))
    module = trainer.model
    batch = trainer.data_collator(list(trainer.train_dataset)[:3])
    end = data_answers(batch)[0][-1:]
    answers = [torch.tensor([11, 12, 13, 14]), torch.cat([torch.tensor([15]), end]), end]
    generated = generated_rows_of(trainer, batch, [0, 1, 2], answers)
    assert generated.aligned.token_ids.tolist() == torch.cat(answers).tolist()
    num_items = trainer.num_items([batch], torch.device("cpu"))
    with torch.no_grad():
        out = module(*trainer.loss_inputs(batch), num_items, generated=generated)
        off = module(*trainer.loss_inputs(batch), num_items)
    teacher = trainer.teacher.model
    for row, answer in enumerate(answers):
        s = by_hand(module.student, module.adapter, batch, row, answer, module.vocab_rows)
        t = by_hand(
            teacher, trainer.teacher.adapter, batch["teacher"][None], row, answer, s.shape[1]
        )
        p_s, p_t = s.softmax(-1), t.softmax(-1)
        expected = (1 - F.cosine_similarity(p_s, p_t, dim=-1)).mean()
        torch.testing.assert_close(out.energies[row, 1], expected, rtol=1e-4, atol=1e-6)
    expected_ce = off.energies[:, 0] if ce == "data" else torch.zeros(3)
    torch.testing.assert_close(out.energies[:, 0], expected_ce)


def test_the_trainer_generates_as_generate_does_with_the_step_seed(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    policy = {"mode": "on_policy", "generation": {"max_new_tokens": 6, "temperature": 1.0}}
    config = policy_config(llava_pair, data, images, tmp_path / "o", policy)
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator(list(trainer.train_dataset)[:4])
    trainer.state.global_step = 3
    generated = trainer.generated_rows(dict(batch))

    student = trainer.model.student
    pad = trainer.data_collator.student.pad_token_id
    inputs = prompts(batch, trainer.model.adapter, pad)
    torch.manual_seed(trainer.student_answers.policy.generation_seed(3, batch["sample_index"]))
    student.eval()
    with torch.no_grad():
        out = student.generate(
            **inputs, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=pad,
            eos_token_id=sorted(trainer.student_answers.stop_ids),
        )  # fmt: skip
    new = out[:, inputs["input_ids"].shape[1] :]
    labels = supervised(generated.batch["labels"])
    for row in range(4):
        expected = new[row].tolist()
        stop = [i for i, t in enumerate(expected) if t in trainer.student_answers.stop_ids]
        expected = expected[: stop[0] + 1] if stop else expected
        assert generated.batch["input_ids"][row][labels[row]].tolist() == expected


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_and_trains_on_its_own_answers(
    family, tiny_model_dir, vqa_data, tmp_path, llava_files
):
    data, images = vqa_data
    if family == "llama":  # text-only: questions without images
        questions = [("Colour?", "red"), ("Is it red? Say yes or no.", "no")] * 2
        records = [llava_files.record(f"t{i}", q, a, None) for i, (q, a) in enumerate(questions)]
        data, images = llava_files.write_records(tmp_path / "text.json", records), None
    pair = (tiny_model_dir(family, "student"), tiny_model_dir(family, "teacher"))
    policy = {"mode": "on_policy", "generation": {"max_new_tokens": 4}}
    raw = kd_raw(pair, data, images, tmp_path / "o", "task")
    raw["policy"] = policy
    values, trainer = losses_on_repeated_batch(cfg.validate(raw), steps=4)
    assert all(torch.isfinite(torch.tensor(values)))
    logs = trainer.metrics.means()
    assert logs["on_policy/share"] == 1.0
    assert 1 <= logs["on_policy/mean_generated_tokens"] <= 4
    assert logs["policy/on_policy/cosine_probs/energy"] > 0
    # CE stays on the data's answers, so it falls on a repeated batch.
    assert values[-1] < values[0], values


@pytest.mark.parametrize(
    "policy",
    [{"mode": "on_policy"}, {"mode": "mixed", "student_fraction": 0.5, "per": "sample"}],
    ids=["on_policy", "mixed_per_sample"],
)
def test_accumulation_equals_one_large_batch_with_student_answers(
    policy, llava_pair, sixteen_samples, tmp_path
):
    """Greedy answers (the same for a sample in any batch) make on-policy steps
    comparable: 8 x 1 == 4 x 2 == 2 x 4 per optimizer step."""
    policy = {**policy, "generation": {"max_new_tokens": 4, "temperature": 0.0}}
    trajectories, heads = [], []
    for batch, accumulation in [(8, 1), (4, 2), (2, 4)]:
        config = policy_config(
            llava_pair, *sixteen_samples, tmp_path / f"b{batch}", policy, "instance",
            {"hidden": 8}, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2,
        )  # fmt: skip
        result = run_training(config)
        trajectories.append(loss_trajectory(result))
        heads.append({k: v.clone() for k, v in result.trainer.head.state_dict().items()})
        shares = [h["on_policy/share"] for h in result.log_history if "on_policy/share" in h]
        assert shares and all(0 < s for s in shares[:1]), shares
    for other in trajectories[1:]:
        assert other == pytest.approx(trajectories[0], abs=1e-5)
    for other in heads[1:]:
        for key, value in heads[0].items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=1e-5)


def test_student_fraction_zero_trains_exactly_as_off_policy(llava_pair, vqa_data, tmp_path):
    data, images = vqa_data
    runs = []
    for name, policy in [("off", {}), ("zero", {"mode": "mixed", "student_fraction": 0.0})]:
        config = policy_config(llava_pair, data, images, tmp_path / name, policy, "instance")
        runs.append(run_training(config))
    assert loss_trajectory(runs[1]) == loss_trajectory(runs[0])
    assert not runs[1].trainer.teacher.reuse_images  # nothing kept between batches
    assert_same_final_state(tmp_path / "off", tmp_path / "zero", atol=0)


def test_resuming_a_mixed_run_equals_the_uninterrupted_run(llava_pair, vqa_data, tmp_path):
    """Sampled answers (temperature 1) and the per-batch choice are seeded per step, so a
    run resumed from step 2 draws what the uninterrupted run drew."""
    data, images = vqa_data
    policy = {"mode": "mixed", "student_fraction": 0.5, "generation": {"max_new_tokens": 5}}
    extra = {"save_strategy": "steps", "save_steps": 2, "max_steps": 6}
    straight = policy_config(llava_pair, data, images, tmp_path / "a", policy, **extra)
    shares = [h["on_policy/share"] for h in run_training(straight).log_history if "loss" in h]
    assert 0 < sum(shares) < len(shares), shares  # both kinds of step happen
    broken = policy_config(llava_pair, data, images, tmp_path / "b", policy, **extra)
    with pytest.raises(KeyboardInterrupt):
        run_training(broken, callbacks=[StopAfter(3)])
    run_training(broken, resume=True)
    assert_same_final_state(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_without_ce_on_student_rows_the_data_pass_is_skipped_and_changes_nothing(
    chunk_size, llava_pair, vqa_data, tmp_path
):
    """ce: none with every row the student's and no data trust: one student and one
    teacher pass give the loss and gradients of the two-pass step."""
    data, images = vqa_data
    policy = {"mode": "on_policy", "ce": "none"}
    config = policy_config(llava_pair, data, images, tmp_path / "o", policy, "instance",
                           {"hidden": 8})  # fmt: skip
    config.channels.chunk_size = chunk_size
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator(list(trainer.train_dataset)[:4])
    answers = [torch.tensor([11 + row, 12, 13][: 1 + row % 3]) for row in range(4)]
    generated = generated_rows_of(trainer, batch, [0, 1, 2, 3], answers)
    assert not trainer.student_answers.needs_data(generated, 4)
    num_items = trainer.num_items([batch], torch.device("cpu"))
    results = []
    for data_part in (trainer.loss_inputs(batch), (None,) * 4):
        trainer.model.zero_grad()
        out = trainer.model(*data_part, num_items, generated=generated)
        out.loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((out.loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # Decided when the run is built, from the module: with the CE on student rows the
    # data pass is needed.
    trainer.model.generated_ce = "data"
    assert trainer.model.student_rows_need_data
    trainer.model.generated_ce = "none"
    assert not trainer.model.student_rows_need_data
    assert trainer.student_answers.needs_data(
        generated_rows_of(trainer, batch, [0, 1], answers[:2]), 4
    )


def vision_tower(student):
    names = ("vision_tower", "visual", "vision_model")
    return next(m for n, m in student.named_modules() if n.split(".")[-1] in names)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_the_answer_pass_reuses_the_data_pass_image_encoding(
    family, tiny_model_dir, vqa_data, tmp_path
):
    """Every row the student's: the answer pass reads the data pass's image encoding
    (transformers' mm_encoder_outputs) instead of running the vision tower again, and
    the teacher encodes the images once for both of its passes, with the same loss and
    gradients as encoding them twice."""
    data, images = vqa_data
    pair = (tiny_model_dir(family, "student"), tiny_model_dir(family, "teacher"))
    config = policy_config(pair, data, images, tmp_path / "o", {"mode": "on_policy"}, "task")
    trainer = build_trainer(config, training_arguments(config))
    batch = trainer.data_collator(list(trainer.train_dataset)[:4])
    answers = [torch.tensor([11 + row, 12, 13][: 1 + row % 3]) for row in range(4)]
    answered = answered_batch(batch, answers, *sides(trainer))
    # The same pixels in other tensors: each pass encodes them again.
    own = answered["teacher"][None]
    teacher = {None: dict(own, pixel_values=own["pixel_values"].clone())}
    twice = dict(answered, pixel_values=answered["pixel_values"].clone(), teacher=teacher)
    num_items = trainer.num_items([batch], torch.device("cpu"))
    calls, teacher_calls = [], []
    vision_tower(trainer.model.student).register_forward_hook(lambda *_: calls.append(1))
    vision_tower(trainer.teacher.model).register_forward_hook(lambda *_: teacher_calls.append(1))
    results = []
    for other in (answered, twice):
        calls.clear()
        teacher_calls.clear()
        generated = GeneratedRows(torch.arange(4), *trainer.loss_inputs(other))
        data_part = trainer.loss_inputs(batch)
        trainer.model.zero_grad()
        out = trainer.model(*data_part, num_items, generated=generated)
        out.loss.backward()
        grads = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        results.append((out.loss.detach(), grads, (len(calls), len(teacher_calls))))
    (loss_once, grads_once, calls_once), (loss_twice, grads_twice, calls_twice) = results
    assert calls_once[0] < calls_twice[0] and calls_once[1] < calls_twice[1], (
        calls_once,
        calls_twice,
    )
    torch.testing.assert_close(loss_once, loss_twice, rtol=1e-6, atol=1e-7)
    assert grads_once.keys() == grads_twice.keys()
    assert any("vision" in n or "visual" in n for n in grads_once)
    for name, value in grads_twice.items():
        torch.testing.assert_close(grads_once[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting", ["lora", "gradient_checkpointing"])
def test_a_lora_or_checkpointed_student_generates_and_trains(
    setting, llava_pair, vqa_data, tmp_path
):
    data, images = vqa_data
    extra = {"gradient_checkpointing": True} if setting == "gradient_checkpointing" else {}
    raw = kd_raw(llava_pair, data, images, tmp_path / "o", "task", **extra)
    if setting == "lora":
        raw["student"]["lora"] = {"r": 4}
    raw["policy"] = {"mode": "on_policy", "generation": {"max_new_tokens": 4}}
    logged = [h for h in run_training(cfg.validate(raw)).log_history if "loss" in h]
    assert [h["on_policy/share"] for h in logged] == [1.0] * 4
    assert logged[-1]["loss"] < logged[0]["loss"]
