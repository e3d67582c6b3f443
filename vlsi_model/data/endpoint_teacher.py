"""A teacher served by an inference engine through its OpenAI-compatible chat API.

A teacher too large for this machine (Qwen2-VL-72B, Qwen3-VL) runs under vLLM or SGLang,
which serve `/v1/chat/completions` the way OpenAI does. `EndpointTeacher` implements the
labelling `Teacher` protocol (`vlsi_model.data.labelling`) on top of that API, so
`label_file` (batches, resume after a kill, the `label` block of every record) works the same
for a local and a served teacher.

Each question is one chat request: a user message holding the image as a PNG data URL
(lossless: the server sees exactly the pixels `label_file` read) and the question, greedy
(`temperature=0`), at most `max_new_tokens` tokens, with `logprobs=True` so the answer's
mean token probability can be recorded (`top_logprobs=k` asks for the k best alternatives
too; they are not used here, a distillation cache may want them). A batch's requests are
sent by a pool of `concurrency` threads: the server batches concurrent requests itself
(continuous batching), which is what makes a served teacher fast; keep `label_file`'s
`batch_size` a few times `concurrency`, or the pool idles at the end of every batch.

Why the official `openai` client and not our own HTTP code: it already does what a labelling
run of hours needs from a remote server, tested against the servers we target: retries with
exponential backoff and jitter (0.5 s doubling up to 8 s, or the server's `Retry-After`) on
connection errors, timeouts, 408/409/429 and 5xx answers (`max_retries`), a per-request
timeout (`timeout_s`), connection pooling shared by the threads, and typed errors. A request
that still fails after those retries (or a 4xx the client does not retry: a wrong model name,
a bad request) raises `EndpointError` naming the record and the server's message; `label_file`
has already written every earlier batch, so rerunning resumes after them.

Token probabilities: mean of exp(logprob) over the answer's tokens, as `LocalTeacher`
computes it. vLLM also reports the stop token it generated (`<|im_end|>` for Qwen) as the last
logprob entry; such an entry (finish_reason "stop", token in `stop_tokens`) is left out, so
both teachers measure the same tokens (the stop token alone counts when the answer is empty,
as in `LocalTeacher`). A server that returns no logprobs gives `mean_token_prob=None` and the
token count of its `usage` (which, on vLLM, counts the stop token too).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from vlsi_model.data.labelling import DEFAULT_MAX_NEW_TOKENS, LabelRequest, TeacherAnswer

__all__ = ["QWEN_STOP_TOKENS", "EndpointError", "EndpointTeacher", "answer_from_choice", "png_data_url"]

log = logging.getLogger(__name__)

# Stop tokens of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL chat models, as servers print them.
QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; vLLM's default --max-logprobs is 20 too


class _NotSentError(Exception):
    """A request dropped because another one of its batch failed for good."""


class EndpointError(RuntimeError):
    """A request to the teacher's server failed for good (after the client's retries)."""

    def __init__(self, message: str, key: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.status_code = status_code


def png_data_url(image: np.ndarray) -> str:
    """`data:image/png;base64,...` of an H x W x 3 uint8 RGB image."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def answer_from_choice(choice: Any, usage: Any = None,
                       stop_tokens: Sequence[str] = QWEN_STOP_TOKENS) -> TeacherAnswer:
    """A `TeacherAnswer` from one chat-completion choice (see the module doc on token probabilities)."""
    content = getattr(getattr(choice, "message", None), "content", None) or ""
    truncated = getattr(choice, "finish_reason", None) == "length"  # the server's max_tokens cut it
    logprobs = getattr(getattr(choice, "logprobs", None), "content", None)
    if logprobs is None:
        completion_tokens = getattr(usage, "completion_tokens", None)
        return TeacherAnswer(content.strip(), None, int(completion_tokens or 0), truncated=truncated)
    entries = list(logprobs)
    n = len(entries)
    if n and getattr(choice, "finish_reason", None) == "stop" and entries[-1].token in stop_tokens:
        n -= 1  # the stop token the server generated and reported; not part of the answer
    counted = entries[: max(n, 1)]  # an empty answer: its stop token's probability, as LocalTeacher
    mean = sum(math.exp(e.logprob) for e in counted) / len(counted) if counted else None
    return TeacherAnswer(content.strip(), mean, n, truncated=truncated)


class EndpointTeacher:
    """A `Teacher` answering through an OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang).

    `base_url` is the API root (`http://host:8000/v1`), `model` the served model's name (vLLM:
    `--served-model-name`, by default the path or hub id it was started with). `max_retries` and
    `timeout_s` go to the `openai` client (retries with exponential backoff; per-request
    timeout). `name` is what labelled records name as their teacher (default: `model`).
    `stop_tokens`: token strings that end an answer (see the module doc).
    Thread-safe; `close()` (or `with`) releases the client's connections.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        top_logprobs: int = 0,
        name: str | None = None,
        stop_tokens: Sequence[str] = QWEN_STOP_TOKENS,
    ) -> None:
        import openai

        if not base_url or not model:
            raise ValueError("EndpointTeacher needs the server's base_url and the served model's name")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.name = name or model
        self.max_new_tokens = int(max_new_tokens)
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.top_logprobs = int(top_logprobs)
        self.stop_tokens = tuple(stop_tokens)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY",
                                    max_retries=self.max_retries, timeout=self.timeout_s)

    def __repr__(self) -> str:
        return f"EndpointTeacher({self.base_url!r}, {self.model!r})"

    def __enter__(self) -> EndpointTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def served_models(self) -> list[str]:
        """The model names the server lists (GET /v1/models)."""
        return [m.id for m in self.client.models.list()]

    def answer_batch(self, requests: Sequence[LabelRequest], images: Sequence[np.ndarray]) -> list[TeacherAnswer]:
        """Answers in request order; `EndpointError` if any request fails for good (the requests
        in flight finish, the ones not yet sent are not sent)."""
        if len(requests) != len(images):
            raise ValueError(f"{len(requests)} requests but {len(images)} images")
        if not requests:
            return []
        gave_up = threading.Event()  # set by the first request that fails: the others are not sent

        def ask(request: LabelRequest, image: np.ndarray) -> TeacherAnswer:
            if gave_up.is_set():
                raise _NotSentError
            try:
                return self.answer_one(request, image)
            except BaseException:
                gave_up.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)),
                                  thread_name_prefix="endpoint-teacher")
        try:
            futures = [pool.submit(ask, r, im) for r, im in zip(requests, images, strict=True)]
            wait(futures, return_when=FIRST_EXCEPTION)
            if gave_up.is_set():
                for f in futures:
                    f.cancel()
                wait(futures)
                errors = [f.exception() for f in futures if not f.cancelled()]
                raise next(e for e in errors if e is not None and not isinstance(e, _NotSentError))
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def answer_one(self, request: LabelRequest, image: np.ndarray) -> TeacherAnswer:
        """One chat request (the client retries it); `EndpointError` naming the record if it fails."""
        import openai

        kwargs: dict[str, Any] = {}
        if self.top_logprobs > 0:
            kwargs["top_logprobs"] = self.top_logprobs
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                   {"type": "text", "text": request.question}]
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}],
                temperature=0, max_tokens=self.max_new_tokens, logprobs=True, **kwargs)
        except openai.APIStatusError as exc:
            raise self._status_error(request.key, exc) from exc
        except openai.APIConnectionError as exc:  # APITimeoutError included
            cause = exc.__cause__ or exc.__context__
            detail = f"{exc.message}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
            raise EndpointError(f"teacher endpoint {self.base_url}: record {request.key!r} failed after "
                                f"{self.max_retries} retries: {detail}", request.key) from exc
        if not response.choices:
            raise EndpointError(f"teacher endpoint {self.base_url}: record {request.key!r}: the answer has no "
                                "choices", request.key)
        return answer_from_choice(response.choices[0], response.usage, self.stop_tokens)

    def _status_error(self, key: str, exc: Any) -> EndpointError:
        code = int(exc.status_code)
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        message = str(message or body or exc.message)
        retried = code in (408, 409, 429) or code >= 500
        text = (f"teacher endpoint {self.base_url}: record {key!r}: HTTP {code}: {message}"
                + (f" (still failing after {self.max_retries} retries)" if retried else ""))
        if code == 404:
            try:
                served = self.served_models()
            except Exception:  # the listing is a hint only
                served = None
            if served is not None and self.model not in served:
                text += f" (the server has {served}, not {self.model!r})"
        return EndpointError(text, key, code)
