"""Questions to ask about frames nobody labelled: from a file, or from question families.

A robot's frames come with no ground truth, so the questions cannot depend on what a frame
shows (the synthetic generator's families do: "What color is the circle?" is only asked when
there is one circle). Two sources:

- a question file: plain text, one question per line (`#` starts a comment), or YAML, either a
  list of questions or a mapping family -> list of questions (the family is kept per record so
  evaluation and mixing can group by it);
- `--families`: templates per family over the synthetic vocabulary (colours, shapes), the
  same wording the project's models were trained on, drawn per frame from a seeded stream.
  A teacher answers them; "Is there a purple star?" about a frame with none is a fine question.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlsi_model.data import question_families, scenes


class QuestionFileError(ValueError):
    """A question file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Question:
    text: str
    family: str = ""


def load_question_file(path: str | Path) -> list[Question]:
    """Questions of a text or YAML file (see the module docstring); duplicates dropped, order kept."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuestionFileError(f"cannot read question file {path}: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QuestionFileError(f"{path}: invalid YAML ({exc})") from exc
        if isinstance(data, list):
            items = [(str(q), "") for q in data]
        elif isinstance(data, dict):
            items = []
            for family, questions in data.items():
                if not isinstance(questions, list):
                    raise QuestionFileError(f"{path}: family {family!r} must map to a list of questions")
                items += [(str(q), str(family)) for q in questions]
        else:
            raise QuestionFileError(f"{path}: expected a list of questions or a mapping family -> questions")
    else:
        items = [(line.split("#", 1)[0].strip(), "") for line in text.splitlines()]
    out: dict[str, Question] = {}
    for question, family in items:
        question = question.strip()
        if question and question not in out:
            out[question] = Question(question, family)
    if not out:
        raise QuestionFileError(f"{path}: no questions")
    return list(out.values())


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def family_templates(family: str, shapes: Sequence[str] = scenes.SHAPES,
                     colors: Sequence[str] = scenes.COLORS) -> list[str]:
    """Every question of `family` that needs no knowledge of the frame, in the training wording."""
    pairs = [(c, s) for c in colors for s in shapes]
    if family == "caption":
        return [question_families.CAPTION_QUESTION]
    if family == "positions":
        return [question_families.POSITIONS_QUESTION]
    if family == "describe":
        return [question_families.DESCRIBE_QUESTION]
    if family == "count":
        return (["How many objects are there?"] + [f"How many {_plural(s)} are there?" for s in shapes]
                + [f"How many {c} objects are there?" for c in colors])
    if family == "exist":
        return [f"Is there {_article(c)} {c} {s}?" for c, s in pairs]
    if family == "attribute":
        return ([f"What color is the {s}?" for s in shapes] + [f"What shape is the {c} object?" for c in colors]
                + [f"What size is the {c} {s}?" for c, s in pairs])
    if family == "locate":
        return [f"Where is the {c} {s}?" for c, s in pairs]
    if family == "spatial":
        return [f"Is the {a[0]} {a[1]} {rel} the {b[0]} {b[1]}?" for a in pairs for b in pairs if a != b
                for rel in ("left of", "right of", "above", "below")]
    if family == "compare":
        out = []
        for group in ([_plural(s) for s in shapes], [f"{c} objects" for c in colors]):  # like with like
            out += [f"Compared with {b}, are there more, fewer or the same number of {a}?"
                    for a in group for b in group if a != b]
        return out
    raise ValueError(f"unknown question family {family!r}; choose from {', '.join(question_families.FAMILIES)}")


def questions_for_frame(index: int, families: Sequence[str], per_family: int = 1, seed: int = 0) -> list[Question]:
    """`per_family` questions of each family for frame `index`, drawn from a stream seeded by
    (seed, index), so a frame's questions do not depend on which other frames were kept."""
    rng = random.Random(f"{seed}:{index}")
    out = []
    for family in families:
        templates = family_templates(family)
        for text in rng.sample(templates, min(per_family, len(templates))):
            out.append(Question(text, family))
    return out
