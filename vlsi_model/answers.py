"""Answer normalisation for exact-match scoring.

A model that answers "Two." or "The red one" to a question whose reference is "2" / "red"
is right; a scorer that compares raw strings would call it wrong and make accuracy depend
on punctuation habits. Normalising both sides the same way (VQA-style: lower case, no
punctuation, number words as digits, no leading article) keeps exact match strict about
content and lenient about form. Reference answers of the synthetic scenes are already in
normal form (`normalize_answer(ref) == ref`), so normalising them is a no-op.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
_DIGITS = {word: str(i) for i, word in enumerate(_NUMBER_WORDS)}
_ARTICLES = ("a", "an", "the")

# A '.' or ',' between digits is part of a number ("3.5", "1,000"); elsewhere punctuation
# separates words. Apostrophes join ("don't" -> "dont") so contractions stay one word.
_NUMBER_PUNCT = re.compile(r"(?<=\d)[.,](?=\d)")
_APOSTROPHES = re.compile(r"['\u2019`]")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: lower case, punctuation and extra spaces gone, number
    words zero..twenty as digits, one leading article ("a", "an", "the") dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    text = _NUMBER_PUNCT.sub(lambda m: "." if m.group(0) == "." else "", text)
    chars = []
    for i, ch in enumerate(text):
        keep_dot = ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        chars.append(" " if unicodedata.category(ch).startswith(("P", "S")) and not keep_dot else ch)
    words = _SPACES.sub(" ", "".join(chars)).strip().split(" ")
    words = [_DIGITS.get(w, w) for w in words if w]
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    """True when `prediction` and `reference` are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


__all__ = ["exact_match", "normalize_answer"]
