"""LLaVA-style conversation data -> Qwen2-VL training samples.

Input: a LLaVA JSON / JSON Lines file (format, reading and validation: `vlsi_model.data.llava`).
Each record becomes one sample laid out exactly as `prompting.build_inputs` lays out a
request (so what is trained is what the engines serve): the first turn *is*
`build_inputs(image, question_1, answer_1)`; every further turn appends the tokens the
chat template renders between turns (`\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n`,
control tokens in `q` sanitised as in build_inputs) and the answer + `<|im_end|>`.
`labels` score every assistant answer and its `<|im_end|>`, nothing else.

Design: records are validated *up front, cheaply* (structure, roles, the image file's
header for its size, the exact token count from text alone), so that bad records are found
before hours of training rather than at step 80k, and `on_error="skip"` can drop them while
the dataset length stays fixed (which the deterministic data order relies on). Images are
decoded *lazily* in `__getitem__` (DataLoader workers do it in parallel); a file that is
readable at validation but corrupt in its pixel data fails there, naming the file.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlsi_model.data.llava import (
    SKIP_REASONS,
    DatasetError,
    RecordError,
    load_image,
    parse_conversations,
    read_records,
)
from vlsi_model.errors import EngineError
from vlsi_model.prompting import (
    END_OF_TURN_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_SIDE,
    build_inputs,
    collate,
)

log = logging.getLogger(__name__)

# Questions in training data are bounded by max_length (tokens), not by the serving limit on characters.
_NO_CHAR_LIMIT = 1 << 30


@dataclass(frozen=True)
class ConversationRecord:
    """One validated record: the image file and its (question, answer) turns, plus its token count."""

    index: int  # position in the file (0-based), for messages
    record_id: str | None
    image: Path
    turns: tuple[tuple[str, str], ...]
    num_tokens: int


class ConversationDataset(Dataset):
    """Qwen2-VL training samples (dicts as returned by `prompting.build_inputs`) from LLaVA JSON.

    `max_length` bounds the full sample (image tokens included). `on_error="raise"` (default)
    raises DatasetError at construction for the first bad record; `"skip"` drops bad records,
    counts them per reason in `skipped` (keys from SKIP_REASONS) and logs one summary.
    An unparsable file always raises (there is no record to skip), with file:line:column.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        max_length: int = 2048,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.json_path = Path(json_path).expanduser()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = int(max_length)
        self.on_error = on_error
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.end_of_turn_id = int(tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN))
        self.newline_ids = list(tokenizer.encode("\n", add_special_tokens=False))
        self.skipped: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}  # reason -> first message, for diagnosis
        self.records: list[ConversationRecord] = []
        self._validate_all()

    # -- up-front validation ---------------------------------------------------------------
    def _validate_all(self) -> None:
        raw = read_records(self.json_path)
        base = self.json_path.parent
        image_info: dict[Path, tuple[str, str] | tuple[int, int]] = {}
        skipped: Counter[str] = Counter()
        for index, record in enumerate(raw):
            record_id = record.get("id") if isinstance(record, Mapping) else None
            record_id = str(record_id) if record_id is not None else None
            try:
                image_str, turns = parse_conversations(record)
                image = Path(image_str).expanduser()
                image = image if image.is_absolute() else base / image
                info = image_info.get(image)
                if info is None:
                    info = image_info[image] = self._image_size(image)
                if isinstance(info[0], str):
                    raise RecordError(info[0], str(info[1]))
                height, width = info  # type: ignore[misc]
                num_tokens = self._count_tokens(int(height), int(width), turns)
                if num_tokens > self.max_length:
                    raise RecordError("too_long", f"{num_tokens} tokens, more than max_length {self.max_length}")
            except RecordError as exc:
                where = f"{self.json_path} record {index}" + (f" (id {record_id!r})" if record_id else "")
                if self.on_error == "raise":
                    raise DatasetError(f"{where}: {exc} [{exc.reason}]") from None
                skipped[exc.reason] += 1
                self.skip_examples.setdefault(exc.reason, f"{where}: {exc}")
                continue
            self.records.append(ConversationRecord(index, record_id, image, turns, num_tokens))
        self.skipped = {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}
        if self.skipped:
            summary = ", ".join(f"{reason}={n}" for reason, n in self.skipped.items())
            log.warning(
                "%s: skipped %d of %d records (%s); first of each: %s",
                self.json_path, sum(self.skipped.values()), len(raw), summary,
                "; ".join(self.skip_examples.values()),
            )
        if not self.records:
            raise DatasetError(
                f"{self.json_path}: no usable records ({len(raw)} in the file"
                + (f", skipped: {self.skipped}" if self.skipped else "") + ")"
            )

    @staticmethod
    def _image_size(path: Path) -> tuple[str, str] | tuple[int, int]:
        """(height, width) from the file header only, or (reason, message). Cheap: no pixel decoding."""
        from PIL import Image, UnidentifiedImageError

        if not path.is_file():
            return ("missing_image", f"image not found: {path}")
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            return ("bad_image", f"cannot read image {path}: {exc}")
        if min(width, height) < 1 or max(width, height) > MAX_IMAGE_SIDE:
            return ("bad_image", f"image {path} is {width}x{height}; sides must be 1..{MAX_IMAGE_SIDE}")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return ("bad_image", f"image {path} aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
        return (height, width)

    def _num_image_tokens(self, height: int, width: int) -> int:
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return int(patches) // self.merge_size**2

    def _user_turn_ids(self, question: str, with_image: bool) -> list[int]:
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": question})
        return list(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                sanitize_control_tokens=True,  # as build_inputs: control tokens in data stay text
                return_dict=False,
            )
        )

    def _answer_ids(self, answer: str) -> list[int]:
        # Exactly as build_inputs tokenizes an answer.
        ids = self.tokenizer.encode(answer.strip(), add_special_tokens=False, split_special_tokens=True)
        return list(ids) + [self.end_of_turn_id]

    def _count_tokens(self, height: int, width: int, turns: Sequence[tuple[str, str]]) -> int:
        """Exact length of the sample `__getitem__` builds, from text and image size alone."""
        n = len(self._user_turn_ids(turns[0][0], with_image=True)) - 1 + self._num_image_tokens(height, width)
        n += len(self._answer_ids(turns[0][1]))
        for question, answer in turns[1:]:
            n += len(self.newline_ids) + len(self._user_turn_ids(question, with_image=False))
            n += len(self._answer_ids(answer))
        return n

    # -- samples ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def num_tokens(self, index: int) -> int:
        """Token count of sample `index` (known without building it)."""
        return self.records[index].num_tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.records[index]
        where = f"{self.json_path} record {rec.index}" + (f" (id {rec.record_id!r})" if rec.record_id else "")
        try:
            pixels = load_image(rec.image)
        except Exception as exc:  # PIL raises many types for corrupt pixel data
            raise DatasetError(f"{where}: cannot decode image {rec.image} ({type(exc).__name__}: {exc})") from exc
        question, answer = rec.turns[0]
        try:
            sample = build_inputs(
                self.tokenizer, self.image_processor, pixels, question, answer, max_question_chars=_NO_CHAR_LIMIT
            )
        except EngineError as exc:
            raise DatasetError(f"{where}: {exc}") from exc
        if len(rec.turns) > 1:
            sample = self._append_turns(sample, rec.turns[1:])
        length = int(sample["input_ids"].shape[1])
        if length != rec.num_tokens:  # the up-front count and the real layout must agree, or max_length lies
            raise RuntimeError(f"{where}: built {length} tokens but validation counted {rec.num_tokens}")
        return sample

    def _append_turns(
        self, sample: dict[str, torch.Tensor], turns: Sequence[tuple[str, str]]
    ) -> dict[str, torch.Tensor]:
        """Extend a build_inputs sample by further (question, answer) turns, as the chat template renders them."""
        ids = sample["input_ids"][0].tolist()
        labels = sample["labels"][0].tolist()
        for question, answer in turns:
            prompt = self.newline_ids + self._user_turn_ids(question, with_image=False)
            response = self._answer_ids(answer)
            ids += prompt + response
            labels += [IGNORE_INDEX] * len(prompt) + response
        input_ids = torch.tensor([ids], dtype=torch.long)
        image_token_id = int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        out = dict(sample)
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["mm_token_type_ids"] = (input_ids == image_token_id).to(torch.long)
        out["labels"] = torch.tensor([labels], dtype=torch.long)
        return out


def make_collate_fn(pad_id: int) -> Callable[[Sequence[Mapping[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """`prompting.collate` with the pad id bound; a functools.partial so DataLoader workers can pickle it."""
    return functools.partial(collate, pad_id=int(pad_id))


__all__ = [
    "ConversationDataset",
    "ConversationRecord",
    "DatasetError",
    "RecordError",
    "SKIP_REASONS",
    "load_image",
    "make_collate_fn",
    "parse_conversations",
    "read_records",
]
