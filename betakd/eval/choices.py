"""Option-letter parsing shared by ScienceQA and MMBench.

The rules are LLaVA's ScienceQA rules: the whole answer is a letter, the
answer starts with "X. ", or it contains exactly one "The answer is X"
followed by one more character (the official pattern's unescaped "." matches
any character, so "The answer is B." and "The answer is B," count, while
"The answer is B" at the very end does not). A letter outside the question's
options, or no match, is unparsable and scores as wrong.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def option_letters(num_options: int) -> str:
    if not 1 <= num_options <= len(LETTERS):
        raise ValueError(f"number of options must be in 1..26, got {num_options}")
    return LETTERS[:num_options]


def parse_letter(text: str, num_options: int) -> str | None:
    """The option letter in `text`, or None when unparsable or out of range."""
    valid = option_letters(num_options)
    letter = _letter(text)
    return letter if letter is not None and letter in valid else None


def _letter(text: str) -> str | None:
    stripped = text.strip()
    if len(stripped) == 1 and stripped in LETTERS:
        return stripped
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None
