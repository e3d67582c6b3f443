"""One inference thread with a bounded request queue.

Why a single worker: an engine runs one generation at a time (it is not thread-safe, and on
a small board two concurrent generations only slow each other down). Requests beyond the
queue's capacity are refused at once with a clear error instead of piling up and answering
stale frames later. Each job resolves its image when its turn comes, so the answer is about
the newest frame at that moment, not the frame that was newest when the request arrived.
"""

from __future__ import annotations

import logging
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
    """Runs AnswerJobs one at a time on a background thread; `submit` never blocks.

    Two queues: requests (service, action, `questions` topic) and background work
    (standing questions, alerts). The worker always takes a waiting request first, and
    background jobs have their own bound, so periodic questions can never fill the queue and
    get a user's request refused; they run when no request waits.
    """

    def __init__(self, engine: Engine, capacity: int, stats_window: int = 100,
                 background_capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.engine = engine
        self.capacity = capacity
        self.background_capacity = background_capacity
        self._requests: deque[AnswerJob] = deque()
        self._background: deque[AnswerJob] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._current: AnswerJob | None = None
        self._latencies_ms: deque[float] = deque(maxlen=stats_window)
        self._token_rates: deque[float] = deque(maxlen=stats_window)
        self._stats_lock = threading.Lock()
        self.succeeded = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="vlsi-answer-worker", daemon=True)
        self._thread.start()

    def submit(self, job: AnswerJob, background: bool = False) -> Future:
        """Queue a job; raises QueueFullError when its queue is at capacity."""
        with self._wakeup:
            if self._stopping:
                raise QueueFullError("worker is shutting down")
            pending, limit = (self._background, self.background_capacity) if background else \
                (self._requests, self.capacity)
            if len(pending) >= limit:
                kind = "background queue" if background else "request queue"
                raise QueueFullError(f"{kind} full ({limit} waiting); try again later")
            pending.append(job)
            self._wakeup.notify()
        return job.future

    @property
    def depth(self) -> int:
        """Requests waiting plus the job running (background jobs not counted)."""
        with self._wakeup:
            return len(self._requests) + (1 if self._current is not None else 0)

    @property
    def background_depth(self) -> int:
        with self._wakeup:
            return len(self._background)

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
        """Fail waiting jobs, cancel the running one, join the thread."""
        with self._wakeup:
            self._stopping = True
            waiting = [*self._requests, *self._background]
            self._requests.clear()
            self._background.clear()
            if self._current is not None:
                self._current.cancel.set()
            self._wakeup.notify()
        for job in waiting:
            job.cancel.set()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(JobCancelledError("shutting down"))
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _next_job(self) -> AnswerJob | None:
        with self._wakeup:
            while not (self._stopping or self._requests or self._background):
                self._wakeup.wait()
            if self._stopping:
                return None
            job = self._requests.popleft() if self._requests else self._background.popleft()
            self._current = job
            return job

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                if not job.future.set_running_or_notify_cancel():
                    continue
                if job.cancel.is_set():
                    job.future.set_exception(JobCancelledError("cancelled before it started"))
                    continue
                try:
                    outcome = self._execute(job)
                except Exception as exc:  # reported to the requester; the worker keeps serving
                    self.failed += 1
                    job.future.set_exception(exc)
                else:
                    self.succeeded += 1
                    job.future.set_result(outcome)
            finally:
                with self._wakeup:
                    self._current = None

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
