"""One inference thread with a bounded request queue.

Why a single worker: an engine runs one generation at a time (it is not thread-safe, and on
a small board two concurrent generations only slow each other down). Requests beyond the
queue's capacity are refused at once with a clear error instead of piling up and answering
stale frames later. Each job resolves its image when its turn comes, so the answer is about
the newest frame at that moment, not the frame that was newest when the request arrived.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlsi_model.engine.base import AnswerResult, Engine, TokenCallback

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The request queue is at capacity."""


class JobCancelledError(RuntimeError):
    """The job was cancelled (or timed out) before the worker started it."""


@dataclass
class AnswerJob:
    """One question to answer. `resolve_image()` runs on the worker thread right before
    inference and returns (pixels, source) where source is whatever the caller wants back
    (e.g. the frame whose header goes into the reply); raising there fails the job."""

    question: str
    resolve_image: Callable[[], tuple[np.ndarray, Any]]
    max_new_tokens: int
    on_token: TokenCallback | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    submitted_s: float = field(default_factory=time.perf_counter)
    tag: Any = None


@dataclass(frozen=True)
class JobOutcome:
    result: AnswerResult
    source: Any
    queued_ms: float


class AnswerWorker:
    """Runs AnswerJobs one at a time on a background thread; `submit` never blocks."""

    _STOP = object()

    def __init__(self, engine: Engine, capacity: int, stats_window: int = 100) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.engine = engine
        self.capacity = capacity
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._busy = threading.Event()
        self._latencies_ms: deque[float] = deque(maxlen=stats_window)
        self._token_rates: deque[float] = deque(maxlen=stats_window)
        self._stats_lock = threading.Lock()
        self.succeeded = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="vlsi-answer-worker", daemon=True)
        self._thread.start()

    def submit(self, job: AnswerJob) -> Future:
        """Queue a job; raises QueueFullError when `capacity` jobs are already waiting."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"request queue full ({self.capacity} waiting); try again later") from None
        return job.future

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        return self._queue.qsize() + (1 if self._busy.is_set() else 0)

    def stats(self) -> dict[str, float]:
        with self._stats_lock:
            lat = sorted(self._latencies_ms)
            rates = list(self._token_rates)
        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0
        return {
            "latency_p50_ms": pct(0.5),
            "latency_p95_ms": pct(0.95),
            "tokens_per_s": sum(rates) / len(rates) if rates else 0.0,
            "succeeded": float(self.succeeded),
            "failed": float(self.failed),
        }

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel waiting jobs, let the running one see its cancel flag, join the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not self._STOP:
                job.cancel.set()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(JobCancelledError("shutting down"))
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is self._STOP:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.cancel.is_set():
                job.future.set_exception(JobCancelledError("cancelled before it started"))
                continue
            self._busy.set()
            try:
                outcome = self._execute(job)
            except Exception as exc:  # reported to the requester; the worker keeps serving
                self.failed += 1
                job.future.set_exception(exc)
            else:
                self.succeeded += 1
                job.future.set_result(outcome)
            finally:
                self._busy.clear()

    def _execute(self, job: AnswerJob) -> JobOutcome:
        queued_ms = 1000.0 * (time.perf_counter() - job.submitted_s)
        image, source = job.resolve_image()
        result = self.engine.answer(image, job.question, max_new_tokens=job.max_new_tokens,
                                    on_token=job.on_token, cancel=job.cancel)
        if not result.cancelled:
            with self._stats_lock:
                self._latencies_ms.append(result.total_ms)
                if result.decode_ms > 0:
                    self._token_rates.append(result.tokens_per_s)
        return JobOutcome(result=result, source=source, queued_ms=queued_ms)
