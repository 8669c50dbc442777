"""Predictions and question files: errors name the file and line."""

import json

import pytest

from betakd.eval import load_predictions
from betakd.eval.records import EvalDataError, drop_torn_last_line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n', r":2: invalid JSON"),
        ('{"question_id": 1}\n', r":1: missing field 'text'"),
        ("[1, 2]\n", r":1: expected a JSON object"),
        (
            '{"question_id": 1, "text": "a"}\n\n{"question_id": "1", "text": "b"}\n',
            r":3: duplicate question_id '1'",
        ),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "preds.jsonl"
    path.write_text(content)
    with pytest.raises(EvalDataError, match=r"preds\.jsonl" + message):
        load_predictions(path)


def test_sources_agree(tmp_path):
    records = [{"question_id": 1, "text": "a"}, {"question_id": "x", "text": "b"}]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = {"1": "a", "x": "b"}
    assert load_predictions(path) == expected
    assert load_predictions(records) == expected
    assert load_predictions({1: "a", "x": "b"}) == expected


def test_drop_torn_last_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    drop_torn_last_line(path)
    assert path.read_text() == '{"question_id": 1, "text": "a"}\n'
    drop_torn_last_line(path)  # a complete file is left alone
    assert path.read_text() == '{"question_id": 1, "text": "a"}\n'
