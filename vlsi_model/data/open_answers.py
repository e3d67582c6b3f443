"""Answers with many valid forms (the study's R-open regime), and the scoring that sees through them.

Why: where every question has one right string, a teacher's soft targets say little beyond its
hard labels (the earlier studies measured 0.15 nats of teacher entropy). Real VLM answers come
in many equally right forms: synonyms, lists in any order, numbers as digits or words. There a
teacher's distribution is wide, and distillation is known to matter (Menon et al. 2021). This
module rewrites the synthetic scenes' answers into such forms and scores answers by content:

- `open_form(answer, family, rng)`: colour / shape / size words replaced by one of 2-3 synonyms,
  counts as digits or words, captions and "where is each object" lists in a random object
  order, joined with commas and a final "and" (`open_records` rewrites a dataset's records,
  `vlsi data scenes --open-forms` and `vlsi data open-forms` whole datasets);
- `canonical(answer)`: synonyms mapped back, number words to digits, list items sorted, so any
  two forms of one content are equal (`canonical_match`);
- `set_f1(prediction, reference)`: F1 of the items a list answer names, so a caption with one
  object wrong still earns most of its credit (`vlsi eval --open-forms` reports both).

Copying the teacher's wording earns nothing under these metrics: only content counts.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from vlsi_model.answers import normalize_answer
from vlsi_model.data.scenes import ALL_SHAPES, SHAPES

SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "navy"),
    "yellow": ("yellow", "golden", "amber"),
    "purple": ("purple", "violet", "lilac"),
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "arrowhead"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
CANONICAL: dict[str, str] = {form: word for word, forms in SYNONYMS.items() for form in forms}
CANONICAL.update({form + ("es" if form.endswith("x") else "s"): shape + "s"  # plural shapes
                  for shape in SHAPES for form in SYNONYMS[shape]})
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LIST_FAMILIES = ("caption", "positions")
ORDERED_FAMILIES = ("describe",)  # answers whose item order is content (left to right)
_SPLIT = re.compile(r",|\band\b", re.IGNORECASE)
_ARTICLES = ("a", "an", "the")


def _synonym(word: str, rng: random.Random) -> str:
    return rng.choice(SYNONYMS[word]) if word in SYNONYMS else word


def _objects(words: list[str]) -> list[list[str]]:
    """Split a caption's words into objects: each object ends at a shape word."""
    items, current = [], []
    for word in words:
        current.append(word)
        if word in ALL_SHAPES:
            items.append(current)
            current = []
    if current:
        items.append(current)
    return items


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def open_form(answer: str, family: str, rng: random.Random) -> str:
    """One random valid form of a synthetic scene's `answer` to a question of `family`."""
    text = answer.strip()
    if family == "caption":
        items = [" ".join(_synonym(w, rng) for w in obj) for obj in _objects(text.split())]
        rng.shuffle(items)
        return _join(items) if items else text
    if family == "positions":
        items = [" ".join(_synonym(w, rng) for w in item.split()) for item in text.split(", ")]
        rng.shuffle(items)
        return _join(items)
    if text.isdigit() and int(text) < len(NUMBER_WORDS):
        return rng.choice((text, NUMBER_WORDS[int(text)]))
    return " ".join(_synonym(w, rng) for w in text.split())


def choice_entropy(answer: str, family: str) -> float:
    """Nats of randomness `open_form` adds to `answer` (at most): ln k! for the order of a list of
    k items, ln(synonyms) per rewritable word, ln 2 for a count. An upper bound on the entropy of
    the forms (two choices can give one string), so a teacher that learned the forms perfectly
    has at most this much entropy over the answer's tokens: the yardstick for its measured one."""
    text = answer.strip()
    if family in LIST_FAMILIES:
        parts = _objects(text.split()) if family == "caption" else [p.split() for p in text.split(", ")]
        return math.lgamma(len(parts) + 1) + sum(math.log(len(SYNONYMS[w])) for p in parts for w in p
                                                 if w in SYNONYMS)
    if text.isdigit() and int(text) < len(NUMBER_WORDS):
        return math.log(2)
    return sum(math.log(len(SYNONYMS[w])) for w in text.split() if w in SYNONYMS)


def canonical(answer: str, family: str | None = None) -> str:
    """The content of an answer in one form: synonyms mapped back, numbers as digits, articles
    dropped, list items (comma / "and" separated, or a caption's objects run together) sorted.

    `family`: items keep their order in a family whose order is content (ORDERED_FAMILIES:
    `describe` lists the objects left to right); any other, or None, sorts them."""
    items = []
    for part in _SPLIT.split(answer):
        words = [CANONICAL.get(w, w) for w in normalize_answer(part).split()]
        objects = _objects(words) if sum(w in ALL_SHAPES for w in words) > 1 else [words]  # run together
        for obj in objects:
            obj = obj[1:] if len(obj) > 1 and obj[0] in _ARTICLES else obj
            if obj:
                items.append(" ".join(obj))
    return ", ".join(items if family in ORDERED_FAMILIES else sorted(items))


def canonical_match(prediction: str, reference: str, family: str | None = None) -> bool:
    """Whether two answers say the same (see `canonical`; `family` decides whether order counts)."""
    return canonical(prediction, family) == canonical(reference, family)


def named_items(answer: str) -> Counter[str]:
    """The items a list answer names, in canonical form (a multiset): "red circle" in a caption,
    "red circle top left" in a positions answer."""
    return Counter(item for item in canonical(answer).split(", ") if item)


def set_f1(prediction: str, reference: str) -> float:
    """F1 over the items named (1.0 when both name none): a caption with one object of five wrong
    earns 0.8, where exact match gives 0."""
    pred, ref = named_items(prediction), named_items(reference)
    if not pred and not ref:
        return 1.0
    hit = sum((pred & ref).values())
    if hit == 0:
        return 0.0
    precision, recall = hit / sum(pred.values()), hit / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _content_groups(rows: list[dict[str, Any]], group_of: Any, top: int = 3) -> dict[str, dict[str, Any]]:
    """Per group of rows: content-match accuracy, and the prior / majority answer / most frequent
    predictions counted on canonical forms (so "red" and "crimson" are one answer, as they must be
    for a prior or a constant-answer check)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = group_of(row)
        if key is not None:
            groups.setdefault(key, []).append(row)
    out = {}
    for key, members in sorted(groups.items()):
        refs = Counter(canonical(r["reference"], r["family"]) for r in members)
        preds = Counter(canonical(r["prediction"], r["family"]) for r in members)
        right = sum(bool(r["content_match"]) for r in members)
        majority, count = refs.most_common(1)[0]
        out[key] = {"accuracy": right / len(members), "n": len(members), "correct": right,
                    "prior": count / len(members), "majority_answer": majority,
                    "top_predictions": [[a, c] for a, c in preds.most_common(top)]}
    return out


def score_content(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Content scores of evaluated rows ({"family", "question", "reference", "prediction"}; `vlsi
    eval`'s): canonical-match accuracy overall, per family and per question template (with priors
    and top predictions on canonical forms), and the mean set-F1 of the list families. Each row
    gains "content_match"."""
    from vlsi_model.data.question_families import question_type
    f1s = []
    for row in rows:
        row["content_match"] = canonical_match(row["prediction"], row["reference"], row["family"])
        if row["family"] in LIST_FAMILIES:
            f1s.append(set_f1(row["prediction"], row["reference"]))
    right, n = sum(bool(r["content_match"]) for r in rows), len(rows)
    families = _content_groups(rows, lambda r: r["family"])
    return {
        "accuracy": right / n if n else 0.0, "n": n, "correct": right,
        "families": {name: f["accuracy"] for name, f in families.items()},
        "family_details": families,
        "question_types": _content_groups(rows, lambda r: question_type(r.get("question", ""))),
        "list_set_f1": sum(f1s) / len(f1s) if f1s else None, "list_n": len(f1s),
    }


def open_records(records: list[dict[str, Any]], seed: int | str = 0) -> list[dict[str, Any]]:
    """Records whose answers are rewritten in a random valid form (seeded per record); the
    original answer is kept under "canonical_answer" for scoring."""
    out = []
    for i, record in enumerate(records):
        rng = random.Random(f"{seed}:{i}")
        convs = [dict(c) for c in record["conversations"]]
        original = convs[1]["value"]
        convs[1]["value"] = open_form(original, str(record.get("family", "")), rng)
        out.append({**record, "conversations": convs, "canonical_answer": original})
    return out


def write_open_forms(data: Path, out: Path, seed: int | str = 0) -> int:
    """Write `data` (a LLaVA JSON/JSONL file with "family" fields) to `out` with its answers in open
    forms; relative image paths are rewritten for `out`'s folder. Returns the record count."""
    from vlsi_model.data.llava import read_records

    records = open_records(read_records(data), seed=seed)
    for record in records:
        image = record.get("image")
        if isinstance(image, str) and not os.path.isabs(image):
            record["image"] = os.path.relpath(data.parent.resolve() / image, out.parent.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n" if records else "[]\n")
    os.replace(tmp, out)
    return len(records)
