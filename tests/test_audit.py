"""`betakd audit` on tiny models: a teacher with a planted blind slice and data with planted
wrong labels. The audit must name the slice, rank the wrong labels first, give the
training run's trust for the same samples, resume after a kill, and handle awkward
metadata and text-only data."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from kd_configs import kd_raw

from betakd import config as cfg
from betakd.audit import scores as audit_scores
from betakd.audit.run import AuditOptions, audit_config, audit_trainer
from betakd.build import build_trainer, training_arguments
from betakd.cli import main
from betakd.teachers import DenseLogits, TeacherTargets

COLOURS = ("red", "green", "blue")
PER_COLOUR = 16
BLIND = "blue"  # the teacher answers "red" on every blue image
# Swapped between red (i % 3 == 0) and green (i % 3 == 1), scattered over the data.
WRONG_LABELS = {"s0": "green", "s4": "red", "s18": "green", "s28": "red", "s39": "green"}


@pytest.fixture
def planted(tmp_path, llava_files):
    """48 single-colour images, one question each; five labels swapped between red and
    green; metadata: the colour, a field on half the records, unicode values, and a
    field with a value per record."""
    images = tmp_path / "images"
    records = []
    for i in range(PER_COLOUR * len(COLOURS)):
        colour = COLOURS[i % 3]
        llava_files.write_image(images / f"{colour}.png", colour)
        record = llava_files.record(f"s{i}", "What colour is the shape?", WRONG_LABELS.get(f"s{i}", colour), f"{colour}.png")  # fmt: skip
        record["meta"] = {"colour": colour, "city": ["Zürich", "東京", "São Paulo", "Oslo"][i % 4]}
        record["serial"] = f"n{i:04d}"
        if i % 2:
            record["region"] = "north"
        records.append(record)
    data = llava_files.write_records(tmp_path / "data.json", records)
    return data, images


class PlantedTeacher:
    """The real tiny teacher's visual tokens and h(x), with logits that give, per sample,
    a chosen answer: the true colour, except "red" on every blue image."""

    def __init__(self, source, answer_ids: dict[str, list[int]], vocab_rows: int):
        self.source = source
        self.answer_ids = answer_ids
        self.vocab_rows = vocab_rows

    def prepare(self, accelerator):
        self.source = self.source.prepare(accelerator)
        return self

    def __call__(self, student_batch, meta):
        aligned, targets = self.source(student_batch, meta)
        ids = aligned.token_ids.clone()
        for row, sample_id in enumerate(meta.sample_ids):
            rows = (aligned.batch_index == row).nonzero().flatten()
            want = torch.tensor(self.answer_ids[sample_id][: len(rows)])
            ids[rows[: len(want)]] = want
        logits = torch.zeros(len(ids), self.vocab_rows)
        logits[torch.arange(len(ids)), ids] = 12.0
        return aligned, TeacherTargets(DenseLogits(logits), targets.visual, targets.representation)


def label_ids(trainer) -> dict[str, list[int]]:
    """Each sample's answer token ids as the trainer aligns them."""
    dataset = trainer.train_dataset
    inputs, aligned, _, _ = trainer.loss_inputs(
        trainer.data_collator([dataset[i] for i in range(len(dataset))])
    )
    return {
        dataset[r].id: aligned.token_ids[aligned.batch_index == r].tolist()
        for r in range(len(dataset))
    }


def plant(trainer) -> None:
    """Replace the trainer's teacher by the planted one."""
    ids = label_ids(trainer)
    by_colour = {c: ids[f"s{COLOURS.index(c)}" if f"s{COLOURS.index(c)}" not in WRONG_LABELS else f"s{COLOURS.index(c) + 3}"] for c in COLOURS}  # fmt: skip
    answers = {}
    for sample_id in ids:
        colour = COLOURS[int(sample_id[1:]) % 3]
        answers[sample_id] = by_colour["red" if colour == BLIND else colour]
    trainer.teacher = PlantedTeacher(trainer.teacher, answers, trainer.model.vocab_rows)


def user_config(pair, data, images, tmp_path, **options):
    raw = kd_raw(pair, data, images, tmp_path / "run", "task", options or None)
    return cfg.validate(raw)


def audited(config, tmp_path, **options):
    derived = audit_config(config, tmp_path / "audit")
    trainer = build_trainer(derived, training_arguments(derived))
    plant(trainer)
    settings = AuditOptions(progress=False, **options)
    return audit_trainer(trainer, config, tmp_path / "audit", settings), trainer


def test_the_audit_names_the_blind_slice_and_the_wrong_labels(llava_pair, planted, tmp_path):
    config = user_config(llava_pair, *planted, tmp_path)
    result, _ = audited(config, tmp_path, top=10, part_size=8)
    teacher = result["teachers"]["teacher"]
    top = teacher["worst_slices"][0]
    assert (top["field"], top["value"]) == ("meta.colour", BLIND), teacher["worst_slices"][:3]
    assert top["p_teacher_right"] < 0.2 and top["agreement"] == 0.0
    others = [s for s in teacher["slices"]["meta.colour"]["slices"] if s["value"] != BLIND]
    assert all(s["p_teacher_right"] > 0.8 for s in others)
    # The planted wrong labels lead the label-error list: all five in its top five
    # (a random ranking puts 5 * 5 / 48, about half of one, there).
    top_five = [s["id"] for s in result["likely_label_errors"][:5]]
    assert set(top_five) == set(WRONG_LABELS), result["likely_label_errors"][:6]
    # ... and none of the blind slice's samples: the teacher is wrong there, not the label.
    blue = {f"s{i}" for i in range(2, 48, 3)}
    assert not blue & set(top_five)
    assert [s["id"] for s in teacher["likely_teacher_errors"][:16]] and all(
        s["id"] in blue for s in teacher["likely_teacher_errors"][:16]
    )
    # What a wrong label looks like in the report: the teacher answers the true colour.
    s0 = next(s for s in result["likely_label_errors"] if s["id"] == "s0")
    assert s0["label"] == "green" and s0["teacher_answers"]["teacher"].startswith("re")

    # Awkward metadata: absent on half the records, unicode, a value per record.
    region = {s["value"]: s["samples"] for s in teacher["slices"]["region"]["slices"]}
    assert region == {"north": 24, "(absent)": 24}
    cities = {s["value"] for s in teacher["slices"]["meta.city"]["slices"]}
    assert cities == {"Zürich", "東京", "São Paulo", "Oslo"}
    serial = teacher["slices"]["serial"]
    assert serial["distinct_values"] == 48 and serial["reported"] == 0
    report = (tmp_path / "audit" / "report.md").read_text(encoding="utf-8")
    assert "| meta.colour | blue |" in report and "São Paulo" in report
    assert "serial (48 values)" in report
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["samples_scored"] == 48
    lines = (tmp_path / "audit" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"s{i}" for i in range(48)]


def test_the_audit_gives_the_training_runs_trust(llava_pair, planted, tmp_path):
    config = user_config(llava_pair, *planted, tmp_path, trust={"reference": "data", "threshold": 2.0})  # fmt: skip
    result, _ = audited(config, tmp_path)
    trainer = build_trainer(config, training_arguments(config))
    plant(trainer)
    dataset = trainer.train_dataset
    with torch.no_grad():
        inputs = trainer.loss_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))  # fmt: skip
        nll, _ = trainer.distillation_module.reliability_inputs(*inputs)
    factors = trainer.head.objective.weighting.teacher_factors(nll, None)[:, 1]
    samples = result["teachers"]["teacher"]["likely_teacher_errors"] + result["likely_label_errors"]  # fmt: skip
    for sample in samples:
        row = [c.id for c in dataset].index(sample["id"])
        assert sample["trust"]["teacher"] == pytest.approx(float(factors[row]), rel=1e-6)
        assert sample["nll"]["teacher"] == pytest.approx(float(nll[row]), rel=1e-6)
    assert result["config"]["trust"] == "data trust"


def test_a_killed_audit_continues_where_it_stopped(llava_pair, planted, tmp_path, monkeypatch):
    config = user_config(llava_pair, *planted, tmp_path)
    reference, _ = audited(config, tmp_path / "straight", part_size=8)
    real = audit_scores.score_rows
    calls = []

    def killed_at_third_part(trainer, rows, teachers):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rows)
        return real(trainer, rows, teachers)

    monkeypatch.setattr(audit_scores, "score_rows", killed_at_third_part)
    with pytest.raises(KeyboardInterrupt):
        audited(config, tmp_path, part_size=8)
    calls.clear()
    monkeypatch.setattr(audit_scores, "score_rows", lambda *a: calls.append(a[1]) or real(*a))
    resumed, _ = audited(config, tmp_path, part_size=8)
    assert [r.start for r in calls] == [16, 24, 32, 40]  # the two finished parts were kept
    for key in ("likely_label_errors", "p_label_right_mean"):
        assert resumed[key] == reference[key]
    # Another config's audit into the same folder is refused, never mixed in.
    other = user_config(llava_pair, *planted, tmp_path, trust={"reference": "data"})
    with pytest.raises(audit_scores.AuditError, match="another config"):
        audited(cfg.validate({**other.model_dump(), "data": {**other.data.model_dump(), "max_length": 300}}), tmp_path, part_size=8)  # fmt: skip


def test_the_command_on_text_only_data_and_on_two_teachers(
    tiny_model_dir, llava_pair, planted, llava_files, tmp_path
):
    # Text-only: a causal LM pair, records without images.
    student, teacher = tiny_model_dir("llama", "student"), tiny_model_dir("llama", "teacher")
    records = [llava_files.record(f"t{i}", f"Say {w}.", w, None) for i, w in enumerate(["yes", "no"] * 10)]  # fmt: skip
    data = llava_files.write_records(tmp_path / "text.json", records)
    raw = kd_raw((student, teacher), data, None, tmp_path / "run", "task")
    path = tmp_path / "text.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["audit", str(path), "--output", str(tmp_path / "a1"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "audit of 20 samples" in result.output
    assert (tmp_path / "a1" / "report.md").is_file() and (
        tmp_path / "a1" / "teachers.png"
    ).is_file()

    # Two teachers (the same tiny model under two names): their answers never differ.
    data, images = planted
    raw = kd_raw(llava_pair, data, images, tmp_path / "run2", "task")
    one = {"path": str(llava_pair[1]), "channels": {"logits": [{"energy": "cosine_probs"}]}}
    raw.pop("teacher")
    raw["channels"] = {}
    raw["teachers"] = [{"name": "a", **one}, {"name": "b", **one}]
    path = tmp_path / "two.yaml"
    path.write_text(cfg.yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["audit", str(path), "--output", str(tmp_path / "a2"), "--no-progress", "--ignore-field", "meta"])  # fmt: skip
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a2" / "audit.json").read_text())
    assert set(audit["teachers"]) == {"a", "b"}
    assert audit["disagreement"]["disagree"] == 0
    assert not any(f.startswith("meta") for f in audit["teachers"]["a"]["slices"])
    assert "## Where the teachers disagree" in (tmp_path / "a2" / "report.md").read_text()


def test_bad_input_is_one_error_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "student: {path: /nowhere}\nteacher: {path: /nowhere}\ndata: {train_file: /no.json}\n"
        "channels: {logits: [{energy: cosine_probs}]}\n"
    )
    result = CliRunner().invoke(main, ["audit", str(path), "--output", str(tmp_path / "a")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "student.path" in result.output
