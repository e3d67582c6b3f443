"""One inference thread with a bounded request queue.

Why a single worker: an engine runs one generation at a time (it is not thread-safe, and on
a small board two concurrent generations only slow each other down). Requests beyond the
queue's capacity are refused at once with a clear error instead of piling up and answering
stale frames later. Each job resolves its image when its turn comes, so the answer is about
the newest frame at that moment, not the frame that was newest when the request arrived.

Questions about one frame are answered together: when the worker takes a job with a
`frame_key` (the node uses the camera and its age limit), every other waiting job with the same
key joins it, the frame is resolved once, and an engine with `answer_many` encodes the image
and the prompt prefix once for all of them (standing questions, alerts and several clients
asking about the same camera). Streaming jobs (`on_token`) always run alone.

With `max_batch` > 1 (default 1: off), questions about different frames are decoded together
when the engine `supports_batch` (torch, fast path): the worker takes up to `max_batch` waiting
requests at once (several cameras, several clients; background jobs batch with background jobs
only, so standing questions never delay a request), resolves each frame once, and every answer
advances one token per step in one batch (`engine/torch_batch.py`): the weights are read once per
step for all of them. Each answer is delivered when the batch ends, after every member's vision
and prefill: a throughput gain paid in latency, worth it where decode dominates (long answers, a
GPU), not with a 2B model on a CPU (docs/benchmarks.md). A failed batch is answered one by one.
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
    # Jobs with equal keys resolve to the same frame and may be answered together (module doc).
    frame_key: Any = None


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
                 background_capacity: int = 64, max_batch: int = 1) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.engine = engine
        self.max_batch = max_batch  # requests about different frames decoded together (1: never)
        self.capacity = capacity
        self.background_capacity = background_capacity
        self._requests: deque[AnswerJob] = deque()
        self._background: deque[AnswerJob] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._running: list[AnswerJob] = []
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
        """Requests waiting plus the jobs running (background jobs not counted)."""
        with self._wakeup:
            return len(self._requests) + len(self._running)

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
            for job in self._running:
                job.cancel.set()
            self._wakeup.notify()
        for job in waiting:
            job.cancel.set()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(JobCancelledError("shutting down"))
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _next_jobs(self) -> list[AnswerJob] | None:
        """The next job (a waiting request first), with every waiting job about the same frame."""
        with self._wakeup:
            while not (self._stopping or self._requests or self._background):
                self._wakeup.wait()
            if self._stopping:
                return None
            is_request = bool(self._requests)
            job = self._requests.popleft() if is_request else self._background.popleft()
            jobs = [job]
            if job.frame_key is not None and job.on_token is None:
                for queue in (self._requests, self._background):
                    same = [j for j in queue if j.frame_key == job.frame_key and j.on_token is None]
                    for j in same:
                        queue.remove(j)
                    jobs += same
            if job.on_token is None and self.max_batch > 1 and getattr(self.engine, "supports_batch", False):
                # requests join a request (background work would delay it); background jobs (standing
                # questions on several cameras) join a background job
                queue = self._requests if is_request else self._background
                others = [j for j in queue if j.on_token is None][:max(0, self.max_batch - len(jobs))]
                for j in others:
                    queue.remove(j)
                jobs += others
            self._running = jobs
            return jobs

    def _run(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            try:
                live = []
                for job in jobs:
                    if not job.future.set_running_or_notify_cancel():
                        continue
                    if job.cancel.is_set():
                        job.future.set_exception(JobCancelledError("cancelled before it started"))
                        continue
                    live.append(job)
                if not live:
                    continue
                try:
                    outcomes = self._execute(live)
                except Exception as exc:  # the frame failed (reported to every requester); the worker keeps serving
                    outcomes = [exc] * len(live)
                for job, outcome in zip(live, outcomes, strict=True):
                    self._settle(job, outcome)
            finally:
                with self._wakeup:
                    self._running = []

    def _settle(self, job: AnswerJob, outcome: JobOutcome | Exception) -> None:
        """Give `job` its outcome, counted once: a batched answer delivered as it left the batch
        is settled then, and skipped here when the batch's outcomes come back."""
        if job.future.done():
            return
        if isinstance(outcome, Exception):
            self.failed += 1
            job.future.set_exception(outcome)
        else:
            self.succeeded += 1
            job.future.set_result(outcome)

    def _execute(self, jobs: list[AnswerJob]) -> list[JobOutcome | Exception]:
        """Answer `jobs` (one, several about one frame, or a batch across frames) after resolving
        each frame once; a job that fails gets its exception, the others their outcomes."""
        groups: dict[Any, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(("frame", job.frame_key) if job.frame_key is not None else ("job", i), []).append(i)
        if len(groups) == 1:
            return self._execute_one_frame(jobs)
        return self._execute_batch(jobs, list(groups.values()))

    def _execute_batch(self, jobs: list[AnswerJob], groups: list[list[int]]) -> list[JobOutcome | Exception]:
        """Jobs about several frames: each frame resolved once (a failure fails its jobs alone),
        then one `answer_batch` call decodes every answer together, each answer delivered to its
        requester as it leaves the batch (`_settle`, which then skips it). The future's done callbacks
        (the node publishes there) then run between two decode steps of the others: they must be
        quick, as they are everywhere on this thread."""
        queued_ms = [1000.0 * (time.perf_counter() - job.submitted_s) for job in jobs]
        frames: dict[int, tuple[np.ndarray, Any] | Exception] = {}
        for group in groups:
            try:
                frame: tuple[np.ndarray, Any] | Exception = jobs[group[0]].resolve_image()
            except Exception as exc:  # noqa: BLE001 - that frame's requesters get it
                frame = exc
            frames.update({i: frame for i in group})
        ready = [i for i in range(len(jobs)) if not isinstance(frames[i], Exception)]
        settled: dict[int, AnswerResult] = {}

        def deliver(k: int, result: AnswerResult) -> None:
            i = ready[k]
            settled[i] = result
            self._settle(jobs[i], JobOutcome(result=result, source=frames[i][1], queued_ms=queued_ms[i]))

        try:
            answers = self.engine.answer_batch([frames[i][0] for i in ready], [jobs[i].question for i in ready],
                                               [jobs[i].max_new_tokens for i in ready],
                                               cancels=[jobs[i].cancel for i in ready],
                                               on_answer=deliver) if ready else []
        except Exception:  # noqa: BLE001 - e.g. out of memory in the batch: the others one by one
            answers = [settled.get(i) or self._answer_alone(frames[i][0], jobs[i]) for i in ready]
        by_job: dict[int, AnswerResult | Exception] = dict(zip(ready, answers, strict=True))
        self._record(list(by_job.values()))
        out: list[JobOutcome | Exception] = []
        for i in range(len(jobs)):
            frame, answer = frames[i], by_job.get(i)
            if isinstance(frame, Exception):
                out.append(frame)
            elif isinstance(answer, Exception):
                out.append(answer)
            else:
                out.append(JobOutcome(result=answer, source=frame[1], queued_ms=queued_ms[i]))
        return out

    def _answer_alone(self, image: np.ndarray, job: AnswerJob) -> AnswerResult | Exception:
        try:
            return self.engine.answer(image, job.question, max_new_tokens=job.max_new_tokens,
                                      on_token=job.on_token, cancel=job.cancel)
        except Exception as exc:  # noqa: BLE001 - reported to that requester alone
            return exc

    def _record(self, results: list[Any]) -> None:
        with self._stats_lock:
            for result in results:
                if isinstance(result, AnswerResult) and not result.cancelled:
                    self._latencies_ms.append(result.total_ms)
                    if result.decode_ms > 0:
                        self._token_rates.append(result.tokens_per_s)

    def _execute_one_frame(self, jobs: list[AnswerJob]) -> list[JobOutcome | Exception]:
        queued_ms = [1000.0 * (time.perf_counter() - job.submitted_s) for job in jobs]
        image, source = jobs[0].resolve_image()
        answer_many = getattr(self.engine, "answer_many", None)
        results: list[Any] | None = None
        if len(jobs) > 1 and answer_many is not None:
            try:
                results = answer_many(image, [j.question for j in jobs], [j.max_new_tokens for j in jobs],
                                      cancels=[j.cancel for j in jobs])
            except Exception:  # e.g. one bad question: answer one by one, so only that one fails
                results = None
        if results is None:
            results = [self._answer_alone(image, j) for j in jobs]
        self._record(results)
        return [r if isinstance(r, Exception) else JobOutcome(result=r, source=source, queued_ms=q)
                for r, q in zip(results, queued_ms, strict=True)]
