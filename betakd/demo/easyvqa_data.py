"""Convert the easy-VQA data set into the LLaVA format that ``betakd train`` reads.

The demo must exercise the same data path a user's data takes, so easy-VQA is written
once as LLaVA JSONL (``id``, ``image``, ``conversations``) plus an image folder. Two
kinds of controlled uncertainty are added and recorded per sample under ``meta`` so
the report can check what the learned weights react to:

* data-noisy samples: a share of the student's training answers is replaced by a wrong
  answer of the same question type (``meta.noisy``, ``meta.original_answer``);
* teacher-blind samples: every question about images in one slice (for example all red
  shapes) is left out of the teacher's training split but kept in the student's
  (``meta.blind``).

Layout written by :func:`build_demo_data` into ``out_dir``::

    images/train/<n>.png, images/test/<n>.png   (copies of the easy-VQA images)
    train_student.jsonl   student split: noisy answers injected, blind slice kept
    train_teacher.jsonl   teacher split: clean answers, blind slice removed
    test.jsonl            clean test questions, blind slice flagged
    manifest.json         config, counts and a key; a matching manifest means "done"
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from betakd.eval.easyvqa import import_easy_vqa
from betakd.files import write_text_atomic

# The easy-VQA generator draws shapes in exactly these RGB values, so an image's colour
# can be read from its pixels even when none of its questions names it.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
    "brown": (165, 42, 42),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
QTYPES: tuple[str, ...] = ("colour", "shape", "presence")
# Answers a wrong label may be drawn from, per question type.
ANSWERS_BY_QTYPE: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "presence": ("yes", "no"),
}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape")
# "word": easy-VQA's one-word answers; "sentence": a short description read from the
# pixels, "<size> <colour> shape on the <side>" (several answer tokens, for on-policy
# distillation, where a student's early mistakes can change what it says next).
ANSWER_FORMATS: tuple[str, ...] = ("word", "sentence")
SENTENCE_REQUEST = " Describe its size, colour and side."
# A shape is "large" from this bounding-box side (pixels of the 64x64 image): the
# median over easy-VQA's training images, so both sizes are about equally common.
LARGE_FROM = 20
FORMAT_VERSION = 1
_NEGATION = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class DemoDataConfig:
    """What the demo data looks like; every field changes the cache key."""

    # Question types kept. Presence (yes/no) questions let tiny models score by language
    # prior alone; shape questions stay near chance for CPU-sized models (measured).
    qtypes: tuple[str, ...] = ("colour",)
    # Share of student training answers replaced by a wrong answer of the same type.
    noise_rate: float = 0.2
    # The teacher's blind slice: images whose attribute equals the value. Not red: red
    # and brown are close in RGB and a short-trained student confuses them anyway.
    blind_attribute: str = "colour"
    blind_value: str | None = "blue"
    # Optional subsampling (None = all questions of the kept types).
    max_train: int | None = None
    max_test: int | None = None
    # Teacher trains on clean answers unless this is set.
    teacher_noisy: bool = False
    # Optional subsampling of the teacher's split (None = every question outside the slice).
    teacher_max_train: int | None = None
    seed: int = 0
    prompt_suffix: str = ""
    answer_format: str = "word"

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"DemoDataConfig.answer_format must be one of {ANSWER_FORMATS}, "
                f"got {self.answer_format!r}"
            )
        if self.answer_format != "word" and (self.noise_rate or self.teacher_noisy):
            raise ValueError("DemoDataConfig: noisy answers are defined for one-word answers only")
        unknown = set(self.qtypes) - set(QTYPES)
        if unknown or not self.qtypes:
            raise ValueError(f"DemoDataConfig.qtypes: unknown {sorted(unknown)}; use {QTYPES}")
        if not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"DemoDataConfig.noise_rate must be in [0, 1), got {self.noise_rate}")
        if self.blind_attribute not in ATTRIBUTES:
            raise ValueError(
                f"DemoDataConfig.blind_attribute must be one of {ATTRIBUTES}, "
                f"got {self.blind_attribute!r}"
            )
        allowed = COLOURS if self.blind_attribute == "colour" else SHAPES
        if self.blind_value is not None and self.blind_value not in allowed:
            raise ValueError(
                f"DemoDataConfig.blind_value {self.blind_value!r} is not a "
                f"{self.blind_attribute}; use one of {allowed}"
            )

    def key(self) -> str:
        """Short stable hash naming this configuration (and the format version)."""
        return _short_hash({"v": FORMAT_VERSION, **self._fields()})

    def _fields(self) -> dict:
        # The default answer format is left out, so that keys made before it existed hold.
        fields = asdict(self)
        if fields["answer_format"] == "word":
            del fields["answer_format"]
        return fields

    def teacher_key(self) -> str:
        """Hash of only the fields that change the teacher's split.

        The student's budget (max_train, noise) must not invalidate a cached teacher.
        """
        fields = {
            "v": FORMAT_VERSION,
            "qtypes": self.qtypes,
            "blind": [self.blind_attribute, self.blind_value],
            "teacher_max_train": self.teacher_max_train,
            "prompt_suffix": self.prompt_suffix,
        }
        if self.answer_format != "word":
            fields["answer_format"] = self.answer_format
        if self.teacher_noisy:
            fields["noise"] = self.noise_rate
        if self.teacher_noisy or self.teacher_max_train is not None:
            fields["seed"] = self.seed
        return _short_hash(fields)


def _short_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Sample:
    """One easy-VQA question with the facts the demo needs about it."""

    id: str
    split: str
    image_id: int
    question: str
    answer: str
    qtype: str
    colour: str
    shape: str
    original_answer: str = ""
    noisy: bool = False
    blind: bool = False
    extra: dict = field(default_factory=dict)

    def to_llava(self, prompt_suffix: str = "") -> dict:
        """The LLaVA conversation record, with the demo facts under ``meta``."""
        human = f"<image>\n{self.question}{prompt_suffix}"
        return {
            "id": self.id,
            "image": f"{self.split}/{self.image_id}.png",
            "conversations": [
                {"from": "human", "value": human},
                {"from": "gpt", "value": self.answer},
            ],
            "meta": {
                "qtype": self.qtype,
                "noisy": self.noisy,
                "original_answer": self.original_answer or self.answer,
                "blind": self.blind,
                "colour": self.colour,
                "shape": self.shape,
                **self.extra,
            },
        }


# ----------------------------------------------------------------------------- parsing


def question_type(question: str, answer: str | None = None) -> str:
    """'colour', 'shape' or 'presence', from the question text (answer as a cross-check)."""
    q = question.lower()
    if q.startswith(("what color", "what is the color")):
        qtype = "colour"
    elif q.startswith(("what shape", "what is the")):
        qtype = "shape"
    elif q.startswith(("is ", "does ")):
        qtype = "presence"
    else:
        raise ValueError(f"easy-VQA question of unknown type: {question!r}")
    if answer is not None and answer not in ANSWERS_BY_QTYPE[qtype]:
        raise ValueError(f"answer {answer!r} does not fit {qtype} question {question!r}")
    return qtype


def presence_fact(question: str, answer: str) -> tuple[str, bool]:
    """For a yes/no question, the attribute word it asks about and whether it is present."""
    words = re.findall(r"[a-z]+", question.lower())
    targets = [w for w in words if w in PALETTE or w in SHAPES]
    if len(targets) != 1:
        raise ValueError(f"presence question names no single colour/shape: {question!r}")
    negated = bool(_NEGATION.search(question.lower()))
    return targets[0], (answer == "yes") != negated


def pixel_attributes(path: str | os.PathLike) -> tuple[str, str]:
    """(colour, shape) read from the pixels of an easy-VQA image.

    The colour is the palette colour with the most exactly matching pixels. The shape
    comes from how much of its bounding box the shape fills: a rectangle fills all of
    it, a circle about pi/4 (0.70-0.81 measured), a triangle about half (0.50-0.68).
    Only used for the shape when the questions do not settle it.
    """
    rgb = np.asarray(Image.open(path).convert("RGB"))
    masks = {name: np.all(rgb == value, axis=-1) for name, value in PALETTE.items()}
    colour = max(masks, key=lambda name: int(masks[name].sum()))
    mask = masks[colour]
    if not mask.any():
        raise ValueError(f"{path}: no pixel of any easy-VQA palette colour")
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
    return colour, shape


def pixel_layout(path: str | os.PathLike) -> tuple[str, str]:
    """(size, side) of the shape in an easy-VQA image: "large" when its bounding box is at
    least LARGE_FROM pixels on a side, else "small"; "left" when the box's centre is left
    of the image's, else "right"."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    masks = [np.all(rgb == value, axis=-1) for value in PALETTE.values()]
    mask = max(masks, key=lambda m: int(m.sum()))
    if not mask.any():
        raise ValueError(f"{path}: no pixel of any easy-VQA palette colour")
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    centre = (xs.min() + xs.max()) / 2
    return (
        "large" if side >= LARGE_FROM else "small",
        "left" if centre < (rgb.shape[1] - 1) / 2 else "right",
    )


def as_sentences(samples: Sequence[Sample], paths: dict[int, str]) -> list[Sample]:
    """The samples asking for, and answered with, the sentence description of their
    image (see ANSWER_FORMATS); the size and side go to ``meta``."""
    layouts = {i: pixel_layout(paths[i]) for i in sorted({s.image_id for s in samples})}
    result = []
    for sample in samples:
        size, side = layouts[sample.image_id]
        answer = f"{size} {sample.colour} shape on the {side}"
        result.append(
            replace(
                sample,
                question=sample.question + SENTENCE_REQUEST,
                answer=answer,
                original_answer=answer,
                extra={**sample.extra, "size": size, "side": side},
            )
        )
    return result


def infer_shapes(questions: Iterable[tuple[str, str, int]]) -> dict[int, str]:
    """Each image's shape, from shape answers and from yes/no facts by elimination."""
    known: dict[int, str] = {}
    excluded: dict[int, set[str]] = {}
    for question, answer, image_id in questions:
        qtype = question_type(question, answer)
        if qtype == "shape":
            known[image_id] = answer
        elif qtype == "presence":
            target, present = presence_fact(question, answer)
            if target in SHAPES:
                if present:
                    known[image_id] = target
                else:
                    excluded.setdefault(image_id, set()).add(target)
    for image_id, gone in excluded.items():
        left = [s for s in SHAPES if s not in gone]
        if image_id not in known and len(left) == 1:
            known[image_id] = left[0]
    return known


@functools.lru_cache(maxsize=2)
def _pixel_attributes_of(split: str, paths: tuple) -> dict[int, tuple[str, str]]:
    # Reading 5,000 PNGs takes seconds; cached because data and tokenizer both need it.
    return {image_id: pixel_attributes(path) for image_id, path in paths}


def load_easyvqa(split: str) -> tuple[list[Sample], dict[int, str]]:
    """All questions of one easy-VQA split as samples, and the image paths by id."""
    easy_vqa = import_easy_vqa()

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    triples = list(zip(questions, answers, image_ids))
    pixels = _pixel_attributes_of(split, tuple(sorted(paths.items())))
    colours = {image_id: colour for image_id, (colour, _) in pixels.items()}
    # The questions are the ground truth for shapes; pixels fill in the rest.
    shapes = {image_id: shape for image_id, (_, shape) in pixels.items()}
    shapes.update(infer_shapes(triples))
    samples = [
        Sample(
            id=f"{split}-{n:05d}",
            split=split,
            image_id=int(image_id),
            question=question,
            answer=answer,
            original_answer=answer,
            qtype=question_type(question, answer),
            colour=colours[image_id],
            shape=shapes[image_id],
        )
        for n, (question, answer, image_id) in enumerate(triples)
    ]
    return samples, {int(k): v for k, v in paths.items()}


# ------------------------------------------------------------------- uncertainty controls


def in_blind_slice(sample: Sample, attribute: str, value: str | None) -> bool:
    """Whether the sample's image falls into the teacher's blind slice."""
    return value is not None and getattr(sample, attribute) == value


def inject_noise(samples: Sequence[Sample], rate: float, seed: int) -> list[Sample]:
    """Replace ``round(rate * n)`` answers, chosen at random, by a wrong same-type answer.

    Returns new samples; the originals are left untouched, so the clean split stays
    available for the teacher.
    """
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(samples)), round(rate * len(samples))))
    out = []
    for index, sample in enumerate(samples):
        copy = Sample(**{**sample.__dict__, "extra": dict(sample.extra)})
        if index in chosen:
            wrong = [a for a in ANSWERS_BY_QTYPE[sample.qtype] if a != sample.answer]
            copy.answer = rng.choice(wrong)
            copy.noisy = True
        out.append(copy)
    return out


def subsample(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded random subset of at most ``limit`` samples, in original order."""
    if limit is None or limit >= len(samples):
        return list(samples)
    keep = set(random.Random(seed).sample(range(len(samples)), limit))
    return [s for i, s in enumerate(samples) if i in keep]


def make_splits(
    train: Sequence[Sample], test: Sequence[Sample], config: DemoDataConfig
) -> dict[str, list[Sample]]:
    """The student, teacher and test splits that ``config`` describes.

    ``max_train`` subsamples the student's split only: the teacher learns from every
    training question outside its blind slice, so it can really be better than the
    student (more and clean labels), and its cached weights do not depend on the
    student's budget.
    """
    train = [s for s in train if s.qtype in config.qtypes]
    test = subsample(
        [s for s in test if s.qtype in config.qtypes], config.max_test, config.seed + 1
    )
    for sample in (*train, *test):
        sample.blind = in_blind_slice(sample, config.blind_attribute, config.blind_value)
    student = subsample(train, config.max_train, config.seed)
    # Noise after subsampling, so the student's noisy share is exactly noise_rate.
    student = inject_noise(student, config.noise_rate, config.seed + 2)
    teacher_pool = (
        inject_noise(train, config.noise_rate, config.seed + 3) if config.teacher_noisy else train
    )
    teacher = subsample(
        [s for s in teacher_pool if not s.blind], config.teacher_max_train, config.seed + 4
    )
    return {"train_student": student, "train_teacher": teacher, "test": list(test)}


# ------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class DemoData:
    """Where the converted data lies."""

    root: Path
    image_folder: Path
    train_student: Path
    train_teacher: Path
    test: Path
    manifest: dict

    @classmethod
    def at(cls, root: Path, manifest: dict) -> DemoData:
        return cls(
            root=root,
            image_folder=root / "images",
            train_student=root / "train_student.jsonl",
            train_teacher=root / "train_teacher.jsonl",
            test=root / "test.jsonl",
            manifest=manifest,
        )


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    # Atomic, so an interrupted run never leaves a half file.
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (helper for tests, the teacher script and the report)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _copy_images(paths: dict[int, str], folder: Path, needed: set[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in sorted(needed):
        target = folder / f"{image_id}.png"
        if not target.exists():
            shutil.copyfile(paths[image_id], target)


def _read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a broken manifest means "rebuild", not "fail"


def build_demo_data(out_dir: str | os.PathLike, config: DemoDataConfig | None = None) -> DemoData:
    """Write the demo data into ``out_dir`` unless a matching build is already there."""
    config = config or DemoDataConfig()
    root = Path(out_dir)
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("key") == config.key():
        return DemoData.at(root, manifest)

    root.mkdir(parents=True, exist_ok=True)
    train, train_paths = load_easyvqa("train")
    test, test_paths = load_easyvqa("test")
    if config.answer_format == "sentence":
        train = [s for s in train if s.qtype in config.qtypes]
        test = [s for s in test if s.qtype in config.qtypes]
        train, test = as_sentences(train, train_paths), as_sentences(test, test_paths)
    splits = make_splits(train, test, config)
    _copy_images(
        train_paths,
        root / "images" / "train",
        {s.image_id for name in ("train_student", "train_teacher") for s in splits[name]},
    )
    _copy_images(test_paths, root / "images" / "test", {s.image_id for s in splits["test"]})
    for name, samples in splits.items():
        _write_jsonl(root / f"{name}.jsonl", (s.to_llava(config.prompt_suffix) for s in samples))

    manifest = {
        "key": config.key(),
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "counts": {name: len(samples) for name, samples in splits.items()},
        "noisy": sum(s.noisy for s in splits["train_student"]),
        "blind": {name: sum(s.blind for s in samples) for name, samples in splits.items()},
    }
    # Written last: its presence with the right key is what marks the build complete.
    text = json.dumps(manifest, indent=2)
    (root / "manifest.json").write_text(text)
    return DemoData.at(root, json.loads(text))  # the same form a cached build returns


# ---------------------------------------------------------------------------- tokenizer


def corpus_texts(samples: Iterable[Sample]) -> list[str]:
    """Questions and answers the tokenizer is trained on (every answer, never noisy-only)."""
    texts = []
    for sample in samples:
        texts.append(sample.question)
        texts.append(sample.original_answer or sample.answer)
    texts.extend(a for answers in ANSWERS_BY_QTYPE.values() for a in answers)
    return texts


def train_demo_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train the offline tokenizer on easy-VQA text and save it; reuse a saved one.

    Uses :func:`betakd.testing.tiny_tokenizer.train_tokenizer` so that the demo models get
    the same special tokens and chat template as every other tiny model. Byte-level BPE keeps
    any user text encodable; a few hundred tokens are enough because easy-VQA has about
    50 distinct words, each of which becomes one token.
    """
    from transformers import PreTrainedTokenizerFast

    from betakd.testing.tiny_tokenizer import train_tokenizer

    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    train, _ = load_easyvqa("train")
    tokenizer = train_tokenizer(corpus_texts(train), vocab_size=vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)  # a folder without tokenizer.json is an interrupted save
    os.replace(tmp, out)
    return PreTrainedTokenizerFast.from_pretrained(str(out))
