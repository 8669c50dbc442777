"""EvalAI answer normalisation: corner cases worked out by hand from its rules."""

import pytest

from betakd.eval import normalize_answer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),  # final period dropped
        ("Yes, it is", "yes it is"),  # comma dropped, words kept
        ("Two", "2"),  # number words become digits
        ("ten", "10"),
        ("none", "0"),  # the official table maps "none" to 0
        ("eleven", "eleven"),  # only zero..ten
        ("The cat", "cat"),  # articles removed
        ("a an the dog", "dog"),
        ("theater", "theater"),  # whole words only
        ("dont", "don't"),  # apostrophe restored
        ("youre", "you're"),
        ("couldnt've", "couldn't've"),
        ("its", "its"),  # also an ordinary word: not in the table
        ("It's red", "it 's red"),  # "'s" split off its word
        ("3.5", "3.5"),  # a period before a digit stays
        ("a.m.", "am"),  # other periods go
        ("1,000", "1000"),
        ("coca-cola", "coca cola"),  # "-" between letters becomes a space
        ("coca - cola", "coca cola"),  # "-" next to a space is deleted
        ("(left)", "left"),
        ("what?!", "what"),
        ("  Stop\tsign\n", "stop sign"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected
