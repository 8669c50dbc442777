"""The generation runner on a tiny saved LLaVA: batch-size invariance and resuming."""

import json

import pytest

from betakd.eval import EvalDataError, PredictionsMismatch, Sample, generate, generate_batch

WORDS = "what colour is the shape red blue is there a circle in image yes no".split()


@pytest.fixture
def samples(tmp_path, write_images):
    """Ten prompts of different lengths (so batches need padding), one without image."""
    paths = write_images(tmp_path / "images", [f"{i}.png" for i in range(10)])
    result = []
    for i, path in enumerate(paths):
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + 3 * i)) + "?"
        result.append(Sample(f"q{i}", text, None if i == 3 else path, {"category": "c"}))
    return result


def test_batch_size_does_not_change_tokens(tiny_llava, samples):
    model, processor = tiny_llava
    one_by_one = [generate_batch(model, processor, [s], 8)[0] for s in samples[:8]]
    batched = generate_batch(model, processor, samples[:8], 8)
    assert batched == one_by_one
    assert all(len(ids) > 0 for ids in batched)


def test_generate_bs1_equals_bs8_and_keeps_padding_side(tiny_llava, samples):
    model, processor = tiny_llava
    side = processor.tokenizer.padding_side
    first = generate(model, processor, samples, batch_size=1, max_new_tokens=6, progress=False)
    second = generate(model, processor, samples, batch_size=8, max_new_tokens=6, progress=False)
    assert [r["text"] for r in first] == [r["text"] for r in second]
    assert processor.tokenizer.padding_side == side
    assert first[0]["question_id"] == "q0" and first[0]["category"] == "c"
    assert first[0]["prompt"] == samples[0].text


def test_resume_after_interruption(tiny_llava, samples, tmp_path, monkeypatch):
    model, processor = tiny_llava
    reference = generate(model, processor, samples, 4, 6, tmp_path / "ref.jsonl", progress=False)

    out = tmp_path / "out" / "preds.jsonl"
    original = model.generate

    def killed_at_third_batch(**kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(**kwargs)

    calls: list[int] = []
    monkeypatch.setattr(model, "generate", killed_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(model, processor, samples, 2, 6, out, progress=False)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in written] == ["q0", "q1", "q2", "q3"]

    calls = []
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(1) or original(**kw))
    resumed = generate(model, processor, samples, 2, 6, out, progress=False)
    assert len(calls) == 3  # only the six missing samples, two per batch
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["question_id"] for r in lines) == sorted(s.question_id for s in samples)
    assert [r["text"] for r in resumed] == [r["text"] for r in reference]


def test_resume_drops_a_torn_last_line(tiny_llava, samples, tmp_path):
    model, processor = tiny_llava
    out = tmp_path / "preds.jsonl"
    generate(model, processor, samples[:2], 2, 4, out, progress=False)
    with out.open("a") as handle:
        handle.write('{"question_id": "q2", "te')  # killed while writing
    records = generate(model, processor, samples[:3], 2, 4, out, progress=False)
    assert [r["question_id"] for r in records] == ["q0", "q1", "q2"]
    assert len(out.read_text().splitlines()) == 3


def test_duplicate_sample_ids_are_rejected(tiny_llava, samples):
    model, processor = tiny_llava
    with pytest.raises(EvalDataError, match="duplicate question_id 'q0'"):
        generate(model, processor, [samples[0], samples[0]], progress=False)


def test_accepts_llava_question_records(tiny_llava, samples):
    model, processor = tiny_llava
    record = {"question_id": 5, "text": samples[0].text, "image": samples[0].image, "x": 1}
    [result] = generate(model, processor, [record], max_new_tokens=4, progress=False)
    [expected] = generate(model, processor, samples[:1], max_new_tokens=4, progress=False)
    assert result["question_id"] == "5" and result["x"] == 1
    assert result["text"] == expected["text"]


def test_resume_refuses_a_file_written_for_other_prompts(tiny_llava, samples, tmp_path):
    model, processor = tiny_llava
    out = tmp_path / "preds.jsonl"
    generate(model, processor, samples[:2], 2, 2, out, progress=False)
    changed = [Sample("q0", samples[0].text + " Answer briefly.", samples[0].image)]
    with pytest.raises(EvalDataError, match="another prompt"):
        generate(model, processor, changed, 2, 2, out, progress=False)


def test_text_only_model_without_pad_token():
    from betakd.testing.tiny_models import build_tiny_model

    model, tokenizer = build_tiny_model("llama", hidden=32, layers=1)
    tokenizer.pad_token = None
    side = tokenizer.padding_side
    texts = [Sample("a", "is it red?"), Sample("b", "what colour is the shape in the image?")]
    one_by_one = [generate_batch(model, tokenizer, [s], 5)[0] for s in texts]
    assert generate_batch(model, tokenizer, texts, 5) == one_by_one
    assert tokenizer.pad_token is None and tokenizer.padding_side == side


def test_missing_chat_template_is_an_error():
    from betakd.testing.tiny_models import build_tiny_model

    model, tokenizer = build_tiny_model("llama", hidden=32, layers=1)
    tokenizer.chat_template = None
    with pytest.raises(EvalDataError, match="no chat_template"):
        generate_batch(model, tokenizer, [Sample("a", "hi")], 2)


def test_text_only_prompt_is_a_plain_string():
    from betakd.eval.runner import render_prompt
    from betakd.testing.tiny_models import build_tiny_model

    _, tokenizer = build_tiny_model("llama", hidden=32, layers=1)
    # A text-only template that only understands string content.
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert render_prompt(tokenizer, Sample("a", "is it red?")) == "[is it red?]"


def test_broken_images_stop_the_run_before_any_answer(tiny_llava, samples, tmp_path):
    model, processor = tiny_llava
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(samples[0].image.read_bytes()[:200])
    (tmp_path / "a_folder.png").mkdir()
    broken = [
        *samples[:2],
        Sample("q5", "missing?", tmp_path / "missing.png", source="qs.jsonl:6"),
        Sample("q6", "folder?", tmp_path / "a_folder.png", source="qs.jsonl:7"),
        Sample("q7", "truncated?", truncated, source="qs.jsonl:8"),
    ]
    out = tmp_path / "preds.jsonl"
    with pytest.raises(EvalDataError) as err:
        generate(model, processor, broken, 2, 4, out, progress=False)
    message = str(err.value)
    assert message.startswith("3 of 5 images cannot be read; nothing was generated")
    assert "qs.jsonl:6: question 'q5': image file not found" in message
    assert "qs.jsonl:7: question 'q6': the image path" in message and "is a folder" in message
    assert "qs.jsonl:8: question 'q7': cannot read the image" in message
    assert not out.exists() or out.read_text() == ""


def test_resume_refuses_answers_of_another_model(tiny_llava, samples, tmp_path):
    model, processor = tiny_llava
    out = tmp_path / "preds.jsonl"
    student = {"model_sha256": "aaa", "dtype": "auto", "max_new_tokens": 4}
    generate(model, processor, samples[:2], 2, 4, out, producer=student, progress=False)
    again = generate(model, processor, samples[:3], 2, 4, out, producer=student, progress=False)
    assert [r["producer"] for r in again] == [student] * 3
    teacher = {**student, "model_sha256": "bbb"}
    with pytest.raises(PredictionsMismatch, match=r"preds.jsonl:1: this file holds answers of model_sha256=aaa"):  # fmt: skip
        generate(model, processor, samples[:3], 2, 4, out, producer=teacher, progress=False)
    # Without a producer, the model's name and max_new_tokens tell runs apart.
    with pytest.raises(PredictionsMismatch, match="max_new_tokens=4"):
        generate(model, processor, samples[:3], 2, 4, out, progress=False)
