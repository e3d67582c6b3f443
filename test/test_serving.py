"""The serving layer the ROS node stands on: newest-frame store and the inference worker,
with a real tiny model (no ROS)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene
from vlsi_model.engine import load_engine
from vlsi_model.serving import AnswerJob, AnswerWorker, FrameError, FrameStore, JobCancelledError, QueueFullError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def image(seed: int) -> np.ndarray:
    return render_scene(generate_scene(seed, SceneConfig(width=96, height=80)))


@pytest.fixture(scope="module")
def engine(tiny_qwen2vl_dir):
    eng = load_engine(tiny_qwen2vl_dir, backend="torch")
    yield eng
    eng.close()


def test_frame_store_keeps_newest_and_refuses_stale_unknown_missing():
    clock = Clock()
    store = FrameStore(["front", "back"], convert=lambda raw: raw, clock=clock)
    with pytest.raises(FrameError, match="no frame received yet on camera 'front'"):
        store.take("front", 1.0)
    with pytest.raises(FrameError, match="unknown camera 'side'"):
        store.take("side", 1.0)
    store.put("front", image(1), stamp_s=999.5)
    store.put("front", image(2), stamp_s=999.9)
    frame, rgb = store.take("front", 1.0)
    assert frame.stamp_s == 999.9 and np.array_equal(rgb, image(2))
    clock.now = 1001.5
    with pytest.raises(FrameError, match="1.60 s old"):
        store.take("front", 1.0)
    assert store.take("front", 0.0)[0].stamp_s == 999.9  # 0: no limit
    assert store.ages() == {"front": pytest.approx(1.6), "back": None}


def test_frame_store_uses_arrival_time_when_stamp_is_zero_and_reports_bad_frames():
    clock = Clock()

    def convert(raw):
        if raw == "garbage":
            raise ValueError("truncated data")
        return raw

    store = FrameStore(["cam"], convert=convert, clock=clock)
    store.put("cam", "garbage", stamp_s=0.0)
    clock.now += 0.2
    assert store.ages()["cam"] == pytest.approx(0.2)
    with pytest.raises(FrameError, match="could not be decoded: truncated data"):
        store.take("cam", 1.0)


def test_future_stamps_age_from_arrival_and_bad_age_limits_are_refused():
    """A frame stamped ahead of its arrival (a camera clock running fast) ages from its arrival, so
    it goes stale like any other; NaN, negative or infinite limits are refused, not ignored."""
    clock = Clock()
    store = FrameStore(["cam"], convert=lambda raw: raw, clock=clock)
    store.put("cam", image(3), stamp_s=clock.now + 100.0)
    assert store.take("cam", 1.0)[0].stamp_s == clock.now + 100.0  # fresh on arrival
    assert store.stamps_ahead()["cam"] == pytest.approx(100.0)
    clock.now += 2.0
    with pytest.raises(FrameError, match="2.00 s old"):
        store.take("cam", 1.0)
    for bad in (float("nan"), -1.0, float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="max_frame_age_s must be a finite number"):
            store.take("cam", bad)


def test_annotated_frame_is_a_copy_with_the_text_band():
    from vlsi_model.serving.annotate import annotate_answer

    rgb = image(4)
    rgb.flags.writeable = False  # a received frame may be a read-only view
    drawn = annotate_answer(rgb, "How many objects are there? " * 5, "three")
    assert drawn.shape == rgb.shape and drawn.dtype == np.uint8 and drawn.flags.writeable
    np.testing.assert_array_equal(drawn[:10], rgb[:10])
    assert not np.array_equal(drawn[-8:], rgb[-8:])


def test_worker_answers_like_the_engine_and_records_stats(engine):
    worker = AnswerWorker(engine, capacity=2)
    try:
        rgb = image(3)
        job = AnswerJob("How many objects are there?", lambda: (rgb, "src"), max_new_tokens=6)
        outcome = worker.submit(job).result(timeout=30)
        assert outcome.source == "src"
        assert outcome.result.text == engine.answer(rgb, "How many objects are there?", max_new_tokens=6).text
        stats = worker.stats()
        assert stats["succeeded"] == 1 and stats["latency_p50_ms"] > 0
    finally:
        worker.stop()
    assert not worker.alive


def test_worker_queue_is_bounded_and_failures_do_not_stop_it(engine):
    worker = AnswerWorker(engine, capacity=1)
    gate = threading.Event()

    def slow_image():
        gate.wait(10)
        return image(4), None

    try:
        running = worker.submit(AnswerJob("q?", slow_image, max_new_tokens=2))
        time.sleep(0.1)  # the worker picks the first job up and blocks in resolve_image
        waiting = worker.submit(AnswerJob("q?", lambda: (image(5), None), max_new_tokens=2))
        with pytest.raises(QueueFullError, match="request queue full"):
            worker.submit(AnswerJob("q?", lambda: (image(6), None), max_new_tokens=2))
        assert worker.depth == 2
        gate.set()
        running.result(timeout=30)
        waiting.result(timeout=30)

        def broken():
            raise FrameError("no frame received yet on camera 'x'")

        failed = worker.submit(AnswerJob("q?", broken, max_new_tokens=2))
        with pytest.raises(FrameError):
            failed.result(timeout=30)
        after = worker.submit(AnswerJob("q?", lambda: (image(7), None), max_new_tokens=2))
        assert after.result(timeout=30).result.num_tokens > 0
        assert worker.stats()["failed"] == 1
    finally:
        gate.set()
        worker.stop()


def test_cancelled_jobs_are_skipped_or_stopped(engine):
    worker = AnswerWorker(engine, capacity=2)
    gate = threading.Event()
    try:
        first = worker.submit(AnswerJob("q?", lambda: (gate.wait(10), (image(8), None))[1], max_new_tokens=2))
        time.sleep(0.1)
        queued = AnswerJob("q?", lambda: (image(9), None), max_new_tokens=2)
        worker.submit(queued)
        queued.cancel.set()
        gate.set()
        first.result(timeout=30)
        with pytest.raises(JobCancelledError):
            queued.future.result(timeout=30)
        tokens: list[int] = []
        streaming = AnswerJob("q?", lambda: (image(10), None), max_new_tokens=50,
                              on_token=lambda text, n: tokens.append(n) or n < 3)
        result = worker.submit(streaming).result(timeout=30).result
        assert result.cancelled and tokens == [1, 2, 3]
    finally:
        gate.set()
        worker.stop()


def test_requests_run_before_background_work_and_are_never_refused_because_of_it(engine):
    worker = AnswerWorker(engine, capacity=1, background_capacity=2)
    gate = threading.Event()
    order: list[str] = []

    def resolver(name: str, wait: bool = False):
        def resolve():
            if wait:
                gate.wait(10)
            order.append(name)
            return image(11), name
        return resolve

    try:
        first = worker.submit(AnswerJob("q?", resolver("first", wait=True), max_new_tokens=1))
        time.sleep(0.1)
        backgrounds = [worker.submit(AnswerJob("q?", resolver(f"bg{i}"), max_new_tokens=1), background=True)
                       for i in range(2)]
        with pytest.raises(QueueFullError, match="background queue full"):
            worker.submit(AnswerJob("q?", resolver("bg_extra"), max_new_tokens=1), background=True)
        request = worker.submit(AnswerJob("q?", resolver("request"), max_new_tokens=1))
        assert worker.depth == 2 and worker.background_depth == 2
        gate.set()
        for fut in (first, request, *backgrounds):
            fut.result(timeout=30)
        assert order == ["first", "request", "bg0", "bg1"]
    finally:
        gate.set()
        worker.stop()


def occupy(worker: AnswerWorker, gate: threading.Event):
    """Keep `worker` busy with a job that waits for `gate`, so the jobs submitted before the gate is
    set wait together (to be grouped by frame or batched); returns that job's future."""
    blocker = worker.submit(AnswerJob("q?", lambda: (gate.wait(10), (image(1), "blocker"))[1], 2))
    time.sleep(0.1)
    return blocker


class Recording:
    """The real engine, counting what the worker asks of it."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def answer(self, *args, **kwargs):
        self.calls.append("answer")
        return self.engine.answer(*args, **kwargs)


def test_waiting_questions_about_one_frame_share_its_resolution(engine):
    """Jobs with one frame_key that wait together resolve the frame once and get each their own
    answer (the same answers as one by one); other frames and streaming jobs run on their own."""
    recording = Recording(engine)
    worker = AnswerWorker(recording, capacity=8)
    gate = threading.Event()
    resolved: list[str] = []

    def frame(name: str, seed: int):
        return lambda: (resolved.append(name), (image(seed), name))[1]

    questions = ["How many objects are there?", "What objects are there?", "Is there a red circle?"]
    try:
        blocker = occupy(worker, gate)
        same = [worker.submit(AnswerJob(q, frame("front", 2), 8, frame_key=("front", 1.0))) for q in questions]
        other = worker.submit(AnswerJob(questions[0], frame("back", 3), 8, frame_key=("back", 1.0)))
        streamed = worker.submit(AnswerJob(questions[1], frame("front-stream", 2), 8, frame_key=("front", 1.0),
                                           on_token=lambda text, n: True))
        gate.set()
        blocker.result(timeout=30)
        outcomes = [f.result(timeout=60) for f in same]
        assert resolved.count("front") == 1 and all(o.source == "front" for o in outcomes)
        for q, outcome in zip(questions, outcomes, strict=True):
            assert outcome.result.token_ids == engine.answer(image(2), q, max_new_tokens=8).token_ids
        assert other.result(timeout=30).source == "back" and streamed.result(timeout=30).source == "front-stream"
        assert resolved == ["front", "back", "front-stream"]
    finally:
        gate.set()
        worker.stop()



def test_the_onnxruntime_engine_answers_a_frame_s_waiting_questions_in_one_call(tiny_qwen2vl_dir):
    """With the ONNX Runtime backend too, waiting questions about one frame go to the engine as one
    `answer_many` call (one resize, one vision pass, one prefix), each answer the one it gives alone."""
    from onnx_helpers import export_once

    ort_engine = load_engine(tiny_qwen2vl_dir, backend="onnxruntime", engine_dir=export_once(tiny_qwen2vl_dir),
                             num_threads=1)

    class RecordingMany(Recording):
        def answer_many(self, *args, **kwargs):
            self.calls.append("answer_many")
            return self.engine.answer_many(*args, **kwargs)

    recording = RecordingMany(ort_engine)
    worker = AnswerWorker(recording, capacity=8)
    gate = threading.Event()
    questions = ["How many objects are there?", "What objects are there?", "Is there a red circle?"]
    try:
        blocker = occupy(worker, gate)
        same = [worker.submit(AnswerJob(q, lambda: (image(2), "front"), 8, frame_key=("front", 1.0)))
                for q in questions]
        gate.set()
        blocker.result(timeout=30)
        for q, future in zip(questions, same, strict=True):
            assert future.result(timeout=60).result.token_ids == ort_engine.answer(image(2), q, 8).token_ids
        assert recording.calls == ["answer", "answer_many"]
    finally:
        gate.set()
        worker.stop()
        ort_engine.close()


class RecordingBatches(Recording):
    """The real engine with `answer_batch`, recording each batch's size (`fail`: the batch raises)."""

    supports_batch = True

    def __init__(self, engine, fail: bool = False) -> None:
        super().__init__(engine)
        self.fail = fail
        self.decoding = False  # inside the engine's answer_batch

    def answer_batch(self, images, questions, max_new_tokens, cancels=None, on_answer=None):
        self.calls.append(len(questions))
        if self.fail:
            raise RuntimeError("out of memory in the batch")
        self.decoding = True
        try:
            return self.engine.answer_batch(images, questions, max_new_tokens, cancels=cancels, on_answer=on_answer)
        finally:
            self.decoding = False


def test_a_short_batched_answer_reaches_its_requester_before_the_long_one_ends(engine):
    """In a batch across frames each requester gets its answer when it leaves the batch, not when
    the longest answer beside it ends."""
    recording = RecordingBatches(engine)
    worker = AnswerWorker(recording, capacity=8, max_batch=2)
    gate = threading.Event()
    try:
        blocker = occupy(worker, gate)
        short = worker.submit(AnswerJob("How many objects are there?", lambda: (image(12), 12), 1,
                                        frame_key=("cam", 12)))
        long = worker.submit(AnswerJob("What objects are there?", lambda: (image(13), 13), 12, frame_key=("cam", 13)))
        seen = []  # when the short answer arrived: was the batch still decoding?
        short.add_done_callback(lambda _: seen.append(recording.decoding))
        gate.set()
        blocker.result(timeout=30)
        long_tokens = long.result(timeout=60).result.token_ids
        assert short.result(timeout=60).result.token_ids == engine.answer(image(12), "How many objects are there?",
                                                                           1).token_ids
        assert long_tokens == engine.answer(image(13), "What objects are there?", 12).token_ids
        assert recording.calls == ["answer", 2]
        assert len(long_tokens) > 1  # so the two left the batch at different steps
        assert seen == [True]
        assert worker.succeeded == 3 and worker.failed == 0  # each counted once
    finally:
        gate.set()
        worker.stop()


def test_a_batch_that_fails_after_delivering_answers_the_rest_alone(engine):
    """A batch that raises after one answer left it (e.g. out of memory on a later step): that
    requester keeps the answer it got, counted once; the others are answered one by one."""

    class FailsAfterTheFirst(RecordingBatches):
        def answer_batch(self, images, questions, max_new_tokens, cancels=None, on_answer=None):
            self.calls.append(len(questions))
            on_answer(0, self.engine.answer(images[0], questions[0], max_new_tokens[0]))
            raise RuntimeError("out of memory on decode step 3")

    recording = FailsAfterTheFirst(engine)
    worker = AnswerWorker(recording, capacity=8, max_batch=3)
    gate = threading.Event()
    try:
        blocker = occupy(worker, gate)
        jobs = [worker.submit(AnswerJob("How many objects are there?", lambda s=s: (image(s), s), 6,
                                        frame_key=("cam", s))) for s in (12, 13, 14)]
        gate.set()
        blocker.result(timeout=30)
        for seed, future in zip((12, 13, 14), jobs, strict=True):
            assert future.result(timeout=60).result.token_ids == engine.answer(
                image(seed), "How many objects are there?", 6).token_ids
        assert recording.calls == ["answer", 3, "answer", "answer"]  # the delivered one is not answered again
        assert worker.succeeded == 4 and worker.failed == 0
    finally:
        gate.set()
        worker.stop()


@pytest.mark.parametrize("batch_fails", [False, True])
def test_waiting_requests_about_different_frames_are_decoded_together(engine, batch_fails):
    """Requests about different frames that wait together go to the engine as one batch (up to
    max_batch), each frame resolved once, each answer the one the engine gives alone; a frame that
    cannot be resolved fails its own requests only; a batch that fails is answered one by one."""
    recording = RecordingBatches(engine, fail=batch_fails)
    assert engine.supports_batch
    worker = AnswerWorker(recording, capacity=8, max_batch=3)
    gate = threading.Event()

    def broken():
        raise FrameError("no frame received yet on camera 'left'")

    try:
        blocker = occupy(worker, gate)
        jobs = [worker.submit(AnswerJob("How many objects are there?", lambda s=s: (image(s), s), 8,
                                        frame_key=("cam", s))) for s in (12, 13)]
        failing = worker.submit(AnswerJob("How many objects are there?", broken, 8, frame_key=("left", 1.0)))
        later = worker.submit(AnswerJob("What objects are there?", lambda: (image(14), 14), 8))
        gate.set()
        blocker.result(timeout=30)
        for seed, future in zip((12, 13), jobs, strict=True):
            outcome = future.result(timeout=60)
            assert outcome.source == seed
            assert outcome.result.token_ids == engine.answer(image(seed), "How many objects are there?", 8).token_ids
        with pytest.raises(FrameError):
            failing.result(timeout=30)
        assert later.result(timeout=60).result.token_ids == engine.answer(image(14), "What objects are there?",
                                                                           8).token_ids
        # blocker; a batch of 3 with one frame failed (or the batch failed: the 2 answered alone); the 4th
        assert recording.calls == (["answer", 2, "answer", "answer", "answer"] if batch_fails
                                   else ["answer", 2, "answer"])
    finally:
        gate.set()
        worker.stop()
    with pytest.raises(ValueError, match="max_batch"):
        AnswerWorker(engine, capacity=1, max_batch=0)
