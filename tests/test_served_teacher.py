"""A teacher served by a real vLLM server (betakd.teachers.served).

One server per model for the module (``betakd.testing.vllm_server``: its own virtual
environment, created on first use; started in its own process group and stopped by
it). The served top-k is checked against the same teacher run in-process, training
against a cache of the same top-k, and every refusal against a message that names what
to fix.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from click.testing import CliRunner
from kd_configs import TRAINING, assert_same_final_state
from transformers import TrainerCallback

from betakd import config as cfg
from betakd.build import build_trainer, training_arguments
from betakd.cache_cli import cache_teacher
from betakd.cli import main
from betakd.labels import supervised
from betakd.onpolicy import answered_batch
from betakd.runs import run_training
from betakd.teachers import (
    CacheError,
    ServedTeacher,
    ServedTeacherError,
    TeacherCache,
    TopKLogits,
)
from betakd.teachers.served import carry_labels
from betakd.testing.tiny_models import save_tiny_model
from betakd.testing.tiny_tokenizer import DEFAULT_TEXTS, train_tokenizer
from betakd.testing.vllm_server import VLLMServer, ensure_environment, servable_copy

TOP_K = 8
STEPS = 20


@pytest.fixture(scope="module")
def vllm_environment():
    return ensure_environment()


@pytest.fixture(scope="module")
def llava_teacher(tiny_model_dir):
    # vLLM's CPU attention needs head sizes of at least 32 (vision too).
    return tiny_model_dir("llava", "teacher", vision_hidden=64)


@pytest.fixture(scope="module")
def served_llava(vllm_environment, llava_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_llava")
    copy = servable_copy(llava_teacher, root / "llava-teacher")
    with VLLMServer(copy, images=True, max_logprobs=20, log_file=root / "vllm.log") as server:
        yield server


@pytest.fixture(scope="module")
def data(tmp_path_factory, llava_files):
    """Twelve samples, one- and several-token answers, three colours."""
    root = tmp_path_factory.mktemp("served_data")
    records = []
    for i in range(12):
        colour = ["red", "green", "blue"][i % 3]
        llava_files.write_image(root / "images" / f"{i}.png", colour, (32, 32))
        question = "What colour is the shape?" if i % 2 else "Describe the image."
        answer = colour if i % 2 else f"a {colour} shape on white"
        records.append(llava_files.record(f"s{i}", question, answer, f"{i}.png"))
    return llava_files.write_records(root / "data.json", records), root / "images"


def raw_config(student, teacher: dict, data, out, weighting="task", **training) -> dict:
    return {
        "student": {"path": str(student)},
        "teacher": teacher,
        "data": {"train_file": str(data[0]), "image_folder": data[1] and str(data[1])},
        "channels": {"logits": [{"energy": "jsd"}]},
        "weighting": {"name": weighting},
        "training": {
            **TRAINING,
            "output_dir": str(out),
            "per_device_train_batch_size": 4,
            "max_steps": STEPS,
            **training,
        },
    }


def served(server, top_k=TOP_K, **options) -> dict:
    return {
        "source": "served",
        "server": {"url": server.url, "model": server.model, "top_k": top_k, **options},
    }


def trainer_for(raw):
    config = cfg.validate(raw)
    return build_trainer(config, training_arguments(config))


def first_batch(trainer, size=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(size)])


def batch_of(trainer, answers=None):
    """The first batch; with ``answers``, as an on-policy step writes them into it (the
    student's own answers, each side with its own image tokens)."""
    batch = first_batch(trainer)
    if answers is None:
        return batch
    student, encoders = trainer.data_collator.student, trainer.data_collator.teachers
    teachers = {name: (e.adapter, e.pad_token_id) for name, e in encoders.items()}
    return answered_batch(batch, answers, (student.adapter, student.pad_token_id), teachers)


@pytest.fixture(scope="module")
def served_llama(vllm_environment, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_llama")
    copy = servable_copy(tiny_model_dir("llama", "teacher"), root / "llama-teacher")
    with VLLMServer(copy, max_logprobs=20, log_file=root / "vllm.log") as server:
        yield server


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, llava_files):
    root = tmp_path_factory.mktemp("served_text")
    records = [
        llava_files.record(f"t{i}", f"Name colour number {i}.", answer, image=None)
        for i, answer in enumerate(["red", "green and blue", "a blue one", "red, then green"] * 2)
    ]
    return llava_files.write_records(root / "data.jsonl", records), None


def test_served_targets_equal_the_in_process_teachers(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    student = llava_pair[0]
    online = trainer_for(raw_config(student, {"path": str(llava_teacher)}, data, tmp_path / "a"))
    remote = trainer_for(raw_config(student, served(served_llava), data, tmp_path / "b"))
    assert_served_equals_in_process(online, remote)


def test_a_served_text_teacher_equals_the_in_process_one(
    served_llama, tiny_model_dir, text_data, tmp_path
):
    student, teacher = tiny_model_dir("llama", "student"), tiny_model_dir("llama", "teacher")
    online = trainer_for(raw_config(student, {"path": str(teacher)}, text_data, tmp_path / "a"))
    remote = trainer_for(raw_config(student, served(served_llama), text_data, tmp_path / "b"))
    assert_served_equals_in_process(online, remote)
    remote.train()
    assert remote.state.global_step == STEPS


def assert_served_equals_in_process(online, remote, answers=None) -> None:
    """The served targets of the first batch (with ``answers`` as the student's own, when
    given) equal the in-process teacher's."""
    _, aligned_o, targets_o, _ = online.loss_inputs(batch_of(online, answers))
    _, aligned_s, targets_s, _ = remote.loss_inputs(batch_of(remote, answers))
    # The same student positions and answer tokens, found in the server's tokens (for
    # the VLM, its own 64 image tokens per image against the student's 16).
    for field in ("batch_index", "student_pos", "token_ids", "is_answer"):
        assert torch.equal(getattr(aligned_o, field), getattr(aligned_s, field)), field
    assert len(aligned_s) > 8
    tokens = targets_s.tokens
    assert isinstance(tokens, TopKLogits) and tokens.log_probs.shape == (len(aligned_s), TOP_K)
    vocab = tokens.vocab_size
    log_p = torch.log_softmax(targets_o.tokens.logits(0, len(aligned_o), vocab).double(), -1)
    # Each served log-probability is the in-process teacher's for that token ...
    served_values = tokens.log_probs.double()
    in_process = log_p.gather(1, tokens.ids)
    assert (served_values - in_process).abs().max() < 1e-4
    # ... and they are its top k (near-uniform random logits: compare values, not ids).
    kth = log_p.topk(TOP_K, dim=1).values
    assert (served_values.sort(dim=1, descending=True).values - kth).abs().max() < 1e-4
    # The exact log-probability of every answer token, in or out of the top k.
    exact = log_p.gather(1, aligned_o.token_ids[:, None])[:, 0]
    assert (targets_s.answer_log_probs.double() - exact).abs().max() < 1e-4
    # The tail is the rest of the mass.
    rest = torch.log1p(-kth.exp().sum(dim=1))
    assert (tokens.tail_log_mass.double() - rest).abs().max() < 1e-4


def test_training_with_the_served_teacher_follows_a_cache_of_the_same_top_k(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    student = llava_pair[0]
    cache = tmp_path / "cache"
    teacher_cached = {"path": str(llava_teacher), "cache_dir": str(cache), "cache_top_k": TOP_K}
    writer = cfg.validate(raw_config(student, teacher_cached, data, tmp_path / "w"))
    cache_teacher(writer, progress=False)
    from_cache = {**teacher_cached, "source": "cache"}
    cached_run = trainer_for(raw_config(student, from_cache, data, tmp_path / "c"))
    cached_run.train()
    served_run = trainer_for(raw_config(student, served(served_llava), data, tmp_path / "s"))
    served_run.train()
    losses = [[h["loss"] for h in run.state.log_history if "loss" in h]
              for run in (cached_run, served_run)]  # fmt: skip
    assert len(losses[0]) == len(losses[1]) == STEPS
    assert max(losses[0]) - min(losses[0]) > 1e-2  # it trains
    # The cache stores float16 log-probabilities; the server sends float32.
    for step, (a, b) in enumerate(zip(*losses)):
        assert b == pytest.approx(a, rel=2e-3, abs=2e-3), (step, a, b)


CACHE_WRITE = {"shard_size": 4, "batch_size": 4, "progress": False}


def cache_config(student, teacher: dict, data, cache, top_k=TOP_K):
    teacher = {**teacher, "cache_dir": str(cache), "cache_top_k": top_k}
    return cfg.validate(raw_config(student, teacher, data, cache.parent / "unused"))


def cached_samples(cache) -> list:
    reader = TeacherCache(cache)
    return [reader.sample(i) for i in range(len(reader))]


def test_a_cache_from_the_server_equals_one_written_in_process(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    """`cache-teacher` from the server: the same samples, answer tokens, top-k values and
    tails as the in-process writer's (float16 storage), the reported mass of larger k
    only up to the server's k; a run from it follows a run from the in-process cache."""
    student = llava_pair[0]
    in_process = tmp_path / "in-process"
    remote = tmp_path / "served"
    cache_teacher(cache_config(student, {"path": str(llava_teacher)}, data, in_process),
                  **CACHE_WRITE)  # fmt: skip
    cache_teacher(cache_config(student, served(served_llava, top_k=16), data, remote),
                  **CACHE_WRITE)  # fmt: skip
    ours, theirs = cached_samples(in_process), cached_samples(remote)
    assert [s.sample_id for s in ours] == [s.sample_id for s in theirs]
    for a, b in zip(ours, theirs):
        assert torch.equal(a.target_ids, b.target_ids)
        # Near-uniform random logits: compare values (ids may swap among near ties).
        torch.testing.assert_close(b.topk_log_probs.float(), a.topk_log_probs.float(),
                                   atol=2e-3, rtol=0)  # fmt: skip
        torch.testing.assert_close(b.tail_log_mass.float(), a.tail_log_mass.float(),
                                   atol=2e-3, rtol=0)  # fmt: skip
    mass = json.loads((remote / "index.json").read_text())["topk_mass"]
    assert set(mass["mean_by_k"]) == {"8", "16"}  # the server gave 16 per token
    runs = []
    for cache in (in_process, remote):
        teacher = {"source": "cache", "cache_dir": str(cache), "cache_top_k": TOP_K}
        run = trainer_for(raw_config(student, teacher, data, cache.parent / f"run-{cache.name}"))
        run.train()
        runs.append([h["loss"] for h in run.state.log_history if "loss" in h])
    assert len(runs[0]) == STEPS
    for step, (a, b) in enumerate(zip(*runs)):
        assert b == pytest.approx(a, rel=2e-3, abs=2e-3), (step, a, b)


def test_an_interrupted_cache_from_the_server_resumes_without_duplicates(
    served_llava, llava_pair, data, tmp_path, monkeypatch
):
    """The server lost in the second shard: `betakd cache-teacher` stops with one line;
    rerun, it asks only for the missing shard's samples and writes every sample once,
    as an uninterrupted run does."""
    student, cache = llava_pair[0], tmp_path / "cache"
    raw = raw_config(student, served(served_llava, retries=0), data, tmp_path / "unused")
    raw["teacher"].update(cache_dir=str(cache), cache_top_k=TOP_K)
    path = tmp_path / "cache.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    command = ["cache-teacher", str(path), "--shard-size", "4", "--no-progress"]
    # The first request checks the chat template on one sample, then 4 per shard.
    post, asked, server = httpx.AsyncClient.post, [], {"lost_after": 1 + 4}

    async def lossy_post(client, url, json=None, **kwargs):
        if len(asked) == server["lost_after"]:  # after the first shard's requests
            raise httpx.ConnectError("connection refused (simulated)")
        asked.append(json["messages"][-1]["content"])
        return await post(client, url, json=json, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "post", lossy_post)
    broken = CliRunner().invoke(main, command)
    assert broken.exit_code == 1
    assert "failed for sample s" in broken.output and "rerun the command" in broken.output
    assert [shard.name for shard in cache.glob("shard-*")] == ["shard-00000.safetensors"]
    server["lost_after"] = None  # back
    asked.clear()
    done = CliRunner().invoke(main, command)
    assert done.exit_code == 0, done.output
    assert len(asked) == 1 + 8  # the template check and the two missing shards only
    index = json.loads((cache / "index.json").read_text())
    cached = [i for shard in index["shards"] for i in shard["sample_indices"]]
    assert cached == list(range(12))  # every sample once, in order
    monkeypatch.setattr(httpx.AsyncClient, "post", post)
    uninterrupted = tmp_path / "uninterrupted"
    cache_teacher(cache_config(student, served(served_llava), data, uninterrupted), **CACHE_WRITE)
    for shard in index["shards"]:
        assert (cache / shard["file"]).read_bytes() == (uninterrupted / shard["file"]).read_bytes()


def test_a_cache_of_more_tokens_than_the_server_gives_is_refused(
    served_llava, llava_pair, data, tmp_path
):
    config = cache_config(llava_pair[0], served(served_llava), data, tmp_path / "c", top_k=32)
    with pytest.raises(CacheError, match=f"cache_top_k: 32 > the {TOP_K} log-probabilities"):
        cache_teacher(config, **CACHE_WRITE)


def test_each_steps_requests_are_sent_while_the_step_before_computes(
    served_llava, llava_pair, data, tmp_path, monkeypatch
):
    """The data loader collates a batch ahead; the served teacher sends that batch's
    requests then (chat or token-in), and the step finds them sent. The run equals one
    without prefetch."""
    found, real_call = [], ServedTeacher.__call__

    def spy(self, batch, meta):
        found.append(tuple(meta.sample_index.tolist()) in self.pending)
        return real_call(self, batch, meta)

    monkeypatch.setattr(ServedTeacher, "__call__", spy)
    losses = {}
    for name, options in {
        "ahead": {},
        "at the step": {"prefetch_batches": 0},
        "ahead, token API": {"token_api": True},
    }.items():
        raw = raw_config(llava_pair[0], served(served_llava, **options), data, tmp_path / name,
                         max_steps=5)  # fmt: skip
        trainer = trainer_for(raw)
        found.clear()  # the sample scored when the run was built
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        ahead = name != "at the step"
        assert all(found) if ahead else not any(found)
        # Step 5 ends the run; the batch collated after it was sent for nothing.
        assert len(found) == 5 and len(trainer.teacher.pending) == int(ahead)
    assert losses["ahead"] == losses["at the step"]
    assert losses["ahead, token API"] == pytest.approx(losses["ahead"], rel=1e-6)


def test_an_unreachable_server_or_another_model_is_refused_before_training(
    served_llava, llava_pair, data, tmp_path
):
    student = llava_pair[0]
    dead = {"source": "served", "server": {"url": "http://127.0.0.1:9/v1", "model": "x"}}
    with pytest.raises(ServedTeacherError, match="unreachable"):
        trainer_for(raw_config(student, dead, data, tmp_path / "a"))
    other = {"source": "served", "server": {"url": served_llava.url, "model": "not-this"}}
    with pytest.raises(ServedTeacherError, match=f"serves \\['{served_llava.model}'\\]"):
        trainer_for(raw_config(student, other, data, tmp_path / "b"))


def test_a_k_above_the_servers_limit_is_refused_with_its_message(
    served_llava, llava_pair, data, tmp_path
):
    # Before training: one sample is scored when the run is built.
    refused = r"refused sample s0: HTTP 400: .*max allowed: 20.*teacher.server.top_k"
    with pytest.raises(ServedTeacherError, match=refused):
        trainer_for(raw_config(llava_pair[0], served(served_llava, top_k=50), data, tmp_path))


def test_a_server_of_another_tokenizer_is_refused_before_training_naming_the_sample(
    served_llava, tiny_model_dir, data, tmp_path
):
    # A student whose tokenizer was trained on other text: other merges, so the answers
    # are other token ids (the special tokens, image included, keep theirs).
    other = train_tokenizer(texts=tuple(t.upper() for t in DEFAULT_TEXTS), vocab_size=400)
    student = save_tiny_model("llava", tmp_path / "student", other)
    # Before training: one sample is scored when the run is built.
    with pytest.raises(ServedTeacherError, match="sample s0: the server's tokens do not contain"):
        trainer_for(raw_config(student, served(served_llava), data, tmp_path / "out"))


def test_feature_channels_and_hidden_representations_are_refused(
    served_llava, llava_pair, data, tmp_path
):
    raw = raw_config(llava_pair[0], served(served_llava), data, tmp_path / "a")
    raw["channels"]["features"] = [{"name": "visual", "energy": "mse"}]
    with pytest.raises(ServedTeacherError, match="channels.features: a served teacher"):
        trainer_for(raw)
    raw = raw_config(llava_pair[0], served(served_llava), data, tmp_path / "b", "instance")
    raw["weighting"]["representation"] = "teacher_visual"
    with pytest.raises(ServedTeacherError, match="teacher_confidence"):
        trainer_for(raw)
    # teacher_confidence comes from the served top-k; the recommended reliability reads
    # the exact NLL of the answers the server returns.
    raw["weighting"]["representation"] = "teacher_confidence"
    raw["weighting"]["options"] = {"reliability": {}}
    raw["training"]["max_steps"] = 3
    trainer = trainer_for(raw)
    _, aligned, targets, _ = trainer.loss_inputs(first_batch(trainer))
    assert targets.representation.shape == (4, 2)
    assert math.isfinite(float(targets.representation.sum()))
    nll, _ = trainer.calibration.measure_teacher(4, "test")
    answer = aligned.is_answer
    by_hand = torch.zeros(4).index_add_(0, aligned.batch_index[answer],
                                        -targets.answer_log_probs[answer])  # fmt: skip
    by_hand /= torch.bincount(aligned.batch_index[answer], minlength=4)
    torch.testing.assert_close(nll.float(), by_hand, rtol=1e-5, atol=1e-5)
    trainer.train()
    assert trainer.state.global_step == 3


def test_a_served_and_a_local_teacher_train_together(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    raw = raw_config(llava_pair[0], None, data, tmp_path, max_steps=3)
    del raw["teacher"], raw["channels"]
    raw["teachers"] = [
        {"name": "local", "path": str(llava_teacher), "channels": {"logits": [{"energy": "fkl"}]}},
        {"name": "remote", **served(served_llava), "channels": {"logits": [{"energy": "jsd"}]}},
    ]
    trainer = trainer_for(raw)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "remote/jsd/energy" in h]
    assert trainer.state.global_step == 3 and logged


def data_answers(trainer) -> list[torch.Tensor]:
    batch = first_batch(trainer)
    return [batch["input_ids"][r][supervised(batch["labels"][r])] for r in range(4)]


def test_a_served_text_teacher_scores_the_students_very_tokens(
    served_llama, tiny_model_dir, text_data, tmp_path
):
    """On-policy, a text teacher gets the rows' tokens as a completion's prompt: every
    sampled token is scored as the in-process teacher scores it, however oddly spelt."""
    student, teacher = tiny_model_dir("llama", "student"), tiny_model_dir("llama", "teacher")
    online = trainer_for(raw_config(student, {"path": str(teacher)}, text_data, tmp_path / "a"))
    remote = trainer_for(raw_config(student, served(served_llama), text_data, tmp_path / "b"))
    generator = torch.Generator().manual_seed(0)
    answers = [torch.randint(10, 300, (3 + row,), generator=generator) for row in range(4)]
    assert_served_equals_in_process(online, remote, answers)


def split_spelling(tokenizer, token: int) -> list[int] | None:
    """Two tokens that spell ``token``'s text, where the vocabulary has them."""
    text = tokenizer.convert_ids_to_tokens(token)
    vocab = tokenizer.get_vocab()
    for cut in range(1, len(text)):
        if text[:cut] in vocab and text[cut:] in vocab:
            return [vocab[text[:cut]], vocab[text[cut:]]]
    return None


def test_a_served_vlm_teacher_scores_the_students_very_tokens_with_the_image(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    """On-policy, a VLM teacher gets the rows' tokens (each image's cut to its one
    placeholder) and the images through vLLM's token-in API. The data's answers, one
    spelt in other pieces than the tokenizer's (as sampling may: its text would be
    re-tokenised otherwise) and byte tokens that are no text at all: every token scored
    as the in-process teacher scores it."""
    student = llava_pair[0]
    online = trainer_for(raw_config(student, {"path": str(llava_teacher)}, data, tmp_path / "a"))
    remote = trainer_for(raw_config(student, served(served_llava), data, tmp_path / "b"))
    answers = data_answers(remote)
    assert_served_equals_in_process(online, remote, answers)
    tokenizer = remote.teacher.tokenizer
    cut, pieces = next(
        (i, split)
        for i, t in enumerate(answers[0].tolist())
        if (split := split_spelling(tokenizer, t))
    )
    answers[0] = torch.cat([answers[0][:cut], torch.tensor(pieces), answers[0][cut + 1 :]])
    assert tokenizer.decode(answers[0]) == tokenizer.decode(data_answers(remote)[0])
    bytes_only = [t for t in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([t])]
    answers[1] = torch.tensor(bytes_only[:3])
    assert_served_equals_in_process(online, remote, answers)


def test_every_request_through_the_token_api_gives_the_chats_targets(
    served_llava, llava_pair, llava_teacher, data, tmp_path
):
    """``server.token_api``: the data's answers go as the student's tokens, undecoded;
    the targets are the in-process teacher's as through the chat API, and the chat
    template is still checked on the sample scored when the run is built."""
    student = llava_pair[0]
    online = trainer_for(raw_config(student, {"path": str(llava_teacher)}, data, tmp_path / "a"))
    raw = raw_config(student, served(served_llava, token_api=True), data, tmp_path / "b")
    remote = trainer_for(raw)
    assert remote.teacher.endpoint(student_answers=False) == "tokens"
    assert_served_equals_in_process(online, remote)


def test_labels_are_carried_over_image_runs_of_another_length():
    image, pad = 3, -100
    tokens = [1, 5, 3, 3, 6, 7, 8, 2, 9, 3, 3, 10, 11]
    labels = [pad, pad, pad, pad, pad, 7, 8, pad, pad, pad, pad, 10, 11]
    server = [1, 5, 3, 3, 3, 3, 6, 7, 8, 2, 9, 3, 3, 3, 3, 10, 11]
    carried = carry_labels(tokens, labels, server, {image})
    assert [t for t, lab in zip(server, carried) if lab != pad] == [7, 8, 10, 11]
    assert carried[7:9] == [7, 8] and carried[15:] == [10, 11]
    with pytest.raises(ValueError, match="token 5 of 13 differs"):
        carry_labels(tokens, labels, server[:7] + [99] + server[8:], {image})
    with pytest.raises(ValueError, match="1 tokens more"):
        carry_labels(tokens, labels, [*server, 4], {image})


def test_on_policy_with_a_vlm_teacher_needs_the_token_api(served_llama, llava_pair, data, tmp_path):
    # The text server here is started without --enable-scale-out.
    raw = raw_config(llava_pair[0], served(served_llama), data, tmp_path)
    raw["policy"] = {"mode": "on_policy"}
    with pytest.raises(ServedTeacherError, match="token-in API .* --enable-scale-out"):
        trainer_for(raw)


@pytest.mark.parametrize("mode", ["on_policy", "mixed"])
def test_on_policy_and_mixed_runs_train_with_a_served_teacher(
    served_llava, llava_pair, data, tmp_path, mode
):
    raw = raw_config(llava_pair[0], served(served_llava), data, tmp_path, max_steps=3)
    raw["policy"] = {"mode": mode, "generation": {"max_new_tokens": 6}}
    if mode == "mixed":  # some rows of each batch the student's, some the data's
        raw["policy"].update(per="sample", student_fraction=0.6)
    trainer = trainer_for(raw)
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 3
    logged = [h for h in trainer.state.log_history if "on_policy/share" in h]
    assert logged and logged[0]["on_policy/share"] > 0


class KillServerAfter(TrainerCallback):
    """The vLLM server's processes are killed after optimizer step ``step``."""

    def __init__(self, server: VLLMServer, step: int):
        self.server, self.step = server, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.server.stop()


def test_a_killed_server_stops_the_run_naming_the_step_and_resume_finishes_it(
    vllm_environment, llava_teacher, llava_pair, data, tmp_path
):
    """A server of its own, killed after step 3 (12 samples, batches of 4: the batch of
    step 4 is collated, and its requests sent, after that). The run retries, stops at
    step 4 with one line; the server restarted, `--resume` from the step-2 checkpoint
    finishes with the uninterrupted run's student."""
    copy = servable_copy(llava_teacher, tmp_path / "llava-teacher")
    with VLLMServer(copy, images=True, max_logprobs=20, log_file=tmp_path / "vllm.log") as server:
        teacher = served(server, retries=1)
        checkpoints = {"save_strategy": "steps", "save_steps": 2, "max_steps": 6}
        run_training(
            cfg.validate(raw_config(llava_pair[0], teacher, data, tmp_path / "a", **checkpoints))
        )
        broken = cfg.validate(
            raw_config(llava_pair[0], teacher, data, tmp_path / "b", **checkpoints)
        )
        with pytest.raises(
            ServedTeacherError,
            match="step 4: teacher server .* failed for sample .* 2 attempts; last error: Connect",
        ):
            run_training(broken, callbacks=[KillServerAfter(server, 3)])
        server.start()
        run_training(broken, resume=True)
    assert_same_final_state(tmp_path / "a", tmp_path / "b", atol=1e-5)


def test_a_server_stops_when_the_process_that_started_it_is_killed(
    vllm_environment, tiny_model_dir, tmp_path
):
    """A test run killed with SIGKILL (no fixture teardown) leaves no vLLM server."""
    import os
    import signal
    import subprocess
    import sys
    import time

    copy = servable_copy(tiny_model_dir("llama", "teacher"), tmp_path / "llama-teacher")
    starter = (
        "import sys, time\n"
        "from betakd.testing.vllm_server import VLLMServer\n"
        f"server = VLLMServer({str(copy)!r}).start()\n"
        "print(server.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    group = os.getpgid(server_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)  # raises once no process of the server's group is left
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(group, signal.SIGKILL)
    pytest.fail("the vLLM server outlived the process that started it")
