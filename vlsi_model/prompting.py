"""(image, question[, answer]) -> Qwen2-VL / Qwen2.5-VL / Qwen3-VL model inputs, in one place.

Inference engines, SFT and distillation must all build exactly the same token layout, or a
model trained by one answers garbage in another. `transformers.Qwen2VLProcessor` does this
job upstream but does not work with the PIL image processor in this environment, so the
same steps are written out here, on token ids rather than strings:

1. render the tokenizer's chat template for a user turn holding one image and the question
   (control tokens typed *inside* the question are encoded as plain text, so a question
   cannot smuggle in an extra `<|image_pad|>` or end the turn early);
2. replace the single `<|image_pad|>` by one per merged image token
   (`image_grid_thw.prod() // merge_size**2`, merge_size from the image processor), as
   Qwen2VLProcessor and Qwen3VLProcessor do (the grid counts patches of the processor's
   patch_size: 14 px for Qwen2-VL / Qwen2.5-VL, 16 px for Qwen3-VL);
3. add `attention_mask` and `mm_token_type_ids` (1 on image tokens: transformers 5 needs
   it for M-RoPE), and for training the answer + `<|im_end|>` with `labels` that score
   only those response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

# The request checks live in the torch-free `engine.validation` (shared with the ONNX Runtime /
# TensorRT runtimes); re-exported here, where callers have always imported them from.
from vlsi_model.engine.validation import (
    DEFAULT_MAX_QUESTION_CHARS,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_SIDE,
    validate_image,
    validate_question,
)
from vlsi_model.errors import EngineError

__all__ = [
    "DEFAULT_MAX_QUESTION_CHARS",
    "END_OF_TURN_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_SIDE",
    "build_inputs",
    "collate",
    "preprocess_image",
    "validate_image",
    "validate_question",
]

IGNORE_INDEX = -100
IMAGE_TOKEN = "<|image_pad|>"
END_OF_TURN_TOKEN = "<|im_end|>"


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise EngineError(f"tokenizer has no {token} token; it is not a Qwen2-VL tokenizer")
    return int(tid)


def preprocess_image(image_processor: Any, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [patches, C*T*P*P], image_grid_thw [1, 3]) for one validated H x W x 3 image.

    `input_data_format` is given explicitly: left to guess, the processor reads a 3 x W x 3
    image as channels-first.
    """
    try:
        out = image_processor(images=[image], return_tensors="pt", input_data_format="channels_last")
    except ValueError as exc:
        raise EngineError(f"image cannot be preprocessed: {exc}") from exc
    return out["pixel_values"], out["image_grid_thw"].to(torch.long)


def build_inputs(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    image: np.ndarray,
    question: str,
    answer: str | None = None,
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
) -> dict[str, torch.Tensor]:
    """Model inputs (batch of one) for a user turn with `image` and `question`.

    Returns input_ids, attention_mask, mm_token_type_ids ([1, L] each), pixel_values
    ([patches, dim]), image_grid_thw ([1, 3]). Without `answer` the sequence ends with the
    generation prompt `<|im_start|>assistant\\n`, ready for greedy decoding. With `answer`
    the (stripped) answer and `<|im_end|>` are appended and `labels` is -100 everywhere
    except on those response tokens, for teacher forcing.
    Raises EngineError for a bad image or question (message is user-facing).
    """
    image = validate_image(image)
    question = validate_question(question, max_question_chars)
    image_token_id = _token_id(tokenizer, IMAGE_TOKEN)
    merge_size = int(getattr(image_processor, "merge_size", 2))

    pixel_values, grid_thw = preprocess_image(image_processor, image)
    num_image_tokens = int(grid_thw[0].prod().item()) // merge_size**2

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt_ids = list(
        tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            sanitize_control_tokens=True,
            return_dict=False,
        )
    )
    positions = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if len(positions) != 1:
        raise EngineError(
            f"the tokenizer's chat template produced {len(positions)} {IMAGE_TOKEN} tokens for one image, "
            "expected exactly 1"
        )
    p = positions[0]
    ids = prompt_ids[:p] + [image_token_id] * num_image_tokens + prompt_ids[p + 1 :]

    labels: list[int] | None = None
    if answer is not None:
        if not isinstance(answer, str) or not answer.strip():
            raise EngineError("answer must be a non-empty string")
        # Tokenized on its own: the prompt ends with a newline token and the byte-level
        # pre-tokenizer never merges across it, so this equals tokenizing the whole text,
        # and the answer tokens are exactly what greedy decoding after the prompt produces.
        answer_ids = tokenizer.encode(answer.strip(), add_special_tokens=False, split_special_tokens=True)
        response = list(answer_ids) + [_token_id(tokenizer, END_OF_TURN_TOKEN)]
        labels = [IGNORE_INDEX] * len(ids) + response
        ids = ids + response

    input_ids = torch.tensor([ids], dtype=torch.long)
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == image_token_id).to(torch.long),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
    }
    if labels is not None:
        out["labels"] = torch.tensor([labels], dtype=torch.long)
    return out


# Per-token keys and the value that pads each on the right.
_PAD_VALUES = {"attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
# Per-image keys, concatenated along dim 0 (the vision tower takes all images' patches flat).
_CONCAT_KEYS = ("pixel_values", "image_grid_thw")


def collate(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack `build_inputs` outputs into one batch: right padding, labels padded with -100.

    input_ids is padded with `pad_id`, attention_mask and mm_token_type_ids with 0;
    pixel_values and image_grid_thw are concatenated in batch order, which is the order
    the model scatters image features into the image tokens. Right padding suits training
    (get_rope_index skips padding through attention_mask); batched *generation* would need
    left padding, which the engines do not use (they answer one request at a time).
    """
    if not batch:
        raise ValueError("empty batch")
    keys = set(batch[0])
    for item in batch:
        if set(item) != keys:
            raise ValueError(f"batch items have different keys: {sorted(keys)} vs {sorted(item)}")
    max_len = max(int(item["input_ids"].shape[1]) for item in batch)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in _CONCAT_KEYS:
            out[key] = torch.cat([item[key] for item in batch], dim=0)
            continue
        pad_value = pad_id if key == "input_ids" else _PAD_VALUES.get(key)
        if pad_value is None:
            raise ValueError(f"don't know how to pad {key!r}")
        rows = []
        for item in batch:
            t = item[key]
            if t.ndim != 2 or t.shape[0] != 1:
                raise ValueError(f"{key} must have shape [1, L], got {tuple(t.shape)}")
            rows.append(torch.nn.functional.pad(t, (0, max_len - t.shape[1]), value=pad_value))
        out[key] = torch.cat(rows, dim=0)
    return out
