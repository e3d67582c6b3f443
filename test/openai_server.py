"""A small OpenAI-compatible chat server around a real model, for tests only.

It answers `POST /v1/chat/completions` as vLLM / SGLang do for a Qwen2-VL model: one user
message with an image (a base64 data URL) and a question, greedy decoding with the project's
torch engine, and, when `logprobs` is true, the per-token log-probabilities of the answer.
Those come from the same model: the generated tokens are teacher-forced through one forward
pass and the log-softmax is read at each answer position (and at the stop token's, which
vLLM reports as the last entry when the answer ended on it; `report_stop_token=False` leaves
it out as some servers do). `top_logprobs=k` lists the k most probable tokens there.

`GET /v1/models` lists the model. A wrong model name is answered 404 with vLLM's error body,
and failures can be simulated: the next `fail_first` chat requests are answered with HTTP
`fail_status` (503 by default), which the `openai` client retries.

    server = TeacherServer(model_dir).start()      # or: base_url, stop = serve_teacher(model_dir)
    ... EndpointTeacher(server.base_url, server.model_name) ...
    server.requests, server.answered                # what the server was asked
    server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_TOKENS = 64
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """An HTTP error answer: status code, message, OpenAI error type, parameter at fault."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def image_sha1(image: np.ndarray) -> str:
    """Identifies an image by its pixels (what the server decoded equals what the client read)."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def decode_data_url(url: Any) -> np.ndarray:
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise RequestError(400, "image_url must be a base64 data URL (data:image/...;base64,...)", param="messages")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as exc:
        raise RequestError(400, f"the image cannot be decoded: {exc}", param="messages") from None


def parse_message(body: dict[str, Any]) -> tuple[np.ndarray, str]:
    """(image, question) of a request holding one user message with one image and one text part."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
            or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), list):
        raise RequestError(400, "this server answers one user message whose content is a list of parts",
                           param="messages")
    parts = messages[0]["content"]
    images = [p for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    texts = [p for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    if len(images) != 1 or len(texts) != 1 or len(parts) != 2:
        raise RequestError(400, "the user message must hold exactly one image_url and one text part",
                           param="messages")
    image_url = images[0].get("image_url")
    image = decode_data_url(image_url.get("url") if isinstance(image_url, dict) else None)
    question = texts[0].get("text")
    if not isinstance(question, str):
        raise RequestError(400, "the text part has no text", param="messages")
    return image, question


class TeacherServer:
    """The server (see the module doc). `fail_first` may be set again between requests."""

    def __init__(self, model_dir: str | Path, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 fail_first: int = 0, fail_status: int = 503, report_stop_token: bool = True) -> None:
        from vlsi_model.engine import load_engine

        self.engine: Any = load_engine(model_dir, backend="torch")
        self.model_name = model_name or Path(model_dir).name
        self.fail_first = int(fail_first)
        self.fail_status = int(fail_status)
        self.report_stop_token = report_stop_token
        self.requests = 0  # chat requests received, failed ones included
        self.answered: list[tuple[str, str]] = []  # (question, image_sha1) of every answered request
        self._stats_lock = threading.Lock()
        self._engine_lock = threading.Lock()  # the engine answers one request at a time
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> TeacherServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> TeacherServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, fail_first: int = 0) -> None:
        with self._stats_lock:
            self.requests, self.answered, self.fail_first = 0, [], int(fail_first)

    # ------------------------------------------------------------------------- requests
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlsi-test", "root": self.model_name}]}

    def chat(self, body: Any) -> dict[str, Any]:
        """The chat completion for a parsed request body; RequestError for an error answer."""
        with self._stats_lock:
            self.requests += 1
            fail = self.fail_first > 0
            self.fail_first -= int(fail)
        if fail:
            raise RequestError(self.fail_status, "simulated failure: the server is overloaded",
                               "ServiceUnavailableError")
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("model") != self.model_name:
            raise RequestError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model")
        if body.get("stream"):
            raise RequestError(400, "this server does not stream", param="stream")
        if body.get("temperature") not in (None, 0, 0.0):
            raise RequestError(400, "this server decodes greedily only (temperature 0)", param="temperature")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(400, "max_tokens must be a positive integer", param="max_tokens")
        want_logprobs = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs") or 0
        if not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_LOGPROBS or (top_k and not want_logprobs):
            raise RequestError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] and needs logprobs",
                               param="top_logprobs")
        image, question = parse_message(body)

        from vlsi_model.engine.base import EngineError

        with self._engine_lock:
            try:
                result = self.engine.answer(image, question, max_new_tokens=max_tokens)
                stopped = len(result.token_ids) < max_tokens
                logprobs, stop_id = self._logprobs(image, question, result.token_ids, stopped, top_k)
            except EngineError as exc:
                raise RequestError(400, str(exc)) from None
        with self._stats_lock:
            self.answered.append((question, image_sha1(image)))
        n_prompt = int(logprobs.pop("prompt_tokens"))
        entries = logprobs["content"]
        if not (self.report_stop_token and stopped):
            entries = entries[: len(result.token_ids)]
        completion_tokens = len(result.token_ids) + int(stop_id is not None)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "tool_calls": []},
                "logprobs": {"content": entries} if want_logprobs else None,
                "finish_reason": "stop" if stopped else "length",
                "stop_reason": None,
            }],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
                      "total_tokens": n_prompt + completion_tokens},
        }

    def _logprobs(self, image: np.ndarray, question: str, token_ids: list[int], stopped: bool,
                  top_k: int) -> tuple[dict[str, Any], int | None]:
        """Teacher-force the answer: ({"content": entries, "prompt_tokens": n}, the stop token id or None)."""
        import torch

        from vlsi_model.prompting import build_inputs

        eng = self.engine
        inputs = build_inputs(eng.tokenizer, eng.image_processor, image, question,
                              max_question_chars=eng.max_question_chars)
        prompt_len = int(inputs["input_ids"].shape[1])
        answer = torch.tensor([token_ids], dtype=torch.long)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
        with torch.inference_mode():
            logits = eng.model(**{k: v.to(eng.device) for k, v in inputs.items()}).logits
        # Row t predicts answer token t; the row after the last answer token predicts the stop token.
        logp = logits[0, prompt_len - 1:].float().log_softmax(-1).cpu()
        targets = list(token_ids)
        stop_id = None
        if stopped:
            stop_id = int(logp[len(token_ids)].argmax())
            if stop_id not in eng.stop_token_ids:
                raise RuntimeError(f"teacher forcing disagrees with decoding: token {stop_id} after the answer, "
                                   f"not a stop token {sorted(eng.stop_token_ids)}")
            targets.append(stop_id)
        entries = []
        for t, target in enumerate(targets):
            entry = self._entry(target, float(logp[t, target]))
            entry["top_logprobs"] = []
            if top_k:
                values, ids = logp[t].topk(top_k)
                entry["top_logprobs"] = [self._entry(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
            entries.append(entry)
        return {"content": entries, "prompt_tokens": prompt_len}, stop_id

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def _make_handler(app: TeacherServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, *args: Any) -> None:  # quiet: no line per request on stderr
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, app.models())
            else:
                self._send(404, RequestError(404, f"no route {self.path}", "NotFoundError").body())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, RequestError(404, f"no route {self.path}", "NotFoundError").body())
                return
            try:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise RequestError(400, f"the body is not JSON: {exc}") from None
                self._send(200, app.chat(body))
            except RequestError as exc:
                self._send(exc.status, exc.body())
            except Exception as exc:  # a bug in the model or here: a 500, as a real server answers
                self._send(500, RequestError(500, f"{type(exc).__name__}: {exc}", "InternalServerError").body())

    return Handler


def serve_teacher(model_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                  **options: Any) -> tuple[str, Callable[[], None]]:
    """Start a `TeacherServer` (options: model_name, fail_first, fail_status, report_stop_token)
    in a background thread; returns (base_url, stop_fn)."""
    server = TeacherServer(model_dir, host=host, port=port, **options).start()
    return server.base_url, server.stop
