"""Question families about a synthetic scene, with their exact answers.

Each family (attribute, count, exist, spatial, compare, describe, caption, locate, positions) has
an asker that builds a question from the scene's objects and computes its answer alongside, and
asks only when the answer is unambiguous. `question_type` names the template a question came
from, so evaluation can report each template beside its answer prior. The tokenizer corpus
(`corpus_texts`) lives here too: it is the questions and answers of train scenes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlsi_model.data.scenes import (
    ALL_SHAPES,
    COLOR_RGB,
    SIZES,
    STREAM_QUESTIONS,
    Scene,
    SceneObject,
    generate_scene,
    pick_one,
    scene_rng,
    scene_seed,
)

# New families go at the end: a family's question stream is seeded by its index here, so appending
# one leaves the questions of the other families unchanged (a caller that asks for every family, the
# default, also gets the new one's).
FAMILIES: tuple[str, ...] = (
    "attribute", "count", "exist", "spatial", "compare", "describe", "caption", "locate", "positions",
)
# The families of the tokenizer corpus (`corpus_texts`): those the shipped tokenizers were trained
# on. A family added later is encoded with the existing merges (byte-level BPE covers any text);
# adding it here would change every merge and stop the reproduction scripts reproducing them.
TOKENIZER_FAMILIES: tuple[str, ...] = FAMILIES[:7]

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

DESCRIBE_QUESTION = "Describe the image in one sentence."
CAPTION_QUESTION = "What objects are there?"
POSITIONS_QUESTION = "Where is each object?"
EMPTY_CAPTION = "nothing"

# Spatial questions need centres this many times the larger radius apart along the axis.
SPATIAL_MIN_SEPARATION = 1.5
# "Where is the red circle?" answers "<row> <column>" by thirds of the frame: row in ROWS_THIRDS,
# column in COLUMNS_THIRDS ("top left", "middle center", "bottom right").
ROWS_THIRDS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS_THIRDS: tuple[str, ...] = ("left", "center", "right")
# An object whose centre lies closer than this fraction of the frame to a third's border has no
# unambiguous answer and is never asked about. The nano data's 4x4 and 4x3 grids (and 3x3) put no
# cell centre that close; finer grids do (a 5x5 grid's second column is centred at 0.30).
LOCATE_MARGIN = 0.04


@dataclass(frozen=True)
class QA:
    """A question with its exact short answer and the family it belongs to."""

    question: str
    answer: str
    family: str


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.x, o.y, o.shape, o.color))


def describe_scene(scene: Scene) -> str:
    """One sentence listing every object left to right with size, colour and shape."""
    objs = _left_to_right(scene)
    if not objs:
        return "There are no objects."
    items = [f"{_article(o.size)} {o.size} {o.color} {o.shape}" for o in objs]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if len(objs) == 1:
        return f"There is one object: {listing}."
    return f"There are {_number_word(len(objs))} objects: {listing}."


def caption_objects(scene: Scene) -> str:
    """Dense caption "red circle blue square": objects left to right by x centre.

    The small-model study found this caption task is what gets VQA training off chance, so
    it is its own question family (`caption`).
    """
    objs = _left_to_right(scene)
    return " ".join(f"{o.color} {o.shape}" for o in objs) if objs else EMPTY_CAPTION


def _vocab(scene: Scene) -> tuple[list[str], list[str]]:
    """Shape and colour words questions may use: the scene's vocabularies plus anything present."""
    shapes = list(scene.shapes) + [o.shape for o in scene.objects if o.shape not in scene.shapes]
    colors = list(scene.colors) + [o.color for o in scene.objects if o.color not in scene.colors]
    return list(dict.fromkeys(shapes)), list(dict.fromkeys(colors))


def _unique_pairs(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names unambiguously."""
    pairs = Counter((o.shape, o.color) for o in scene.objects)
    return [o for o in scene.objects if pairs[(o.shape, o.color)] == 1]


def attribute_questions(scene: Scene) -> dict[str, list[QA]]:
    """Every attribute question the scene allows, by the attribute asked ("color", "shape",
    "size"), each naming its object unambiguously. The data generator draws from these; the
    representation probe (benchmarks/probe_representations.py) asks all of them."""
    shape_n = Counter(o.shape for o in scene.objects)
    color_n = Counter(o.color for o in scene.objects)
    objs = scene.objects
    return {
        "color": [QA(f"What color is the {o.shape}?", o.color, "attribute") for o in objs if shape_n[o.shape] == 1],
        "shape": [QA(f"What shape is the {o.color} object?", o.shape, "attribute") for o in objs
                  if color_n[o.color] == 1],
        "size": [QA(f"What size is the {o.color} {o.shape}?", o.size, "attribute") for o in _unique_pairs(scene)],
    }


def _ask_attribute(scene: Scene, rng: np.random.Generator) -> QA | None:
    kinds = [k for k in attribute_questions(scene).values() if k]
    return pick_one(rng, pick_one(rng, kinds)) if kinds else None


def _ask_count(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    objs = scene.objects
    present_shapes = list(dict.fromkeys(o.shape for o in objs))
    present_colors = list(dict.fromkeys(o.color for o in objs))
    present_pairs = list(dict.fromkeys((o.color, o.shape) for o in objs))

    def choose(present: list[Any], everything: list[Any]) -> Any:
        # Mostly present things, so "0" is a real but not dominant answer.
        return pick_one(rng, present) if present and rng.random() < 0.75 else pick_one(rng, everything)

    kind = int(rng.integers(4))
    if kind == 0:
        shape = choose(present_shapes, shapes)
        n = sum(o.shape == shape for o in objs)
        return QA(f"How many {_plural(shape)} are there?", str(n), "count")
    if kind == 1:
        color = choose(present_colors, colors)
        n = sum(o.color == color for o in objs)
        return QA(f"How many {color} objects are there?", str(n), "count")
    if kind == 2:
        color, shape = choose(present_pairs, [(c, s) for c in colors for s in shapes])
        n = sum(o.color == color and o.shape == shape for o in objs)
        return QA(f"How many {color} {_plural(shape)} are there?", str(n), "count")
    return QA("How many objects are there?", str(len(objs)), "count")


def _ask_exist(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    present = list(dict.fromkeys((o.color, o.shape) for o in scene.objects))
    absent = [(c, s) for c in colors for s in shapes if (c, s) not in present]
    # Half of the "no" questions reuse a present colour or shape, so colour-shape binding matters.
    hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    want_yes = bool(rng.random() < 0.5)
    if (want_yes and present) or not absent:
        if not present:
            return None
        (color, shape), answer = pick_one(rng, present), "yes"
    else:
        pool = hard if hard and rng.random() < 0.5 else absent
        (color, shape), answer = pick_one(rng, pool), "no"
    return QA(f"Is there {_article(color)} {color} {shape}?", answer, "exist")


_RELATIONS: tuple[tuple[str, int, int], ...] = (
    # (phrase, axis 0 = x / 1 = y, sign: +1 when "A rel B" means A's coordinate is smaller)
    ("left of", 0, 1),
    ("right of", 0, -1),
    ("above", 1, 1),
    ("below", 1, -1),
)


def _ask_spatial(scene: Scene, rng: np.random.Generator) -> QA | None:
    named = _unique_pairs(scene)
    by_answer: dict[str, list[QA]] = {"yes": [], "no": []}
    for a in named:
        for b in named:
            if a is b:
                continue
            for phrase, axis, sign in _RELATIONS:
                delta = (b.x - a.x) if axis == 0 else (b.y - a.y)  # > 0: A has the smaller coordinate
                if abs(delta) <= SPATIAL_MIN_SEPARATION * max(a.radius, b.radius):
                    continue
                answer = "yes" if delta * sign > 0 else "no"
                question = f"Is the {a.color} {a.shape} {phrase} the {b.color} {b.shape}?"
                by_answer[answer].append(QA(question, answer, "spatial"))
    want = "yes" if rng.random() < 0.5 else "no"
    pool = by_answer[want] or by_answer["no" if want == "yes" else "yes"]
    return pick_one(rng, pool) if pool else None


def _third(coord: float, extent: float) -> int | None:
    """Index (0, 1, 2) of the third of [0, extent] holding coord; None within LOCATE_MARGIN of a border."""
    frac = coord / extent
    if any(abs(frac - border) < LOCATE_MARGIN for border in (1 / 3, 2 / 3)):
        return None
    return min(int(frac * 3), 2)


def locate_phrase(scene: Scene, obj: SceneObject) -> str | None:
    """Where `obj` is in the frame, "<row> <column>" by thirds ("top left", "middle center"), or
    None when its centre is too close to a third's border for one answer to be right.

    Why thirds: a robot's user asks "where is the red cup?" to turn or reach towards it; nine
    coarse regions are what a person answers, and they mean the same on every frame size.
    """
    row, col = _third(obj.y, scene.height), _third(obj.x, scene.width)
    if row is None or col is None:
        return None
    return f"{ROWS_THIRDS[row]} {COLUMNS_THIRDS[col]}"


def locate_questions(scene: Scene) -> list[QA]:
    """Every "Where is the <colour> <shape>?" the scene answers unambiguously (unique referent,
    centre clear of the thirds' borders)."""
    out = []
    for o in _unique_pairs(scene):
        phrase = locate_phrase(scene, o)
        if phrase is not None:
            out.append(QA(f"Where is the {o.color} {o.shape}?", phrase, "locate"))
    return out


def positions_caption(scene: Scene) -> str | None:
    """Dense "where" caption: every object left to right as in `caption_objects`, each followed by
    its `locate_phrase` ("red circle top left, blue square middle right"); None when one object is
    too close to a third's border to name its region (never on the 4x4, 4x3 and 3x3 grids).

    Why: a dense task is what taught the nano models captions where VQA alone stayed at chance
    (shared/NANO_NOTES.md); this one asks for every object's position, which no other task does.
    """
    objs = _left_to_right(scene)
    if not objs:
        return EMPTY_CAPTION
    phrases = [locate_phrase(scene, o) for o in objs]
    if any(p is None for p in phrases):
        return None
    return ", ".join(f"{o.color} {o.shape} {p}" for o, p in zip(objs, phrases, strict=True))


def _ask_positions(scene: Scene, rng: np.random.Generator) -> QA | None:
    answer = positions_caption(scene)
    return None if answer is None else QA(POSITIONS_QUESTION, answer, "positions")


def _ask_locate(scene: Scene, rng: np.random.Generator) -> QA | None:
    candidates = locate_questions(scene)
    return pick_one(rng, candidates) if candidates else None


def _ask_compare(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    shape_n = Counter(o.shape for o in scene.objects)
    color_n = Counter(o.color for o in scene.objects)
    by_answer: dict[str, list[QA]] = {"more": [], "fewer": [], "same": []}

    def add(n1: int, n2: int, what1: str, what2: str) -> None:
        if n1 == 0 and n2 == 0:
            return  # "same" about two absent things teaches nothing about the image
        answer = "more" if n1 > n2 else "fewer" if n1 < n2 else "same"
        question = f"Compared with {what2}, are there more, fewer or the same number of {what1}?"
        by_answer[answer].append(QA(question, answer, "compare"))

    for s1 in shapes:
        for s2 in shapes:
            if s1 != s2:
                add(shape_n[s1], shape_n[s2], _plural(s1), _plural(s2))
    for c1 in colors:
        for c2 in colors:
            if c1 != c2:
                add(color_n[c1], color_n[c2], f"{c1} objects", f"{c2} objects")
    answers = [a for a in ("more", "fewer", "same") if by_answer[a]]
    return pick_one(rng, by_answer[pick_one(rng, answers)]) if answers else None


def _ask_describe(scene: Scene, rng: np.random.Generator) -> QA | None:
    return QA(DESCRIBE_QUESTION, describe_scene(scene), "describe")


def _ask_caption(scene: Scene, rng: np.random.Generator) -> QA | None:
    return QA(CAPTION_QUESTION, caption_objects(scene), "caption")


_ASKERS: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "attribute": _ask_attribute,
    "count": _ask_count,
    "exist": _ask_exist,
    "spatial": _ask_spatial,
    "compare": _ask_compare,
    "describe": _ask_describe,
    "caption": _ask_caption,
    "locate": _ask_locate,
    "positions": _ask_positions,
}


def question_type(question: str) -> str | None:
    """The template a generated question comes from ("attribute/shape", "count/color", ...), or
    None for any other text.

    Why: a family's accuracy hides a constant answer in one of its templates (a student that
    always says "circle" to every "What shape ...?" scores the prior there while the colour
    template is learned); evaluation reports every template separately with its top answers.
    """
    q = question.strip()
    if q == CAPTION_QUESTION:
        return "caption"
    if q == DESCRIBE_QUESTION:
        return "describe"
    if q == POSITIONS_QUESTION:
        return "positions"
    for prefix, kind in (("What color is the ", "attribute/color"), ("What shape is the ", "attribute/shape"),
                         ("What size is the ", "attribute/size")):
        if q.startswith(prefix):
            return kind
    if q.startswith("How many ") and q.endswith(" are there?"):
        what = q[len("How many "):-len(" are there?")].split()
        if what == ["objects"]:
            return "count/objects"
        if len(what) == 2 and what[1] == "objects":
            return "count/color"
        return "count/shape" if len(what) == 1 else "count/shape+color"
    if q.startswith("Is there "):
        return "exist"
    if q.startswith("Is the "):
        return "spatial/above-below" if (" above the " in q or " below the " in q) else "spatial/left-right"
    if q.startswith("Compared with "):
        return "compare"
    if q.startswith("Where is the "):
        return "locate"
    return None


def parse_families(families: str | Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated families from a list or a comma-separated string."""
    items = families.split(",") if isinstance(families, str) else list(families)
    out = tuple(dict.fromkeys(f.strip() for f in items if f.strip()))
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {list(FAMILIES)}")
    if not out:
        raise ValueError("no question families given")
    return out


def make_questions(
    scene: Scene, seed: int, families: Sequence[str] = FAMILIES, per_family: int = 1
) -> list[QA]:
    """Up to `per_family` distinct questions per family, in the order of `families`.

    Every candidate is built from the scene's objects with its answer computed alongside,
    and only unambiguous candidates exist (unique referents, separated centres), so a family
    that cannot be asked about this scene yields fewer questions (possibly none) instead of
    a wrong answer. Each family has its own random stream, so asking for fewer families does
    not change the questions of the others.
    """
    if per_family < 0:
        raise ValueError(f"per_family must be >= 0, got {per_family}")
    qas: list[QA] = []
    for family in parse_families(families) if per_family else ():
        rng = scene_rng(seed, STREAM_QUESTIONS * 100 + FAMILIES.index(family))
        seen: set[str] = set()
        for _ in range(8 * per_family):
            qa = _ASKERS[family](scene, rng)
            if qa is None:
                break
            if qa.question not in seen:
                seen.add(qa.question)
                qas.append(qa)
                if len(seen) == per_family:
                    break
    return qas


# ---------------------------------------------------------------------------------------------
# Ground truth, corpora and datasets
# ---------------------------------------------------------------------------------------------


def vocabulary_words() -> list[str]:
    """Every word questions and answers can use, so a tokenizer corpus covers rare ones too."""
    words = list(ALL_SHAPES) + [_plural(s) for s in ALL_SHAPES] + list(COLOR_RGB) + list(SIZES)
    words += [str(i) for i in range(21)] + list(_NUMBER_WORDS)
    words += ["yes", "no", "more", "fewer", "same", "object", "objects", EMPTY_CAPTION]
    words += [phrase for phrase, _, _ in _RELATIONS]
    return words


def corpus_texts(num_scenes: int, seed: int = 0) -> list[str]:
    """Questions, answers, descriptions and captions of `num_scenes` train scenes.

    Training text for the small models' BPE tokenizer; starts with one line of the whole
    vocabulary so words too rare to appear in a small sample still get merges.
    """
    texts = [" ".join(vocabulary_words())]
    for i in range(num_scenes):
        s = scene_seed("train", seed, i)
        scene = generate_scene(s)
        for qa in make_questions(scene, s, TOKENIZER_FAMILIES, per_family=2):
            texts.append(qa.question)
            texts.append(qa.answer)
    return texts


__all__ = [
    "CAPTION_QUESTION",
    "COLUMNS_THIRDS",
    "DESCRIBE_QUESTION",
    "EMPTY_CAPTION",
    "FAMILIES",
    "LOCATE_MARGIN",
    "POSITIONS_QUESTION",
    "QA",
    "ROWS_THIRDS",
    "SPATIAL_MIN_SEPARATION",
    "TOKENIZER_FAMILIES",
    "attribute_questions",
    "caption_objects",
    "corpus_texts",
    "describe_scene",
    "locate_phrase",
    "locate_questions",
    "make_questions",
    "parse_families",
    "positions_caption",
    "question_type",
    "vocabulary_words",
]
