"""The on-policy sampling step: student answers for a batch's prompts, written into the
student's and a teacher's batch (with their own image tokens)."""

from __future__ import annotations

import pytest
import torch

from betakd.align import align_positions
from betakd.data import KDCollator, SampleEncoder, build_dataset
from betakd.labels import IGNORE_INDEX
from betakd.models import forward_inputs, load
from betakd.onpolicy import GenerationSettings, prompt_tokens, sample_answers, with_answers
from betakd.testing.tiny_models import FAMILIES


@pytest.fixture
def kd_batch(llava_pair, vqa_data):
    """Student (16 image tokens, right padded) and teacher (64, left padded) batches."""
    student, teacher = (load(p) for p in llava_pair)
    encoders = [SampleEncoder(m.processor, m.adapter) for m in (student, teacher)]
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, encoders)
    batch = KDCollator(encoders[0], {None: encoders[1]}, teacher_padding_side="left")(list(dataset))
    return batch, student, teacher, encoders


def generate_alone(model, adapter, one, settings, pad, eos):
    """The answer of a one-row batch ``one`` from model.generate on its prompt, unpadded."""
    (prompt,) = prompt_tokens(one)
    inputs = forward_inputs(one, adapter)
    inputs.update(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None])
    inputs.update(adapter.extra_inputs(prompt[None]))
    out = model.generate(
        **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad, eos_token_id=eos,
    )  # fmt: skip
    new = out[0, prompt.numel() :]
    stop = (new == eos).nonzero()
    return new[: int(stop[0]) + 1] if len(stop) else new


def batched_and_alone(loaded, encoder, conversations, settings):
    """Greedy answers of the padded batch, and of each sample collated alone."""
    collate = KDCollator(encoder)
    pad, eos = encoder.pad_token_id, encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    options = {"pad_token_id": pad, "eos_token_id": eos, "seed": 0}
    batch = collate(conversations)
    answers = sample_answers(loaded.model, loaded.adapter, batch, settings, **options)
    alone = [
        generate_alone(loaded.model, loaded.adapter, collate([c]), settings, pad, eos)
        for c in conversations
    ]
    return [a.tolist() for a in answers], [a.tolist() for a in alone]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_a_padded_batch_as_each_prompt_alone(
    family, tiny_model_dir, vqa_data, tmp_path, llava_files
):
    """Greedy sampling of a batch (left-padded prompts, images included) gives each row
    what generate gives its prompt alone; the end of turn stops an answer."""
    loaded = load(tiny_model_dir(family))
    encoder = SampleEncoder(loaded.processor, loaded.adapter)
    data_file, images = vqa_data
    if family == "llama":  # text-only: the same questions without images
        records = [
            llava_files.record(f"t{i}", q, a, None)
            for i, (q, a) in enumerate([("Colour?", "red"), ("Is it red? Say yes or no.", "no")])
        ]
        data_file, images = llava_files.write_records(tmp_path / "text.json", records), None
    conversations = list(build_dataset(data_file, images, [encoder]))
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0)
    answers, alone = batched_and_alone(loaded, encoder, conversations, settings)
    assert answers == alone, family
    assert all(0 < len(a) <= 4 for a in answers)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(kd_batch):
    batch, student, _, encoders = kd_batch
    settings = GenerationSettings(max_new_tokens=6, temperature=1.5, top_p=0.95)
    options = {"pad_token_id": encoders[0].pad_token_id, "eos_token_id": 2}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = sample_answers(student.model, student.adapter, batch, settings, seed=7, **options)
    assert torch.equal(torch.get_rng_state(), before)
    again = sample_answers(student.model, student.adapter, batch, settings, seed=7, **options)
    other = sample_answers(student.model, student.adapter, batch, settings, seed=8, **options)
    assert [a.tolist() for a in first] == [a.tolist() for a in again]
    assert [a.tolist() for a in first] != [a.tolist() for a in other]
    assert student.model.training is False  # the loaded model's mode is kept


def test_image_tokens_are_never_generated(kd_batch):
    """A student whose likeliest next token is the image placeholder (its output bias
    raised) answers without it when told to suppress image tokens."""
    batch, student, _, encoders = kd_batch
    model, adapter = student.model, student.adapter
    settings = GenerationSettings(max_new_tokens=3, temperature=0.0)
    options = {"pad_token_id": encoders[0].pad_token_id, "eos_token_id": 2, "seed": 0}
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[adapter.image_token_id] += 50 * head.weight.abs().max()
    plain = sample_answers(model, adapter, batch, settings, **options)
    assert all(adapter.image_token_id in a.tolist() for a in plain)
    kept = sample_answers(
        model, adapter, batch, settings, suppress_tokens=adapter.image_token_ids, **options
    )
    assert not any(set(a.tolist()) & adapter.image_token_ids for a in kept)


def test_answers_replace_the_data_answers_in_both_batches(kd_batch):
    """Only the new answer tokens are supervised (prompt and padding never are), and the
    student's and the teacher's batches align on exactly those tokens."""
    batch, student, teacher, encoders = kd_batch
    answers = [torch.tensor([300 + row, 301, 302][: 1 + row % 3]) for row in range(6)]
    s_batch = with_answers(batch, answers, student.adapter, encoders[0].pad_token_id)
    t_batch = with_answers(
        batch["teacher"][None], answers, teacher.adapter, encoders[1].pad_token_id
    )
    for out, original in ((s_batch, batch), (t_batch, batch["teacher"][None])):
        prompts = prompt_tokens(original)
        for row, answer in enumerate(answers):
            n, m = prompts[row].numel(), answer.numel()
            assert out["input_ids"][row, :n].tolist() == prompts[row].tolist()
            assert out["labels"][row, n : n + m].tolist() == answer.tolist()
            assert (out["labels"][row, :n] == IGNORE_INDEX).all()
            assert (out["labels"][row, n + m :] == IGNORE_INDEX).all()
            assert out["attention_mask"][row].sum() == n + m
        assert torch.equal(out["pixel_values"], original["pixel_values"])
    aligned = align_positions(s_batch, t_batch)
    assert aligned.token_ids.tolist() == torch.cat(answers).tolist()
    # Both models run on the rewritten batches.
    student.model(**forward_inputs(s_batch, student.adapter))
    teacher.model(**forward_inputs(t_batch, teacher.adapter))


def test_settings_and_rows_without_answer_are_refused(kd_batch):
    batch, *_ = kd_batch
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=-1.0)
    empty = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    with pytest.raises(ValueError, match="row 0 has no answer token"):
        prompt_tokens(empty)
