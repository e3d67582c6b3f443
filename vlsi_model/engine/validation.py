"""What a request may contain: the image and question checks every backend applies, in one place.

numpy only (no torch, no transformers): the torch path (`vlsi_model.prompting`, which
re-exports these names) and the torch-free runtimes (`vlsi_model.engine.np_inputs` for the
ONNX Runtime and TensorRT backends) import the same functions, so a request is refused
with the same message whichever backend serves it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlsi_model.errors import EngineError

DEFAULT_MAX_QUESTION_CHARS = 1000
# Bounds on the raw image before resizing: beyond these the request is almost certainly a
# mistake and resizing alone would cost seconds.
MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 200  # smart_resize's own limit, checked here for a clear message

__all__ = ["DEFAULT_MAX_QUESTION_CHARS", "MAX_ASPECT_RATIO", "MAX_IMAGE_SIDE", "validate_image", "validate_question"]


def validate_image(image: Any) -> np.ndarray:
    """Return `image` as a contiguous H x W x 3 uint8 array, or raise EngineError saying what is wrong.

    H x W (grey) and H x W x 1 are accepted and replicated to three channels.
    """
    if not isinstance(image, np.ndarray):
        raise EngineError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise EngineError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise EngineError(f"image must be H x W x 3 (RGB) or H x W (grey), got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise EngineError(f"image is empty (shape {tuple(image.shape)})")
    if max(h, w) > MAX_IMAGE_SIDE:
        raise EngineError(f"image is too large ({w}x{h}); the longest side may be at most {MAX_IMAGE_SIDE}")
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise EngineError(f"image aspect ratio {w}x{h} is too extreme (at most {MAX_ASPECT_RATIO}:1)")
    return np.ascontiguousarray(image)


def validate_question(question: Any, max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS) -> str:
    """Return the stripped question, or raise EngineError if it is not a non-empty, bounded string."""
    if not isinstance(question, str):
        raise EngineError(f"question must be a string, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise EngineError("question is empty")
    if len(q) > max_question_chars:
        raise EngineError(f"question is too long ({len(q)} characters, at most {max_question_chars})")
    return q
