"""The EvalAI / VQA answer normalisation, reimplemented from its documented rules.

Applied to both the prediction and every reference answer before comparing
(TextVQA soft accuracy, easy-VQA exact match). Steps, in the official order:

1. lower-case; drop "," and "?"; split "'s" off its word ("it's" -> "it 's").
2. newlines and tabs become spaces; strip.
3. punctuation: each mark in `PUNCTUATION` is deleted when the original text
   has it next to a space (or the text contains a digit-comma-digit group),
   otherwise replaced by a space; then every "." not followed by a digit is
   deleted (so "3.5" keeps its point, "a.m." becomes "am").
4. per word: number words zero..ten (and "none") become digits; the articles
   a / an / the are dropped; contractions written without their apostrophe
   ("dont", "youre") get it back.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# The contractions the official table restores. Its keys are these words with
# exactly one apostrophe removed ("couldn't've" <- "couldnt've", "couldn'tve");
# words that are also ordinary words without the apostrophe ("we'll" / "well",
# "it's" / "its", "she'd" / "shed") are not in it. The official table spells
# "I'm", "I've", "I'd've" with a capital I, so they never match lower-cased
# text; they are left out here for the same result.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at "
    "shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've "
    "'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've"
).split()


def _without_one_apostrophe(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i, char in enumerate(word) if char == "'"]


CONTRACTIONS = {
    variant: word for word in _CONTRACTIONS for variant in _without_one_apostrophe(word)
}

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period is dropped unless a digit follows (decimal points survive). The
# official pattern also carries a mistyped look-behind that never applies.
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the EvalAI VQA evaluator does (see module doc)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    return _normalize_words(text)


def _strip_punctuation(text: str) -> str:
    # The decision per mark looks at the text as it was before any mark was
    # touched; that is the official behaviour.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if spaced or delete_all else " ")
    return _PERIOD.sub("", result)


def _normalize_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)
