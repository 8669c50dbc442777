"""LLaVA question files: one JSON object per line with `question_id`, `image`, `text`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from betakd.eval.records import EvalDataError, iter_jsonl
from betakd.eval.samples import Sample, as_sample, with_suffix


def read_question_file(
    path: Path, image_dir: Path, suffix: str | None, *, unique_ids: bool = True
) -> list[Sample]:
    """Samples from a question JSONL; images resolve against `image_dir`.

    `suffix` is the benchmark's answer-format instruction, appended unless the
    question text already ends with it. A record without `image` is text-only.
    `unique_ids=False` is for files whose ids are not question ids (TextVQA's
    LLaVA file uses image ids); the caller then assigns unique ids.
    """
    samples = []
    seen: set[str] = set()
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        sample = as_sample(record, where)
        if unique_ids and sample.question_id in seen:
            raise EvalDataError(f"{where}: duplicate question_id {sample.question_id!r}")
        seen.add(sample.question_id)
        samples.append(
            replace(
                sample,
                text=with_suffix(sample.text, suffix) if suffix else sample.text,
                image=image_dir / sample.image if sample.image else None,
            )
        )
    return samples
