"""The offline teacher cache: writing, reloading, validation, resuming, training from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from betakd import align, energies, models
from betakd import cache as cache_mod
from betakd import config as cfg
from betakd.align import align_positions
from betakd.cache import (
    INDEX_FILE,
    CacheError,
    TeacherCache,
    build_cached_teacher,
    dense_from_topk,
    topk_summary,
    write_teacher_cache,
)
from betakd.data import KDCollator, SampleEncoder, build_dataset
from betakd.teachers import OnlineTeacher

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
    return write_teacher_cache(config, **WRITE), config


def teacher_parts(path):
    processor = models.load_processor(path)
    model = models.load_model(path, frozen=True)
    adapter = models.get_adapter(model, processor)
    return processor, model, adapter


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
    assert torch.all(tail == cache_mod.LOG_TAIL_FLOOR)
    dense = dense_from_topk(values.half(), ids.int(), tail.half(), 40)
    student = torch.randn(2, 40)
    for name in ("rkl", "fkl", "jsd", "cosine_probs"):
        assert torch.isfinite(energies.get(name)(student, dense)).all(), name
    full = dense_from_topk(*topk_summary(logits, 40)[:2], torch.zeros(2), 40)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2))


def test_token_ids_round_trip_in_16_and_24_bits():
    small = torch.tensor([[0, 1, 32767], [5, 300, 7]])
    stored = cache_mod.encode_ids(small, "int16")
    assert set(stored) == {""} and stored[""].dtype == torch.int16
    assert torch.equal(cache_mod.decode_ids(stored[""], None), small)
    large = torch.tensor([[0, 32767, 32768], [65535, 65536, 151935], [2**24 - 1, 1, 99999]])
    stored = cache_mod.encode_ids(large, cache_mod.id_storage(151936))
    assert stored[""].dtype == torch.int16 and stored["_high"].dtype == torch.uint8
    assert torch.equal(cache_mod.decode_ids(stored[""], stored["_high"]), large)
    assert cache_mod.bytes_per_token(32, 151936) == 165
    assert cache_mod.bytes_per_token(32, 512) == 132
    with pytest.raises(CacheError, match="24-bit"):
        cache_mod.id_storage(2**24 + 1)


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
    targets = teacher(batch, aligned, batch["image_counts"].tolist())
    online = torch.log_softmax(targets.logits.float(), -1)
    visual = targets.visual

    cache = TeacherCache(cache_dir)
    ranks = cache_mod._ranks(aligned.batch_index, aligned.batch_size)
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


@pytest.mark.parametrize("representation", ["teacher_answer_hidden", "teacher_confidence"])
def test_cached_representations_equal_the_online_ones(
    representation, llava_pair, data_files, tmp_path
):
    raw = make_config(llava_pair, *data_files, tmp_path / "cache").model_dump()
    raw["channels"]["features"] = []
    raw["weighting"]["representation"] = representation
    config = cfg.validate(raw)
    write_teacher_cache(config, **{**WRITE, "shard_size": 6})
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
    )(batch, align_positions(batch, batch), batch["image_counts"].tolist())
    cache = TeacherCache(tmp_path / "cache")
    assert cache.contents["representation"] == representation
    assert cache.layout["representation_dim"] == online.representation.shape[1]
    cached = torch.stack([cache.sample(i).representation.float() for i in (0, 3)])
    torch.testing.assert_close(cached, online.representation, atol=3e-3, rtol=2e-3)


def test_cached_teacher_serves_aligned_dense_targets(written, llava_pair):
    cache_dir, config = written
    raw = config.model_dump()
    raw["teacher"].update(source="cache", path=None)
    cached_config = cfg.validate(raw)
    processor, model, adapter = teacher_parts(llava_pair[0])
    teacher = build_cached_teacher(
        cached_config, adapter, 512, "teacher_visual", tokenizer=processor
    )
    assert teacher.teacher_visual_dim == 64 and teacher.representation_dim == 64
    encoder = SampleEncoder(processor, adapter, config.data.max_length)
    dataset = build_dataset(config.data.train_file, config.data.image_folder, [encoder])
    batch = KDCollator(encoder)([dataset[i] for i in (4, 1, 5)])
    aligned = teacher.align(batch, batch["sample_index"], batch["sample_ids"])
    assert len(aligned) == int((batch["labels"][:, 1:] != -100).sum())
    targets = teacher(None, aligned, batch["image_counts"].tolist(), batch["sample_index"])
    assert targets.logits.shape == (len(aligned), 512)
    torch.testing.assert_close(targets.logits.exp().sum(-1), torch.ones(len(aligned)))
    assert [v.shape for v in targets.visual] == [torch.Size([16, 64])] * 3
    assert targets.representation.shape == (3, 64)

    broken = dict(batch)
    broken["input_ids"] = batch["input_ids"].clone()
    answer = (batch["labels"][1] != -100).nonzero()[0]
    broken["input_ids"][1, answer] = (broken["input_ids"][1, answer] + 1) % 500
    with pytest.raises(CacheError, match=r"sample s1 \(data row 1\): cached answer token 0"):
        teacher.align(broken, batch["sample_index"], batch["sample_ids"])


# --------------------------------------------------------------------------- validation


def test_changed_data_or_tokenizer_is_detected(written, llava_pair, data_files, tmp_path):
    cache_dir, config = written
    processor = models.load_processor(llava_pair[0])
    adapter = models.get_adapter(models.load_model(llava_pair[0]), processor)

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
        build_cached_teacher(cached(changed), adapter, 512, "teacher_visual", tokenizer=processor)

    other = models.load_processor(llava_pair[0])
    other.tokenizer.add_tokens(["<new-token>"])
    with pytest.raises(CacheError, match="tokenizer vocabulary"):
        build_cached_teacher(cached(data_files[0]), adapter, 512, "teacher_visual", tokenizer=other)

    # Writing into a folder that holds another data set's cache is refused.
    raw = config.model_dump()
    raw["data"]["train_file"] = str(changed)
    with pytest.raises(CacheError, match="data_sha256"):
        write_teacher_cache(cfg.validate(raw), **WRITE)


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
    real_save = cache_mod.save_shard_atomic
    saved = []

    def crash_on_second(tensors, path, metadata):
        if saved:
            # Killed mid-write: a partial temporary file, no shard.
            cache_mod._temp_name(path).write_bytes(b"partial")
            raise KeyboardInterrupt("simulated interruption")
        saved.append(path.name)
        real_save(tensors, path, metadata)

    monkeypatch.setattr(cache_mod, "save_shard_atomic", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(config, **WRITE)
    cache_dir = tmp_path / "cache"
    assert saved == ["shard-00000.safetensors"]
    assert not (cache_dir / INDEX_FILE).exists()
    assert cache_mod.leftover_temp_files(cache_dir)
    with pytest.raises(CacheError, match="interrupted run"):
        TeacherCache(cache_dir)

    computed = []
    real_call = cache_mod._TeacherRunner.__call__

    def counting(self, batch):
        computed.extend(batch["sample_ids"])
        return real_call(self, batch)

    monkeypatch.setattr(cache_mod, "save_shard_atomic", real_save)
    monkeypatch.setattr(cache_mod._TeacherRunner, "__call__", counting)
    write_teacher_cache(config, **WRITE)
    assert computed == ["s4", "s5"]  # only the missing shard ran
    assert not cache_mod.leftover_temp_files(cache_dir)
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
    from betakd.train import build_trainer, training_arguments

    raw = written[1].model_dump()
    raw["teacher"]["source"] = "cache"
    raw["training"]["output_dir"] = str(tmp_path / "out")
    cached = cfg.validate(raw)
    forbid_teacher_loading(monkeypatch, llava_pair[1])
    trainer = build_trainer(cached, training_arguments(cached))
    trainer.train()
    assert trainer.state.global_step == 3


def test_cli_writes_a_cache(llava_pair, data_files, tmp_path):
    from click.testing import CliRunner

    from betakd.cache_cli import cache_teacher_command

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
    assert cache.sample(0).visual is None
    with pytest.raises(CacheError, match=r"without visual tokens \(channels.features\)"):
        cache.check_contents(cache_mod.CacheContents(True, True, None))


def test_uncached_training_samples_are_named(written):
    cache = TeacherCache(written[0])
    cache.check_covers([0, 5], ["s0", "s5"])
    with pytest.raises(CacheError, match=r"lacks 1 training samples \(e.g. \['late'\]\)"):
        cache.check_covers([0, 17], ["s0", "late"])
