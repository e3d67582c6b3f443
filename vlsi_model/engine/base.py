"""The one inference interface every backend implements (torch, onnxruntime, tensorrt).

The ROS node and the CLI only ever see `Engine.answer`; backends differ in how they run the
vision tower, the prefill and the decode loop, never in what they return. Timings are split
the same way on every backend so latency can be compared stage by stage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vlsi_model.errors import EngineError, ModelLoadError

__all__ = ["AnswerResult", "Engine", "EngineError", "ModelLoadError", "TokenCallback", "greedy_tokens", "per_question",
           "shared_prefix_length", "split_shared_time"]

# on_token(text_so_far, num_tokens) is called after every generated token. Returning False
# stops generation early (the result is marked cancelled), as does setting `cancel`.
TokenCallback = Callable[[str, int], "bool | None"]


@dataclass
class AnswerResult:
    """What one answer cost and produced. Times are wall-clock milliseconds."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    cancelled: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.num_tokens / self.decode_ms if self.decode_ms > 0 else 0.0


def greedy_tokens(
    first_id: int,
    next_token: Callable[[int, int], int | None],
    stop_token_ids: frozenset[int] | set[int] | tuple[int, ...],
    max_new_tokens: int,
    stream_text: Callable[[list[int]], str],
    on_token: TokenCallback | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[int], bool]:
    """The greedy decode loop every backend shares; returns (answer tokens, cancelled).

    `first_id` is the prefill's choice. `next_token(last_id, n)` runs one decoder step on the
    last chosen token (n answer tokens so far) and returns the next id, or None when the
    backend cannot go further (e.g. a TensorRT engine's maximum length). Stop tokens are not
    part of the answer; `on_token` sees the streamed text and stops by returning False; a set
    `cancel` stops after the current token. Written by hand because each backend only
    differs in how one step runs, and the stopping rules must be identical across them.
    """
    tokens: list[int] = []
    next_id: int | None = first_id
    while next_id is not None and next_id not in stop_token_ids:
        tokens.append(next_id)
        stop = on_token is not None and on_token(stream_text(tokens), len(tokens)) is False
        if stop or (cancel is not None and cancel.is_set()):
            return tokens, True
        if len(tokens) >= max_new_tokens:
            break
        next_id = next_token(next_id, len(tokens))
    return tokens, False


def per_question(n: int, max_new_tokens: list[int] | int, cancels: Sequence[threading.Event | None] | None,
                  caller: str) -> tuple[list[int], list[threading.Event | None]]:
    """`max_new_tokens` and `cancels` of `answer_many` / `answer_batch` (every backend) as one entry per question."""
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    events = list(cancels) if cancels is not None else [None] * n
    if len(limits) != n or len(events) != n:
        raise EngineError(f"{caller} needs one max_new_tokens and one cancel per question")
    return limits, events


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, keeping at least one token of each prompt its
    own (its prefill must produce that question's first answer token): what `answer_many`
    prefills once for several questions about one image."""
    prefix = min(len(p) for p in prompts) - 1
    for k in range(prefix):
        if any(p[k] != prompts[0][k] for p in prompts[1:]):
            return k
    return prefix


def image_prefix_length(prompts: Sequence[Sequence[int]], image_token_id: int) -> int:
    """`shared_prefix_length` of several questions' prompts about one image, which must hold every
    image token (the prefix is what carries the image); EngineError otherwise."""
    prefix = shared_prefix_length(prompts)
    if any(int(t) == image_token_id for t in prompts[0][prefix:]):
        raise EngineError("the questions differ before the image tokens: no shared prefix")
    return prefix


def split_shared_time(results: Sequence[AnswerResult], elapsed_ms: float) -> None:
    """`answer_many`'s total_ms: each answer its own vision + prefill + decode, the first one also
    what they shared (preprocessing once), so the totals add up to the call's `elapsed_ms`."""
    for result in results:
        result.total_ms = result.vision_ms + result.prefill_ms + result.decode_ms
    results[0].total_ms = elapsed_ms - sum(r.total_ms for r in results[1:])


class Engine(Protocol):
    """A loaded model that answers questions about images.

    Implementations are not required to be thread-safe: callers serialise `answer` calls
    (the ROS node runs them on one worker thread).
    """

    backend: str
    model_name: str

    def answer(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int = 32,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> AnswerResult:
        """Greedy answer about `image` (H x W x 3 uint8 RGB) to `question`."""
        ...

    def close(self) -> None:
        """Free the model's memory; the engine is unusable afterwards."""
        ...
