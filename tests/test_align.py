"""Alignment of teacher and student predictions, visual pooling, representations."""

from __future__ import annotations

import math

import pytest
import torch

from betakd.align import (
    REPRESENTATIONS,
    AlignedPositions,
    align_positions,
    confidence_stats,
    instance_representation,
    pool_tokens,
    pool_visual_pair,
    pooled_answer_hidden,
    pooled_visual,
    representation_dim,
)
from betakd.data import KDCollator, SampleEncoder, build_dataset
from betakd.labels import IGNORE_INDEX
from betakd.models import forward_inputs, get_adapter, load_model, load_processor


def setup(path):
    model = load_model(path)
    processor = load_processor(path)
    return model, SampleEncoder(processor, get_adapter(model, processor))


@pytest.fixture
def llava_kd_batch(llava_pair, vqa_data):
    """Student (16 image tokens, right-padded) and teacher (64, left-padded) batches."""
    (student_model, student), (teacher_model, teacher) = (setup(p) for p in llava_pair)
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, [student, teacher])
    collate = KDCollator(student, {None: teacher}, teacher_padding_side="left")
    batch = collate(list(dataset))
    return batch, (student_model, student), (teacher_model, teacher)


def predicted_ids(batch, rows, positions):
    return batch["input_ids"][rows, positions + 1]


def test_answer_positions_line_up_across_image_token_counts(llava_kd_batch):
    batch, (student_model, student), (teacher_model, teacher) = llava_kd_batch
    teacher_batch = batch["teacher"][None]
    image_id = student.adapter.image_token_id
    s_images = (batch["input_ids"] == image_id).sum(1)
    t_images = (teacher_batch["input_ids"] == image_id).sum(1)
    assert s_images.tolist() == [16] * 6 and t_images.tolist() == [64] * 6

    aligned = align_positions(batch, teacher_batch, sample_ids=batch["sample_ids"])
    rows = aligned.batch_index
    # Both positions predict the same next token, which is the supervised label.
    s_next = predicted_ids(batch, rows, aligned.student_pos)
    t_next = predicted_ids(teacher_batch, rows, aligned.teacher_pos)
    assert torch.equal(s_next, t_next)
    assert torch.equal(s_next, aligned.token_ids)
    assert torch.equal(batch["labels"][rows, aligned.student_pos + 1], aligned.token_ids)
    # Every supervised token is covered exactly once, and none else.
    assert aligned.counts().tolist() == (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert aligned.is_answer.all()
    # The offsets really differ (image tokens and left padding), so indices are not shared.
    assert not torch.equal(aligned.student_pos, aligned.teacher_pos)

    with torch.no_grad():
        s_out = student_model(**forward_inputs(batch, student.adapter))
        t_out = teacher_model(**forward_inputs(teacher_batch, teacher.adapter))
    s_rows, t_rows = aligned.student(s_out.logits), aligned.teacher(t_out.logits)
    assert s_rows.shape == t_rows.shape == (len(aligned), 512)


def test_trained_positions_predict_same_tokens(llava_kd_batch):
    """With teacher and student that copy the target, both argmaxes are the labels."""
    batch, _, _ = llava_kd_batch
    teacher_batch = batch["teacher"][None]
    aligned = align_positions(batch, teacher_batch)

    def oracle_logits(b):
        # Logits at p put all mass on the token at p + 1: a perfect next-token predictor.
        nxt = torch.roll(b["input_ids"], -1, dims=1)
        return torch.nn.functional.one_hot(nxt, 512).float() * 20

    s_pred = aligned.student(oracle_logits(batch)).argmax(-1)
    t_pred = aligned.teacher(oracle_logits(teacher_batch)).argmax(-1)
    assert torch.equal(s_pred, t_pred) and torch.equal(s_pred, aligned.token_ids)


def test_include_prompt_adds_text_but_no_image_positions(llava_kd_batch):
    batch, (_, student), (_, teacher) = llava_kd_batch
    answers_only = align_positions(batch, batch["teacher"][None])
    with_prompt = align_positions(
        batch,
        batch["teacher"][None],
        student_adapter=student.adapter,
        teacher_adapter=teacher.adapter,
        include_prompt=True,
    )
    assert len(with_prompt) > len(answers_only)
    assert int(with_prompt.is_answer.sum()) == len(answers_only)
    assert not (with_prompt.token_ids == student.adapter.image_token_id).any()
    rows = with_prompt.batch_index
    assert torch.equal(
        predicted_ids(batch, rows, with_prompt.student_pos),
        predicted_ids(batch["teacher"][None], rows, with_prompt.teacher_pos),
    )


def test_cross_family_alignment_qwen_student_llava_teacher(tiny_model_dir, vqa_data):
    _, student = setup(tiny_model_dir("qwen2_vl"))
    _, teacher = setup(tiny_model_dir("llava", "teacher"))
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, [student, teacher])
    batch = KDCollator(student, {None: teacher})(list(dataset))
    aligned = align_positions(
        batch,
        batch["teacher"][None],
        student_adapter=student.adapter,
        teacher_adapter=teacher.adapter,
        include_prompt=True,
    )
    rows = aligned.batch_index
    assert torch.equal(
        predicted_ids(batch, rows, aligned.student_pos),
        predicted_ids(batch["teacher"][None], rows, aligned.teacher_pos),
    )


def test_mismatched_tokens_name_the_sample(llava_kd_batch):
    batch, _, _ = llava_kd_batch
    teacher_batch = dict(batch["teacher"][None])
    labels = teacher_batch["labels"].clone()
    answer = (labels[2] != IGNORE_INDEX).nonzero()[0]
    teacher_batch["input_ids"] = teacher_batch["input_ids"].clone()
    teacher_batch["input_ids"][2, answer] += 1
    with pytest.raises(ValueError, match="sample s2"):
        align_positions(batch, teacher_batch, sample_ids=batch["sample_ids"])


def test_truncated_side_aligns_common_prefix(llava_files, llava_pair, tmp_path):
    llava_files.write_image(tmp_path / "i.png")
    data = llava_files.write_records(
        tmp_path / "d.json", [llava_files.record("t", "Describe.", "one two three " * 8, "i.png")]
    )
    student = SampleEncoder(
        load_processor(llava_pair[0]), get_adapter(load_model(llava_pair[0]), None), 48
    )
    teacher = SampleEncoder(
        load_processor(llava_pair[1]), get_adapter(load_model(llava_pair[1]), None), 100
    )
    batch = KDCollator(student, {None: teacher})(
        list(build_dataset(data, tmp_path, [student, teacher]))
    )
    aligned = align_positions(batch, batch["teacher"][None])
    s_count = int((batch["labels"] != IGNORE_INDEX).sum())
    t_count = int((batch["teacher"][None]["labels"] != IGNORE_INDEX).sum())
    assert len(aligned) == min(s_count, t_count) and s_count != t_count


def test_pool_tokens_square_grid_is_block_average():
    tokens = torch.arange(64 * 2, dtype=torch.float32).reshape(2, 8, 8).permute(1, 2, 0)
    pooled = pool_tokens(tokens.reshape(64, 2), 16)
    expected = tokens.reshape(4, 2, 4, 2, 2).mean(dim=(1, 3)).reshape(16, 2)
    assert torch.allclose(pooled, expected)


def test_pool_tokens_non_square_uses_1d():
    tokens = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    pooled = pool_tokens(tokens, 3)
    assert torch.allclose(pooled, tokens.reshape(3, 2, 2).mean(1))
    assert pool_tokens(tokens, 6) is tokens


def test_pool_visual_pair_masks_text_only_samples():
    student = [torch.randn(16, 4), torch.empty(0, 4), torch.randn(16, 4)]
    teacher = [torch.randn(64, 8), torch.empty(0, 8), torch.randn(64, 8)]
    pooled = pool_visual_pair(student, teacher)
    assert pooled.student.shape == (3, 16, 4) and pooled.teacher.shape == (3, 16, 8)
    assert pooled.mask.tolist() == [True, False, True]
    assert pooled.tokens.sum(dim=1).tolist() == [16, 0, 16]
    assert torch.equal(pooled.student[0], student[0])
    assert torch.allclose(pooled.teacher[2], pool_tokens(teacher[2], 16))


def test_pool_visual_pair_keeps_each_samples_own_grid():
    """Each sample pools to the smaller of its own two counts (16 and 9 here), whatever
    the rest of the batch has; shorter grids are zero-padded and masked out."""
    student = [torch.randn(16, 4), torch.randn(9, 4)]
    teacher = [torch.randn(64, 8), torch.randn(36, 8)]
    pooled = pool_visual_pair(student, teacher)
    assert pooled.student.shape == (2, 16, 4) and pooled.teacher.shape == (2, 16, 8)
    assert pooled.tokens.sum(dim=1).tolist() == [16, 9] and not pooled.tokens[1, 9:].any()
    assert torch.equal(pooled.student[1, :9], student[1])
    torch.testing.assert_close(pooled.teacher[1, :9], pool_tokens(teacher[1], 9))
    torch.testing.assert_close(pooled.teacher[0], pool_tokens(teacher[0], 16))
    assert not pooled.student[1, 9:].any() and not pooled.teacher[1, 9:].any()
    with pytest.raises(ValueError, match="no sample"):
        pool_visual_pair([torch.empty(0, 4)], [torch.empty(0, 8)])


def test_visual_tokens_from_models_pool_to_smaller_grid(llava_kd_batch):
    batch, (student_model, student), (teacher_model, teacher) = llava_kd_batch
    counts = batch["image_counts"].tolist()
    s_out = student_model(**forward_inputs(batch, student.adapter))
    with torch.no_grad():
        t_out = teacher_model(**forward_inputs(batch["teacher"][None], teacher.adapter))
    s_vis = student.adapter.visual_tokens(s_out, counts)
    t_vis = teacher.adapter.visual_tokens(t_out, counts)
    assert s_vis[0].shape == (16, 32) and t_vis[0].shape == (64, 64)
    pooled = pool_visual_pair(s_vis, t_vis)
    assert pooled.student.shape == (6, 16, 32) and pooled.teacher.shape == (6, 16, 64)
    pooled.student.sum().backward()  # gradients reach the student's projector
    assert student_model.model.multi_modal_projector.linear_2.weight.grad is not None
    h = pooled_visual(t_vis)
    assert h.shape == (6, 64) and not h.requires_grad


def small_aligned():
    return AlignedPositions(
        batch_index=torch.tensor([0, 0, 1]),
        student_pos=torch.tensor([0, 1, 0]),
        teacher_pos=torch.tensor([1, 2, 0]),
        token_ids=torch.tensor([5, 6, 7]),
        is_answer=torch.tensor([True, True, True]),
        batch_size=3,
    )


def test_pooled_answer_hidden_means_teacher_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    hidden = torch.cat([hidden, torch.zeros(1, 3, 2)])
    out = pooled_answer_hidden(hidden, small_aligned())
    assert torch.allclose(out[0], (hidden[0, 1] + hidden[0, 2]) / 2)
    assert torch.allclose(out[1], hidden[1, 0])
    assert torch.equal(out[2], torch.zeros(2))  # no aligned token


def test_confidence_stats_entropy_and_max_prob():
    vocab = 8
    logits = torch.zeros(3, 3, vocab)
    logits[0, 1, 2] = 100.0  # certain
    # sample 0: one certain and one uniform row; sample 1: uniform
    stats = confidence_stats(logits, small_aligned())
    uniform_entropy = math.log(vocab)
    assert stats.shape == (3, 2)
    assert torch.allclose(
        stats[0], torch.tensor([uniform_entropy / 2, (1 + 1 / vocab) / 2]), atol=1e-4
    )
    assert torch.allclose(stats[1], torch.tensor([uniform_entropy, 1 / vocab]), atol=1e-5)
    gathered = confidence_stats(small_aligned().teacher(logits), small_aligned())
    assert torch.allclose(gathered, stats)


def test_one_kd_step_end_to_end(llava_pair, vqa_data):
    """The pieces as the trainer uses them: frozen bf16 teacher, fp32 student."""
    student_model = load_model(llava_pair[0], dtype="float32")
    teacher_model = load_model(llava_pair[1], dtype="bfloat16", frozen=True)
    s_proc, t_proc = load_processor(llava_pair[0]), load_processor(llava_pair[1])
    student = SampleEncoder(s_proc, get_adapter(student_model, s_proc), max_length=128)
    teacher = SampleEncoder(t_proc, get_adapter(teacher_model, t_proc), max_length=128)
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, {"student": student, "teacher": teacher})
    batch = KDCollator(student, {None: teacher})(list(dataset)[:4])

    s_out = student_model(**forward_inputs(batch, student.adapter))
    with torch.no_grad():
        # The model casts float32 pixel values to its own dtype.
        t_inputs = forward_inputs(batch["teacher"][None], teacher.adapter)
        t_out = teacher_model(**t_inputs, output_hidden_states=True)
    aligned = align_positions(batch, batch["teacher"][None], sample_ids=batch["sample_ids"])

    s_logits = aligned.student(s_out.logits).float()
    t_logits = aligned.teacher(t_out.logits).float()
    token_kl = torch.nn.functional.kl_div(
        s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    per_sample_kl = torch.zeros(4).index_add_(0, aligned.batch_index, token_kl) / aligned.counts()

    counts = batch["image_counts"].tolist()
    pooled = pool_visual_pair(
        student.adapter.visual_tokens(s_out, counts), teacher.adapter.visual_tokens(t_out, counts)
    )
    feature_adapter = torch.nn.Linear(pooled.teacher.shape[-1], pooled.student.shape[-1])
    per_sample_feat = (pooled.student - feature_adapter(pooled.teacher.float())).pow(2).mean((1, 2))

    teacher_visual = teacher.adapter.visual_tokens(t_out, counts)
    representations = {
        kind: instance_representation(
            kind,
            aligned=aligned,
            teacher_visual=teacher_visual,
            teacher_hidden=t_out.hidden_states[-1],
            teacher_logits=t_logits,
        )
        for kind in REPRESENTATIONS
    }
    assert {k: tuple(v.shape) for k, v in representations.items()} == {
        kind: (4, representation_dim(kind, teacher_model.config)) for kind in REPRESENTATIONS
    }
    assert representation_dim("teacher_visual", teacher_model.config) == 64
    with pytest.raises(ValueError, match="needs teacher_hidden"):
        instance_representation("teacher_answer_hidden", aligned=aligned)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in representations.values())
    (per_sample_kl.mean() + per_sample_feat.mean()).backward()
    assert student_model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in teacher_model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kd_step_on_cuda_with_bf16_teacher(llava_pair, vqa_data):
    device = torch.device("cuda")
    student_model = load_model(llava_pair[0]).to(device)
    teacher_model = load_model(llava_pair[1], dtype="bfloat16", frozen=True).to(device)
    s_proc, t_proc = load_processor(llava_pair[0]), load_processor(llava_pair[1])
    student = SampleEncoder(s_proc, get_adapter(student_model, s_proc))
    teacher = SampleEncoder(t_proc, get_adapter(teacher_model, t_proc))
    data_file, images = vqa_data
    dataset = build_dataset(data_file, images, [student, teacher])
    batch = KDCollator(student, {None: teacher}, teacher_padding_side="left")(list(dataset))

    def to_device(b):
        return {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}

    s_batch, t_batch = to_device(batch), to_device(batch["teacher"][None])
    s_out = student_model(**forward_inputs(s_batch, student.adapter))
    with torch.no_grad():
        t_out = teacher_model(**forward_inputs(t_batch, teacher.adapter), output_hidden_states=True)
    aligned = align_positions(s_batch, t_batch)
    assert aligned.batch_index.device.type == "cuda"
    assert torch.equal(
        s_batch["input_ids"][aligned.batch_index, aligned.student_pos + 1],
        t_batch["input_ids"][aligned.batch_index, aligned.teacher_pos + 1],
    )
    t_rows = aligned.teacher(t_out.logits)
    stats = confidence_stats(t_rows, aligned)
    hidden = pooled_answer_hidden(t_out.hidden_states[-1], aligned)
    counts = batch["image_counts"].tolist()
    pooled = pool_visual_pair(
        student.adapter.visual_tokens(s_out, counts), teacher.adapter.visual_tokens(t_out, counts)
    )
    assert stats.dtype == hidden.dtype == torch.float32 and stats.is_cuda
    loss = aligned.student(s_out.logits).float().log_softmax(-1) - t_rows.float().log_softmax(-1)
    (loss.pow(2).mean() + pooled.student.pow(2).mean()).backward()
    assert student_model.model.multi_modal_projector.linear_1.weight.grad is not None
