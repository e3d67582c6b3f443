"""LLaVA conversation files: reading and validating records, without torch.

The format every `vlsi` data tool reads and writes: a JSON list of records (or JSON Lines, one
record per line):

    {"id": "...", "image": "images/x.png",        # relative to the JSON file's folder, or absolute
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt",   "value": "red"},
                       {"from": "human", "value": "How many squares?"},   # optional further turns
                       {"from": "gpt",   "value": "two"}],
     "family": "...", ...}                          # optional fields the tools keep

Here only what evaluation, labelling and training share: reading a file with errors that name
the line, checking one record's structure (`parse_conversations`) and decoding its image.
Turning records into training samples is `vlsi_model.training.dataset`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = "<image>"


USER_ROLES = ("human", "user")


ASSISTANT_ROLES = ("gpt", "assistant")


# Why a record was skipped (keys of `ConversationDataset.skipped`).
SKIP_REASONS = ("bad_record", "missing_image", "bad_image", "no_response", "too_long")


class DatasetError(ValueError):
    """A data file or record is unusable; the message names the file and the record."""


class RecordError(Exception):
    """One record is unusable; `reason` is one of SKIP_REASONS (what on_error="skip" counts)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_records(path: Path) -> list[Any]:
    """Records of a JSON list file or a JSON Lines file; DatasetError with file:line:column if unparsable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}:{exc.colno}: invalid JSON ({exc.msg})") from exc
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def _strip_placeholder(text: str) -> str:
    """The human text without LLaVA's `<image>` placeholder and the newline that joins it to the text."""
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "").replace(
        IMAGE_PLACEHOLDER, ""
    ).strip()


def parse_conversations(record: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(image path as written, ((question, answer), ...)) of one record, or RecordError with the reason.

    Roles must alternate human, gpt, human, gpt, ... (`user`/`assistant` are accepted too).
    The image placeholder may appear once, in the first human turn (anywhere in it: the image
    is always placed before the question text, as Qwen2-VL's template does); without it the
    image still belongs to the first turn, as in LLaVA's own loader.
    """
    if not isinstance(record, Mapping):
        raise RecordError("bad_record", f"a record must be a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise RecordError("bad_record", "no 'image' (text-only records are not supported)")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError("bad_record", "'conversations' must be a non-empty list")
    roles: list[str] = []
    values: list[str] = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise RecordError("bad_record", f"conversation turn {k} must be an object with a string 'value'")
        role = turn.get("from")
        if role in USER_ROLES:
            roles.append("user")
        elif role in ASSISTANT_ROLES:
            roles.append("assistant")
        else:
            raise RecordError(
                "bad_record", f"conversation turn {k} has role {role!r} (expected one of "
                f"{', '.join(USER_ROLES + ASSISTANT_ROLES)}; system turns are not supported)"
            )
        values.append(turn["value"])
    if "assistant" not in roles:
        raise RecordError("no_response", "no gpt turn: nothing to train on")
    for k, role in enumerate(roles):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError("bad_record", f"conversation turn {k} is {role!r}, expected {expected!r} "
                               "(turns must alternate human, gpt, starting with human)")
    if len(roles) % 2:
        raise RecordError("bad_record", "the last human turn has no gpt answer")
    placeholders = [v.count(IMAGE_PLACEHOLDER) for v in values]
    if sum(placeholders) > 1 or any(placeholders[1:]):
        raise RecordError("bad_record", f"exactly one {IMAGE_PLACEHOLDER}, in the first human turn, is supported")
    turns = []
    for k in range(0, len(values), 2):
        question = _strip_placeholder(values[k])
        answer = values[k + 1].strip()
        if not question:
            raise RecordError("bad_record", f"conversation turn {k}: empty question")
        if not answer:
            raise RecordError("bad_record", f"conversation turn {k + 1}: empty answer")
        turns.append((question, answer))
    return image, tuple(turns)


def load_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of an image file."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
