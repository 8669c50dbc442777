"""The offline teacher cache: writing, reloading, validation, resuming, training from it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from betakd import align, chunked, energies, files, models
from betakd import config as cfg
from betakd.align import align_positions
from betakd.cache_cli import cache_teacher
from betakd.data import KDCollator, SampleEncoder, build_dataset
from betakd.profiling import peak_tensor_bytes
from betakd.teachers import (
    BatchMeta,
    CacheContents,
    CacheError,
    OnlineTeacher,
    TeacherCache,
    dense_from_topk,
    topk_summary,
)
from betakd.teachers import cache_format as fmt
from betakd.teachers.build import build_teacher
from betakd.teachers.cache_format import INDEX_FILE
from betakd.teachers.cache_reader import token_ranks
from betakd.teachers.targets import LOG_TAIL_FLOOR

TOP_K = 32
# float16 storage of log-probabilities around log(1/512) = -6.2: |error| <= 6.2 * 2**-11.
LOG_PROB_ATOL = 4e-3
WRITE = {"shard_size": 4, "batch_size": 3, "visual_tokens": 16, "progress": False}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, llava_files):
    root = tmp_path_factory.mktemp("cache_data")
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red", "green", "blue"]):
        llava_files.write_image(root / "images" / f"{i}.png", colour)
        answer = colour if i % 2 == 0 else "yes, it is " + colour
        records.append(llava_files.record(f"s{i}", "What colour is it?", answer, f"{i}.png"))
    return llava_files.write_records(root / "data.json", records), root / "images"


def make_config(pair, data, images, cache_dir, *, source="online", out=None, **training):
    student, teacher = pair
    return cfg.validate(
        {
            "student": {"path": str(student)},
            "teacher": {
                "path": str(teacher),
                "source": source,
                "cache_dir": str(cache_dir),
                "cache_top_k": TOP_K,
            },
            "data": {"train_file": str(data), "image_folder": str(images)},
            "channels": {
                "logits": [{"energy": "cosine_probs"}],
                "features": [{"name": "visual", "energy": "mse"}],
            },
            "weighting": {"name": "instance", "representation": "teacher_visual"},
            "training": {
                "output_dir": str(out or cache_dir.parent / "out"),
                "per_device_train_batch_size": 2,
                "max_steps": 3,
                "learning_rate": 5e-3,
                "use_cpu": True,
                "seed": 0,
                "save_strategy": "no",
                "disable_tqdm": True,
                "logging_steps": 1,
                **training,
            },
        }
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory, llava_pair, data_files):
    """One complete cache (6 samples in shards of 4 -> 2 shards), shared read-only."""
    root = tmp_path_factory.mktemp("cache_written")
    config = make_config(llava_pair, *data_files, root / "cache")
    return cache_teacher(config, **WRITE), config


def teacher_parts(path):
    loaded = models.load(path, frozen=True)
    return loaded.processor, loaded.model, loaded.adapter


def cached_side(config, student_path, processor=None):
    """The recipe's cached teacher for a run whose student is at ``student_path``."""
    student = models.load(student_path)
    if processor is not None:
        student = dataclasses.replace(student, processor=processor)
    return build_teacher(config, student)


def split_meta(batch):
    """A collated batch as the trainer hands it to a teacher source."""
    inputs = dict(batch)
    return inputs, BatchMeta.pop_from(inputs)


# --------------------------------------------------------------------------- dense rebuild


def test_dense_rebuild_sums_to_one_and_keeps_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    values, ids, tail = topk_summary(logits, 6)
    dense = dense_from_topk(values.half(), ids.int(), tail.half(), 50)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(5))
    exact = torch.log_softmax(logits, -1)
    torch.testing.assert_close(dense.gather(1, ids), exact.gather(1, ids), atol=4e-3, rtol=0)
    tail_mass = 1 - exact.gather(1, ids).exp().sum(-1)
    torch.testing.assert_close(tail.exp(), tail_mass, atol=1e-6, rtol=1e-5)


def test_a_vanishing_tail_keeps_reverse_kl_finite():
    logits = torch.full((2, 40), -1e4)
    logits[:, :3] = torch.tensor([5.0, 4.0, 3.0])
    values, ids, tail = topk_summary(logits, 3)
    assert torch.all(tail == LOG_TAIL_FLOOR)
    dense = dense_from_topk(values.half(), ids.int(), tail.half(), 40)
    student = torch.randn(2, 40)
    for name in ("rkl", "fkl", "jsd", "cosine_probs"):
        assert torch.isfinite(energies.get(name)(student, dense)).all(), name
    full = dense_from_topk(*topk_summary(logits, 40)[:2], torch.zeros(2), 40)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2))


def test_token_ids_round_trip_in_16_and_24_bits():
    small = torch.tensor([[0, 1, 32767], [5, 300, 7]])
    stored = fmt.encode_ids(small, "int16")
    assert set(stored) == {""} and stored[""].dtype == torch.int16
    assert torch.equal(fmt.decode_ids(stored[""], None), small)
    large = torch.tensor([[0, 32767, 32768], [65535, 65536, 151935], [2**24 - 1, 1, 99999]])
    stored = fmt.encode_ids(large, fmt.id_storage(151936))
    assert stored[""].dtype == torch.int16 and stored["_high"].dtype == torch.uint8
    assert torch.equal(fmt.decode_ids(stored[""], stored["_high"]), large)
    assert fmt.bytes_per_token(32, 151936) == 165
    assert fmt.bytes_per_token(32, 512) == 132
    with pytest.raises(CacheError, match="24-bit"):
        fmt.id_storage(2**24 + 1)


# --------------------------------------------------------------------------- write and reload


def test_cache_matches_the_online_teacher(written, llava_pair):
    cache_dir, config = written
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    assert [s["file"] for s in index["shards"]] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert index["totals"]["samples"] == 6
    assert index["layout"]["id_storage"] == "int16"  # vocabulary of 512
    # k = 32 with int16 ids: 32 * (2 + 2) + tail 2 + target id 2.
    assert index["layout"]["bytes_per_token_fields"] == 132

    processor, model, adapter = teacher_parts(llava_pair[1])
    encoder = SampleEncoder(processor, adapter, config.data.max_length)
    dataset = build_dataset(config.data.train_file, config.data.image_folder, [encoder])
    batch = KDCollator(encoder)([dataset[i] for i in range(len(dataset))])
    aligned = align_positions(batch, batch)
    teacher = OnlineTeacher(
        model,
        adapter,
        vocab_rows=512,
        need_logits=True,
        need_visual=True,
        representation="teacher_visual",
    )
    targets = teacher.targets(batch, aligned, batch["image_counts"].tolist())
    online = torch.log_softmax(targets.tokens.logits(0, len(aligned), 512).float(), -1)
    visual = targets.visual

    cache = TeacherCache(cache_dir)
    ranks = token_ranks(aligned.batch_index, aligned.batch_size)
    for row, index_in_data in enumerate(batch["sample_index"].tolist()):
        sample = cache.sample(index_in_data)
        mine = aligned.batch_index == row
        assert torch.equal(sample.target_ids, aligned.token_ids[mine])
        exact = online[mine]
        dense = dense_from_topk(
            sample.topk_log_probs, sample.topk_ids, sample.tail_log_mass, cache.vocab_size
        )
        torch.testing.assert_close(dense.exp().sum(-1), torch.ones(len(dense)))
        ids = sample.topk_ids.long()
        torch.testing.assert_close(
            dense.gather(1, ids), exact.gather(1, ids), atol=LOG_PROB_ATOL, rtol=0
        )
        # The cached ids are the teacher's top k (up to ties at the k-th value).
        kth = exact.topk(TOP_K, -1).values[:, -1:]
        assert torch.all(exact.gather(1, ids) >= kth - 1e-4)
        assert torch.equal(ranks[mine], torch.arange(int(mine.sum())))
        torch.testing.assert_close(
            sample.visual.float(), align.pool_tokens(visual[row], 16), atol=2e-3, rtol=2e-3
        )
        torch.testing.assert_close(
            sample.representation.float(),
            targets.representation[row],
            atol=2e-3,
            rtol=2e-3,
        )

    # The captured mass, direct from the online distributions: mean over answer tokens.
    mass = index["topk_mass"]
    probs = online.exp()
    top = probs.topk(TOP_K, -1).values.sum(-1)
    assert mass["k"] == TOP_K
    assert mass["mean"] == pytest.approx(float(top.mean()), abs=2e-3)  # float16 tails
    assert mass["min"] == pytest.approx(float(top.min()), abs=2e-3)
    assert mass["p10"] == pytest.approx(float(torch.quantile(top, 0.1)), abs=2e-3)
    for k in (32, 64, 512):
        direct = probs.topk(k, -1).values.sum(-1).mean()
        assert mass["mean_by_k"][str(k)] == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("representation", ["teacher_answer_hidden", "teacher_confidence"])
def test_cached_representations_equal_the_online_ones(
    representation, llava_pair, data_files, tmp_path
):
    raw = make_config(llava_pair, *data_files, tmp_path / "cache").model_dump()
    raw["channels"]["features"] = []
    raw["weighting"]["representation"] = representation
    config = cfg.validate(raw)
    cache_teacher(config, **{**WRITE, "shard_size": 6})
    processor, model, adapter = teacher_parts(llava_pair[1])
    encoder = SampleEncoder(processor, adapter, config.data.max_length)
    dataset = build_dataset(config.data.train_file, config.data.image_folder, [encoder])
    batch = KDCollator(encoder)([dataset[i] for i in (0, 3)])
    online = OnlineTeacher(
        model,
        adapter,
        vocab_rows=512,
        need_logits=True,
        need_visual=False,
        representation=representation,
    ).targets(batch, align_positions(batch, batch), batch["image_counts"].tolist())
    cache = TeacherCache(tmp_path / "cache")
    assert cache.contents["representation"] == representation
    assert cache.layout["representation_dim"] == online.representation.shape[1]
    cached = torch.stack([cache.sample(i).representation.float() for i in (0, 3)])
    torch.testing.assert_close(cached, online.representation, atol=3e-3, rtol=2e-3)


def test_cached_teacher_serves_aligned_dense_targets(written, llava_pair):
    cache_dir, config = written
    raw = config.model_dump()
    raw["teacher"].update(source="cache", path=None)
    side = cached_side(cfg.validate(raw), llava_pair[0])
    teacher = side.source
    assert side.visual_dims == {None: 64} and side.representation_dim == 64
    assert side.encoders == {} and side.members == {None: side.source}
    processor, model, adapter = teacher_parts(llava_pair[0])
    encoder = SampleEncoder(processor, adapter, config.data.max_length)
    dataset = build_dataset(config.data.train_file, config.data.image_folder, [encoder])
    batch = KDCollator(encoder)([dataset[i] for i in (4, 1, 5)])
    aligned, targets = teacher(*split_meta(batch))
    assert len(aligned) == int((batch["labels"][:, 1:] != -100).sum())
    dense = targets.tokens.logits(0, len(aligned), 512)
    assert dense.shape == (len(aligned), 512)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(len(aligned)))
    assert [v.shape for v in targets.visual] == [torch.Size([16, 64])] * 3
    assert targets.representation.shape == (3, 64)

    broken = dict(batch)
    broken["input_ids"] = batch["input_ids"].clone()
    answer = (batch["labels"][1] != -100).nonzero()[0]
    broken["input_ids"][1, answer] = (broken["input_ids"][1, answer] + 1) % 500
    with pytest.raises(CacheError, match=r"sample s1 \(data row 1\): cached answer token 0"):
        teacher(*split_meta(broken))


# --------------------------------------------------------------------------- validation


def test_changed_data_or_tokenizer_is_detected(written, llava_pair, data_files, tmp_path):
    cache_dir, config = written

    def cached(data):
        raw = config.model_dump()
        raw["teacher"]["source"] = "cache"
        raw["data"]["train_file"] = str(data)
        return cfg.validate(raw)

    records = json.loads(Path(data_files[0]).read_text())
    records[2]["conversations"][1]["value"] = "purple"
    changed = tmp_path / "data.json"
    changed.write_text(json.dumps(records))
    with pytest.raises(CacheError, match="data file contents"):
        cached_side(cached(changed), llava_pair[0])

    other = models.load_processor(llava_pair[0])
    other.tokenizer.add_tokens(["<new-token>"])
    with pytest.raises(CacheError, match="tokenizer vocabulary"):
        cached_side(cached(data_files[0]), llava_pair[0], processor=other)

    # Writing into a folder that holds another data set's cache is refused.
    raw = config.model_dump()
    raw["data"]["train_file"] = str(changed)
    with pytest.raises(CacheError, match="data_sha256"):
        cache_teacher(cfg.validate(raw), **WRITE)


def test_missing_index_means_an_unfinished_cache(tmp_path):
    (tmp_path / "shard-00000.safetensors").write_bytes(b"")
    with pytest.raises(CacheError, match="interrupted run"):
        TeacherCache(tmp_path)


# --------------------------------------------------------------------------- resume, atomicity


def test_interrupted_write_resumes_to_the_same_shards(
    written, llava_pair, data_files, tmp_path, monkeypatch
):
    reference, _ = written
    config = make_config(llava_pair, *data_files, tmp_path / "cache")
    cache_dir = tmp_path / "cache"
    real_call = OnlineTeacher.__call__
    computed = []

    def crash_in_second_shard(self, batch, meta):
        if "s4" in meta.sample_ids:
            # Killed while writing the second shard: a partial temporary file, no shard.
            files.temp_name(cache_dir / "shard-00001.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated interruption")
        computed.extend(meta.sample_ids)
        return real_call(self, batch, meta)

    monkeypatch.setattr(OnlineTeacher, "__call__", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(config, **WRITE)
    assert sorted(p.name for p in cache_dir.glob(fmt.SHARD_GLOB)) == ["shard-00000.safetensors"]
    assert not (cache_dir / INDEX_FILE).exists()
    assert files.leftover_temp_files(cache_dir)
    with pytest.raises(CacheError, match="interrupted run"):
        TeacherCache(cache_dir)

    computed.clear()

    def counting(self, batch, meta):
        computed.extend(meta.sample_ids)
        return real_call(self, batch, meta)

    monkeypatch.setattr(OnlineTeacher, "__call__", counting)
    cache_teacher(config, **WRITE)
    assert computed == ["s4", "s5"]  # only the missing shard ran
    assert not files.leftover_temp_files(cache_dir)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert (cache_dir / name).read_bytes() == (reference / name).read_bytes(), name
    assert (
        json.loads((cache_dir / INDEX_FILE).read_text())["totals"]
        == json.loads((reference / INDEX_FILE).read_text())["totals"]
    )


def test_leftover_temp_files_are_ignored_by_readers(written, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(written[0], copy)
    (copy / ".shard-00001.safetensors.4242.tmp").write_bytes(b"garbage")
    (copy / f".{INDEX_FILE}.4242.tmp").write_text("{not json")
    cache = TeacherCache(copy)
    assert len(cache) == 6
    assert cache.sample(5).target_ids.numel() > 0
    with safe_open(str(copy / "shard-00001.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("sample_index").tolist() == [4, 5]


# --------------------------------------------------------------------------- training


def forbid_teacher_loading(monkeypatch, teacher_path):
    real = models.load_model

    def guarded(path, **kw):
        if Path(path) == Path(teacher_path):
            raise AssertionError("the teacher model was loaded")
        return real(path, **kw)

    monkeypatch.setattr(models, "load_model", guarded)


def test_build_trainer_trains_from_the_cache(written, llava_pair, tmp_path, monkeypatch):
    from betakd.build import build_trainer, training_arguments

    raw = written[1].model_dump()
    raw["teacher"]["source"] = "cache"
    raw["training"]["output_dir"] = str(tmp_path / "out")
    cached = cfg.validate(raw)
    forbid_teacher_loading(monkeypatch, llava_pair[1])
    trainer = build_trainer(cached, training_arguments(cached))
    trainer.train()
    assert trainer.state.global_step == 3


def test_cli_writes_a_cache(llava_pair, data_files, tmp_path, caplog):
    from click.testing import CliRunner

    from betakd.cache_cli import cache_teacher_command

    caplog.set_level(logging.INFO, logger="betakd.teachers.cache_writer")
    config = make_config(llava_pair, *data_files, tmp_path / "unused").model_dump()
    config["channels"]["features"] = []
    config["weighting"] = {"name": "task"}
    path = tmp_path / "config.yaml"
    path.write_text(cfg.yaml.safe_dump(config))
    result = CliRunner().invoke(
        cache_teacher_command,
        [str(path), "--set", f"teacher.cache_dir={tmp_path / 'c'}", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    cache = TeacherCache(tmp_path / "c")
    assert cache.contents == {"logits": True, "visual": False, "representation": None}
    # A random tiny teacher spreads its probability: the top 32 of 512 hold a fraction
    # of it; the writer says what a larger k would hold and how the bytes split.
    mass = cache.index["topk_mass"]
    assert mass["mean"] < 0.9
    logged = caplog.text
    assert f"the cached top {TOP_K} tokens hold {mass['mean']:.0%}" in logged
    by_k = {int(k): v for k, v in mass["mean_by_k"].items()}
    suggested = min(k for k, v in by_k.items() if v >= 0.9)
    assert f"teacher.cache_top_k: {suggested} would hold" in logged
    assert "132 per token for the answer ids and the top-k" in logged
    assert cache.sample(0).visual is None
    with pytest.raises(CacheError, match=r"without visual tokens \(channels.features\)"):
        cache.check_contents(CacheContents(True, True, None))


def test_train_cli_names_a_cache_of_another_representation_in_one_line(written, tmp_path):
    from click.testing import CliRunner

    from betakd.cli import main

    raw = written[1].model_dump()
    raw["teacher"].update(source="cache", cache_dir=str(written[0]))
    raw["weighting"]["representation"] = "teacher_confidence"
    raw["training"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "representation" in lines[-1], result.output
    assert "Traceback" not in result.output


def test_uncached_training_samples_are_named(written):
    cache = TeacherCache(written[0])
    cache.check_covers([0, 5], ["s0", "s5"])
    with pytest.raises(CacheError, match=r"lacks 1 training samples \(e.g. \['late'\]\)"):
        cache.check_covers([0, 17], ["s0", "late"])


# --------------------------------------------------------------------------- chunked from the cache


def cached_trainer(config_raw, tmp_path, source="cache", **channels):
    from betakd.build import build_trainer, training_arguments

    raw = json.loads(json.dumps(config_raw))
    raw["teacher"]["source"] = source
    raw["channels"].update(channels)
    raw["training"]["output_dir"] = str(tmp_path / "out")
    config = cfg.validate(raw)
    return build_trainer(config, training_arguments(config))


def counted(trainer):
    """Count calls of every logit channel's energy (one per chunk and pass)."""
    calls = []
    for name, fn in list(trainer.head.energy_fns.items()):

        def wrapped(student, teacher, fn=fn):
            calls.append(student.shape[0])
            return fn(student, teacher)

        trainer.head.energy_fns[name] = wrapped
    return calls


def loss_and_grads(trainer, rows):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=len(rows))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def answer_tokens(trainer, rows) -> int:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize(
    "weighting, passes",
    [("instance", 1), ("task", 1), ("closed_form", 2)],
)
def test_chunked_from_the_cache_equals_dense_from_the_cache(written, tmp_path, weighting, passes):
    """Values and gradients equal; the single pass is chosen where the betas do not
    follow the current energies (closed form per sample recomputes in backward)."""
    raw = written[1].model_dump()
    raw["channels"]["logits"].append({"energy": "fkl", "options": {"temperature": 2.0}})
    raw["weighting"] = {"name": weighting, "representation": "teacher_visual"}
    rows = [4, 1, 5, 0]
    dense = cached_trainer(raw, tmp_path / "dense")
    in_chunks = cached_trainer(raw, tmp_path / "chunked", chunk_size=3)
    calls = counted(in_chunks)
    dense_loss, dense_grads = loss_and_grads(dense, rows)
    chunk_loss, chunk_grads = loss_and_grads(in_chunks, rows)
    chunks = -(-answer_tokens(in_chunks, rows) // 3)
    assert len(calls) == 2 * passes * chunks  # two energies, each chunk once per pass
    torch.testing.assert_close(chunk_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert dense_grads.keys() == chunk_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class VocabRows(TorchDispatchMode):
    """The most rows of any ``[..., V]`` tensor that an operation produced (views too)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                if value.shape[-1] == self.vocab:
                    # Broadcast dimensions (stride 0, e.g. lm_head's weight expanded over
                    # a batch for bmm) hold no rows of their own.
                    rows = math.prod(
                        n for n, step in zip(value.shape[:-1], value.stride()[:-1]) if step
                    )
                    self.most = max(self.most, rows)
        return out


@pytest.fixture(scope="module")
def long_answers(tmp_path_factory, llava_pair, llava_files):
    """Eight samples with long answers (many answer tokens per batch) and their cache."""
    root = tmp_path_factory.mktemp("long_answers")
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red"] * 2):
        llava_files.write_image(root / "images" / f"{i}.png", colour)
        answer = f"The shape is {colour}. It is a small {colour} square in the middle of it."
        records.append(llava_files.record(f"l{i}", "Describe the image.", answer, f"{i}.png"))
    data = llava_files.write_records(root / "data.json", records)
    config = make_config(llava_pair, data, root / "images", root / "cache")
    cache_teacher(config, **{**WRITE, "shard_size": 8})
    return config


@pytest.mark.parametrize(
    "source, representation",
    [("cache", "teacher_visual"), ("online", "teacher_confidence")],
)
def test_training_in_chunks_never_holds_a_vocabulary_sized_tensor(
    long_answers, tmp_path, source, representation
):
    """With chunk_size, the loss (CE, two energies, their gradients) stays below one
    [N, V] float32 tensor, and no operation of the step makes a tensor of N rows of the
    vocabulary, teacher or student, from the cache or from an online teacher (whose
    confidence representation is read a chunk at a time); the dense path does both."""
    raw = long_answers.model_dump()
    raw["channels"]["logits"].append({"energy": "fkl"})
    raw["weighting"]["representation"] = representation
    rows = list(range(8))
    vocab = 512
    measured = {}
    for chunk_size in (None, 2):
        trainer = cached_trainer(
            raw, tmp_path / f"c{chunk_size}", source=source, chunk_size=chunk_size
        )
        n = answer_tokens(trainer, rows)
        watch = VocabRows(vocab)

        def step(trainer=trainer, watch=watch):
            with watch:
                loss_and_grads(trainer, rows)

        within = None if chunk_size is None else chunked.PROFILER_RANGE
        measured[chunk_size] = (peak_tensor_bytes(step, within=within), watch.most)
    one_tensor = n * vocab * 4
    assert n >= 100, n
    chunk_peak, chunk_rows = measured[2]
    dense_peak, dense_rows = measured[None]
    assert chunk_peak is not None and 0 < chunk_peak < one_tensor, (chunk_peak, one_tensor)
    assert chunk_rows < n, chunk_rows
    # The measurement sees vocabulary-sized tensors where they exist.
    assert dense_peak > one_tensor and dense_rows >= n, (dense_peak, dense_rows)
