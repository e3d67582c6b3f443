"""vqa_node end to end: the installed executable in its own process, real rclpy + Fast DDS.

Answers are checked against the same model run in the test process on the exact pixels of
the frame the node reports in `image_header`, so a test fails if the node answers about the
wrong frame, mangles an encoding, or loses the header.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from ros_harness import ClientHarness, NodeProcess, wait_for
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene
from vlsi_model.engine import load_engine
from vlsi_model.serving import NO_FRAME_YET
from vlsi_ros.ask_client import AskClient
from vlsi_ros.image_conversion import image_msg_to_rgb, rgb_to_compressed_msg, rgb_to_image_msg
from vlsi_ros.msg import Answer
from vlsi_ros.srv import Ask

pytestmark = pytest.mark.ros

QUESTION = "How many objects are there?"
# The cancel test asks for this many tokens: long enough (~1-2 s for the tiny model) that a cancel
# sent after the second token arrives first even on a loaded machine.
CANCEL_TEST_TOKENS = 1500
RELIABLE = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


def scene_image(seed: int, width: int = 160, height: int = 120) -> np.ndarray:
    return render_scene(generate_scene(seed, SceneConfig(width=width, height=height)))


def header(sec: int, nanosec: int = 0, frame_id: str = "camera") -> Header:
    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = sec, nanosec
    return h


# raw_node's frame-age limit: long enough that a frame answered about stays fresh for the next
# request of the same test on a loaded machine, short of the 30 s-old frame that must be refused.
NODE_MAX_FRAME_AGE_S = 15.0


def now_header(node, frame_id: str = "camera", age_s: float = 0.0) -> Header:
    ns = node.get_clock().now().nanoseconds - int(age_s * 1e9)
    return header(ns // 1_000_000_000, ns % 1_000_000_000, frame_id)


@pytest.fixture(scope="module")
def reference_engine(tiny_qwen2vl_dir):
    engine = load_engine(tiny_qwen2vl_dir, backend="torch")
    yield engine
    engine.close()


def expected_answer(engine, rgb: np.ndarray, question: str = QUESTION, max_new_tokens: int = 8) -> str:
    return engine.answer(rgb, question, max_new_tokens=max_new_tokens).text


@pytest.fixture(scope="module")
def raw_node(ros_context, tiny_qwen2vl_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vqa_raw.log"
    proc = NodeProcess("vqa_node", {"model_path": str(tiny_qwen2vl_dir), "max_new_tokens": 8,
                                    "max_new_tokens_limit": CANCEL_TEST_TOKENS,
                                    "queue_size": 2, "max_frame_age_s": NODE_MAX_FRAME_AGE_S,
                                    "diagnostics_period_s": 0.2,
                                    "max_question_chars": 200, "publish_annotated": True}, log_path=log)
    harness = ClientHarness("raw_client")
    try:
        harness.client.wait_until_ready(60)
        harness.publisher = harness.node.create_publisher(Image, "image", RELIABLE)
        yield proc, harness
    finally:
        harness.close()
        code = proc.stop()
        assert code == 0, proc.log_text()


def publish_until_answered(harness, msg, question: str = QUESTION, **kw) -> Ask.Response:
    """Publish `msg` until the node answers about it (discovery may drop the first frames, and,
    on a loaded machine, the first replies: Fast DDS gives up sending a service response when the
    client's reply reader is not matched yet, "failed to send response (timeout)" in the node's
    log; such a lost reply is asked again after 15 s).

    Each copy is stamped afresh with the age `msg` had when this was called (`msg.header` is
    updated in place, so it names the copy answered about): a lost reply must not leave the
    node holding a frame that has gone stale meanwhile (a CI run under load asked about one
    stamp for 60 s and got only "60.88 s old" refusals)."""
    clock = harness.node.get_clock()
    age_ns = clock.now().nanoseconds - (msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
    deadline = time.monotonic() + 60
    response = None
    while time.monotonic() < deadline:
        ns = clock.now().nanoseconds - age_ns
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
        harness.publisher.publish(msg)
        time.sleep(0.05)
        try:
            response = harness.client.ask(question, **{"timeout_s": 15.0, **kw})
        except TimeoutError:
            continue
        if response.success and response.image_header == msg.header:
            return response
    raise AssertionError(f"node never answered about frame {msg.header}: last {response}")


def test_client_asks_again_until_the_first_frame_arrives(raw_node, reference_engine):
    # First test on this node: no frame has been published yet.
    proc, harness = raw_node
    refused = harness.client.ask(QUESTION)
    assert not refused.success and refused.error.startswith(NO_FRAME_YET), refused.error
    started = time.monotonic()  # other refusals are returned at once, not retried
    assert "unknown camera" in harness.client.ask(QUESTION, camera="nope", wait_for_frame_s=30).error
    assert time.monotonic() - started < 10
    answered = threading.Event()

    def publish_after_a_second() -> None:
        # Until the answer is in (discovery may drop the first frames; a loaded CI machine may take
        # seconds), each frame freshly stamped so none is refused as too old.
        time.sleep(1.0)
        deadline = time.monotonic() + 25
        while not answered.is_set() and time.monotonic() < deadline:
            harness.publisher.publish(rgb_to_image_msg(scene_image(9), "rgb8", now_header(harness.node, "first")))
            time.sleep(0.05)

    publisher = threading.Thread(target=publish_after_a_second)
    publisher.start()
    try:
        response = harness.client.ask(QUESTION, wait_for_frame_s=30)
    finally:
        answered.set()
        publisher.join()
    assert response.success, response.error
    assert response.image_header.frame_id == "first"
    assert response.answer == expected_answer(reference_engine, scene_image(9))


def test_answers_newest_frame_with_its_header(raw_node, reference_engine):
    proc, harness = raw_node
    old, new = scene_image(1), scene_image(2)
    harness.publisher.publish(rgb_to_image_msg(old, "rgb8", now_header(harness.node, "cam_old")))
    newest = rgb_to_image_msg(new, "rgb8", now_header(harness.node, "cam_new"))
    response = publish_until_answered(harness, newest)
    assert response.image_header.frame_id == "cam_new"
    assert response.answer == expected_answer(reference_engine, new)
    assert response.num_tokens > 0
    assert response.vision_ms > 0 and response.prefill_ms > 0 and response.decode_ms >= 0
    assert response.engine_ms >= response.vision_ms + response.prefill_ms + response.decode_ms
    assert 0 <= response.frame_age_s < NODE_MAX_FRAME_AGE_S and response.queue_ms >= 0
    assert proc.alive()


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_every_encoding_is_answered_about_the_right_pixels(raw_node, reference_engine, encoding):
    _, harness = raw_node
    rgb = scene_image(10 + len(encoding))
    msg = rgb_to_image_msg(rgb, encoding, now_header(harness.node, f"enc_{encoding}"))
    response = publish_until_answered(harness, msg)
    assert response.answer == expected_answer(reference_engine, image_msg_to_rgb(msg))


def test_row_padding_is_handled(raw_node, reference_engine):
    _, harness = raw_node
    rgb = scene_image(33, width=101, height=77)
    padded = np.zeros((77, 101 * 3 + 13), np.uint8)
    padded[:, : 101 * 3] = rgb.reshape(77, -1)
    msg = Image(header=now_header(harness.node, "padded"), height=77, width=101, encoding="rgb8",
                step=101 * 3 + 13, data=padded.tobytes())
    response = publish_until_answered(harness, msg)
    assert response.answer == expected_answer(reference_engine, rgb)


def test_request_image_is_answered_instead_of_camera(raw_node, reference_engine):
    _, harness = raw_node
    rgb = scene_image(44)
    request = Ask.Request(question=QUESTION, image=rgb_to_image_msg(rgb, "bgr8", header(123, 456, "request_frame")))
    future = harness.client.service.call_async(request)
    response = wait_for(lambda: future.result() if future.done() else None, 30, what="service reply")
    assert response.success, response.error
    assert response.image_header.frame_id == "request_frame"
    assert (response.image_header.stamp.sec, response.image_header.stamp.nanosec) == (123, 456)
    assert response.answer == expected_answer(reference_engine, rgb)


@pytest.mark.parametrize("question,fragment", [
    ("", "question is empty"),
    ("   ", "question is empty"),
    ("why " * 100, "question is too long"),
])
def test_bad_questions_are_refused_clearly(raw_node, question, fragment):
    proc, harness = raw_node
    response = harness.client.ask(question)
    assert not response.success and fragment in response.error
    assert proc.alive()


def test_unknown_camera_and_stale_frames_are_refused(raw_node):
    proc, harness = raw_node
    response = harness.client.ask(QUESTION, camera="nope")
    assert not response.success and "unknown camera 'nope'" in response.error
    stale = rgb_to_image_msg(scene_image(5), "rgb8", now_header(harness.node, "stale", age_s=30.0))
    for _ in range(5):
        harness.publisher.publish(stale)
        time.sleep(0.05)
    response = harness.client.ask(QUESTION)
    assert not response.success and "s old (max_frame_age_s" in response.error
    # A per-request age limit applies too: a 2 s old frame is fine by default but not at 0.5 s.
    recent = rgb_to_image_msg(scene_image(6), "rgb8", now_header(harness.node, "recent", age_s=2.0))
    ok = publish_until_answered(harness, recent)
    assert ok.success
    response = harness.client.ask(QUESTION, max_frame_age_s=0.5)
    assert not response.success and "max_frame_age_s 0.50" in response.error
    assert proc.alive()


@pytest.mark.parametrize("mutate,fragment", [
    (lambda m: setattr(m, "encoding", "yuv444_made_up"), "unsupported image encoding"),
    (lambda m: setattr(m, "data", bytes(m.data)[: len(m.data) // 2]), "truncated"),
    (lambda m: setattr(m, "step", 3), "step"),
])
def test_bad_frames_are_reported_and_node_keeps_serving(raw_node, reference_engine, mutate, fragment):
    proc, harness = raw_node
    bad = rgb_to_image_msg(scene_image(7), "rgb8", now_header(harness.node, "bad"))
    mutate(bad)

    def refused_with_fragment():
        harness.publisher.publish(bad)
        time.sleep(0.05)
        response = harness.client.ask(QUESTION)
        return response if (not response.success and "could not be decoded" in response.error) else None

    response = wait_for(refused_with_fragment, 20, interval_s=0.0, what="bad frame refusal")
    assert fragment in response.error.lower()
    good = rgb_to_image_msg(scene_image(8), "rgb8", now_header(harness.node, "good_again"))
    assert publish_until_answered(harness, good).answer == expected_answer(reference_engine, scene_image(8))
    assert proc.alive()


def test_full_queue_refuses_with_clear_error(raw_node):
    proc, harness = raw_node
    publish_until_answered(harness, rgb_to_image_msg(scene_image(9), "rgb8", now_header(harness.node)))
    requests = [Ask.Request(question=QUESTION, max_new_tokens=200) for _ in range(8)]
    futures = [harness.client.service.call_async(r) for r in requests]
    responses = [wait_for(lambda f=f: f.result() if f.done() else None, 120, what="reply") for f in futures]
    refused = [r for r in responses if not r.success]
    assert any("request queue full" in r.error for r in refused), [r.error for r in responses]
    assert any(r.success for r in responses)
    assert proc.alive()


def test_action_streams_tokens_and_matches_service(raw_node, reference_engine):
    """Feedback arrives token by token as prefixes of the answer; the result carries the whole answer.

    rclpy's ActionClient discards feedback it processes after the result (it drops the goal's
    feedback callback once the result is in), and both can be ready in the same executor wake-up,
    where the result is handled first: the tail of the stream may never reach a client. So the
    test asks for a long answer (the first tokens' feedback is out long before the result) and
    checks what did arrive, in order; clients take the final text from the result (ask_client does).
    A reader that falls behind a fast generation also skips feedback (keep-last history): harmless,
    since each `partial_answer` is the whole answer so far.
    """
    _, harness = raw_node
    rgb = scene_image(11)
    msg = rgb_to_image_msg(rgb, "rgb8", now_header(harness.node, "stream"))
    publish_until_answered(harness, msg)
    feedback: list[tuple[str, int]] = []
    result, status = harness.client.ask_stream(QUESTION, max_new_tokens=64,
                                               on_feedback=lambda text, n: feedback.append((text, n)))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert result.image_header == msg.header
    assert result.answer == expected_answer(reference_engine, rgb, max_new_tokens=64)
    assert feedback, "no token feedback arrived before the result"
    counts = [n for _, n in feedback]
    assert counts == sorted(set(counts)) and counts[0] >= 1  # in order, no repeats (a slow reader may skip some)
    assert all(result.answer.startswith(text.strip()) for text, _ in feedback)  # each one the answer so far


def test_action_answers_a_goal_image_with_the_timing_breakdown(raw_node, reference_engine):
    """The action offers what the service does: an image in the goal, a frame-age limit, and the
    vision / prefill / decode breakdown in the result."""
    _, harness = raw_node
    rgb = scene_image(15)
    result, status = harness.client.ask_stream(QUESTION, image=rgb, max_new_tokens=8)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert result.answer == expected_answer(reference_engine, rgb)
    assert result.num_tokens > 0 and result.vision_ms > 0 and result.prefill_ms > 0
    assert result.engine_ms >= result.vision_ms + result.prefill_ms + result.decode_ms
    assert result.total_ms >= result.engine_ms and result.queue_ms >= 0
    stale = rgb_to_image_msg(scene_image(16), "rgb8", now_header(harness.node, "stale_goal", age_s=3.0))
    publish_until_answered(harness, stale)  # fine under the node's limit ...
    result, status = harness.client.ask_stream(QUESTION, max_frame_age_s=1.0)  # ... not under the goal's 1 s
    assert status == GoalStatus.STATUS_ABORTED and not result.success
    assert "max_frame_age_s 1.00" in result.error
    result, status = harness.client.ask_stream(QUESTION, max_frame_age_s=float("nan"))
    assert status == GoalStatus.STATUS_ABORTED and "finite number" in result.error


class LoseFirstReply:
    """Wraps a client's send function: the first request really goes out (the node answers it) but
    its reply never reaches the caller, as when Fast DDS drops a reply during discovery."""

    def __init__(self, send) -> None:
        self.send, self.calls = send, 0

    def __call__(self, *args, **kwargs) -> Future:
        self.calls += 1
        future = self.send(*args, **kwargs)
        return Future() if self.calls == 1 else future


def test_a_reply_lost_at_first_contact_is_asked_again_and_only_then(raw_node, reference_engine):
    _, harness = raw_node
    client = AskClient(harness.node, spin=False, resend_first_after_s=0.5)
    client.wait_until_ready(60)
    rgb = scene_image(21)
    call_async = client.service.call_async
    client.service.call_async = lost = LoseFirstReply(call_async)
    response = client.ask(QUESTION, image=rgb, timeout_s=30)
    assert response.success and response.answer == expected_answer(reference_engine, rgb), response.error
    assert lost.calls == 2  # sent once more, not every 0.5 s
    # The service has replied once: a later slow reply is waited for, not asked twice of the node.
    client.service.call_async = lost = LoseFirstReply(call_async)
    with pytest.raises(TimeoutError):
        client.ask(QUESTION, image=rgb, timeout_s=2.0)
    assert lost.calls == 1
    # A goal whose acceptance was lost: the copy (same goal id) is refused, and the result of the
    # goal the node did accept comes back.
    client.action.send_goal_async = lost = LoseFirstReply(client.action.send_goal_async)
    result, status = client.ask_stream(QUESTION, image=rgb, max_new_tokens=8, timeout_s=30)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert result.answer == response.answer and lost.calls == 2


def test_annotated_frame_shows_question_and_answer(raw_node):
    """With publish_annotated, each answered frame comes back on answers/image with its header,
    the picture unchanged above a band holding the question and the answer."""
    _, harness = raw_node
    drawn: list[Image] = []
    sub = harness.node.create_subscription(Image, "answers/image", drawn.append, RELIABLE)
    wait_for(lambda: sub.get_publisher_count() > 0, 10, what="discovery of answers/image")
    rgb = scene_image(17)
    msg = rgb_to_image_msg(rgb, "rgb8", now_header(harness.node, "annotated"))
    out = None
    for _ in range(3):  # the node may match our subscriber after it publishes the first one (load): ask again
        publish_until_answered(harness, msg)  # a fresh stamp each time
        try:
            out = wait_for(lambda: next((m for m in drawn if m.header == msg.header), None), 10,
                           what="annotated frame")
            break
        except TimeoutError:
            continue
    assert out is not None, "no annotated frame came back for any of 3 answered frames"
    pixels = image_msg_to_rgb(out)
    assert pixels.shape == rgb.shape
    np.testing.assert_array_equal(pixels[: rgb.shape[0] // 2], rgb[: rgb.shape[0] // 2])
    assert not np.array_equal(pixels[-10:], rgb[-10:])
    harness.node.destroy_subscription(sub)


def test_action_cancel_stops_generation(raw_node, reference_engine):
    """A cancel after 2 streamed tokens ends the goal as cancelled. The question is one the model
    answers at length uncancelled (checked on the reference engine: >= 1000 tokens), so the cancel
    has a window of seconds to arrive even on a loaded machine, instead of racing the answer's end."""
    _, harness = raw_node
    rgb = scene_image(12)
    candidates = ("Describe the image in one sentence.", "Where is each object?", "What objects are there?", QUESTION)
    lengths = {q: len(reference_engine.answer(rgb, q, max_new_tokens=CANCEL_TEST_TOKENS).token_ids)
               for q in candidates}
    question = max(candidates, key=lengths.get)
    uncancelled = lengths[question]
    assert uncancelled >= 1000, f"the test needs a long answer; the lengths are {lengths}"
    publish_until_answered(harness, rgb_to_image_msg(rgb, "rgb8", now_header(harness.node)))
    feedback: list[int] = []
    result, status = harness.client.ask_stream(question, max_new_tokens=CANCEL_TEST_TOKENS, cancel_after_tokens=2,
                                               on_feedback=lambda text, n: feedback.append(n))
    assert status == GoalStatus.STATUS_CANCELED
    assert not result.success and result.error == "cancelled"
    assert 2 <= len(feedback) < uncancelled


def test_questions_topic_publishes_answers_tied_to_frame(raw_node, reference_engine):
    _, harness = raw_node
    received: list[Answer] = []
    sub = harness.node.create_subscription(Answer, "answers", received.append, 10)
    pub = harness.node.create_publisher(String, "questions", 10)
    rgb = scene_image(13)
    msg = rgb_to_image_msg(rgb, "rgb8", now_header(harness.node, "topic_frame"))
    publish_until_answered(harness, msg)
    wait_for(lambda: pub.get_subscription_count() > 0 and sub.get_publisher_count() > 0, 10, what="discovery")
    pub.publish(String(data=QUESTION))
    answer = wait_for(lambda: next((a for a in received if a.header == msg.header), None), 30, what="answer")
    assert answer.question == QUESTION and answer.camera == "default"
    assert answer.answer == expected_answer(reference_engine, rgb)
    assert answer.total_ms > 0 and answer.model
    harness.node.destroy_subscription(sub)
    harness.node.destroy_publisher(pub)


def test_diagnostics_report_model_queue_and_frame_age(raw_node):
    _, harness = raw_node
    arrays: list[DiagnosticArray] = []
    sub = harness.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    publish_until_answered(harness, rgb_to_image_msg(scene_image(14), "rgb8", now_header(harness.node)))
    array = wait_for(lambda: arrays[-1] if arrays else None, 15, what="diagnostics")
    status = array.status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert values["backend"] == "torch"
    assert values["queue_capacity"] == "2"
    assert float(values["frame_age_s.default"]) < NODE_MAX_FRAME_AGE_S
    assert int(values["answered"]) >= 1
    assert float(values["latency_p50_ms"]) > 0
    harness.node.destroy_subscription(sub)


# ------------------------------------------------------------------ compressed + several cameras


# Module-scoped nodes live side by side (raw_node is still up): each gets its own namespace
# so the client's `ask` can only reach the node under test.
MULTI_NS = "/multi"
TIMEOUT_NS = "/timeout"


@pytest.fixture(scope="module")
def multi_camera_node(ros_context, yes_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vqa_multi.log"
    proc = NodeProcess("vqa_node", {
        "model_path": str(yes_model_dir), "transport": "compressed", "cameras": ["front", "back"],
        "default_camera": "back", "max_new_tokens": 4, "max_frame_age_s": 10.0,
        "standing_questions": ["How many objects are there?"], "standing_rate_hz": 5.0,
        "alert_questions": ["Is there a red circle?"], "alert_rate_hz": 5.0, "alert_cooldown_s": 1.0,
    }, extra=["-r", f"__ns:={MULTI_NS}"], log_path=log)
    harness = ClientHarness("multi_client", namespace=MULTI_NS)
    try:
        harness.client.wait_until_ready(60)
        yield proc, harness
    finally:
        harness.close()
        assert proc.stop() == 0, proc.log_text()


def test_compressed_cameras_by_name_standing_questions_and_alerts(multi_camera_node, yes_model_dir):
    proc, harness = multi_camera_node
    node = harness.node
    pubs = {cam: node.create_publisher(CompressedImage, f"{MULTI_NS}/{cam}/image/compressed", RELIABLE)
            for cam in ("front", "back")}
    answers: list[Answer] = []
    alerts: list[Answer] = []
    node.create_subscription(Answer, f"{MULTI_NS}/answers", answers.append, 50)
    node.create_subscription(Answer, f"{MULTI_NS}/alerts", alerts.append, 50)
    frames = {cam: rgb_to_compressed_msg(scene_image(20 + i), "png", header=now_header(node, f"{cam}_frame"))
              for i, cam in enumerate(pubs)}
    stop = threading.Event()

    def keep_publishing():
        while not stop.is_set():
            for cam, pub in pubs.items():
                frames[cam].header = now_header(node, f"{cam}_frame")
                pub.publish(frames[cam])
            time.sleep(0.1)

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        response = wait_for(lambda: (lambda r: r if r.success else None)(harness.client.ask(QUESTION, camera="front")),
                            30, what="front answer")
        assert response.image_header.frame_id == "front_frame"
        # default camera: back (asked again while its first frame is still on its way)
        response = harness.client.ask(QUESTION, wait_for_frame_s=20)
        assert response.success, response.error
        assert response.image_header.frame_id == "back_frame"
        assert response.answer == "yes"  # the fixture model was trained to say yes
        wait_for(lambda: {a.camera for a in answers} >= {"front", "back"}, 20, what="standing answers")
        assert all(a.question == "How many objects are there?" for a in answers)
        assert all(a.header.frame_id == f"{a.camera}_frame" for a in answers)
        wait_for(lambda: {a.camera for a in alerts} >= {"front", "back"}, 20, what="alerts")
        time.sleep(1.5)
        per_camera = {cam: sorted(a.header.stamp.sec + a.header.stamp.nanosec * 1e-9 for a in alerts if a.camera == cam)
                      for cam in ("front", "back")}
        for stamps in per_camera.values():  # cooldown 1 s between alerts of one camera/question
            assert all(b - a >= 0.8 for a, b in zip(stamps, stamps[1:], strict=False)), stamps
    finally:
        stop.set()
        publisher.join(2)
    assert proc.alive()


# ------------------------------------------------------------------ lifecycle (in process)


def count_entities(node) -> dict[str, int]:
    return {"publishers": len(list(node.publishers)), "subscriptions": len(list(node.subscriptions)),
            "services": len(list(node.services)), "timers": len(list(node.timers)),
            "threads": threading.active_count()}


def test_lifecycle_transitions_leak_nothing(ros_context, tiny_qwen2vl_dir):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlsi_ros.vqa_node import VqaNode

    node = VqaNode(parameter_overrides=[
        Parameter("autostart", value=False), Parameter("model_path", value=str(tiny_qwen2vl_dir)),
        Parameter("standing_questions", value=["What is there?"]), Parameter("standing_rate_hz", value=2.0)])
    try:
        before = count_entities(node)
        for _ in range(2):
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            configured = count_entities(node)
            # the camera subscription and the worker thread; the services live with the node
            assert configured["subscriptions"] == before["subscriptions"] + 1
            assert configured["services"] == before["services"] and configured["threads"] == before["threads"] + 1
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            assert count_entities(node)["timers"] == configured["timers"] + 1  # the standing-question timer
            assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            assert count_entities(node) == configured
            assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
            wait_for(lambda: count_entities(node) == before, 5, what="entities released")
    finally:
        node.destroy_node()


def test_unloadable_model_fails_configure_without_crashing(ros_context, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlsi_ros.vqa_node import VqaNode

    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    node = VqaNode(parameter_overrides=[Parameter("autostart", value=False),
                                        Parameter("model_path", value=str(broken))])
    try:
        before = count_entities(node)
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert count_entities(node) == before
    finally:
        node.destroy_node()


def test_bad_parameters_fail_configure(ros_context, tiny_qwen2vl_dir):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlsi_ros.vqa_node import VqaNode

    node = VqaNode(parameter_overrides=[Parameter("autostart", value=False),
                                        Parameter("model_path", value=str(tiny_qwen2vl_dir)),
                                        Parameter("transport", value="carrier_pigeon")])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    finally:
        node.destroy_node()



def test_request_timeout_gives_clear_error_and_node_keeps_serving(ros_context, tiny_qwen2vl_dir):
    """In process: a request that cannot finish within request_timeout_s fails with a timeout."""
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from vlsi_ros.vqa_node import VqaNode

    node = VqaNode(namespace=TIMEOUT_NS, parameter_overrides=[
        Parameter("model_path", value=str(tiny_qwen2vl_dir)), Parameter("request_timeout_s", value=0.02),
        Parameter("max_new_tokens_limit", value=2000), Parameter("image_qos", value="reliable")])
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    harness = ClientHarness("timeout_client", namespace=TIMEOUT_NS)
    try:
        harness.client.wait_until_ready(30)
        harness.publisher = harness.node.create_publisher(Image, f"{TIMEOUT_NS}/image", RELIABLE)
        msg = rgb_to_image_msg(scene_image(50), "rgb8", now_header(harness.node, "timeout_frame"))

        def timed_out():
            harness.publisher.publish(msg)
            response = harness.client.ask(QUESTION, max_new_tokens=2000)
            return response if "timed out after 0.02 s" in response.error else None

        response = wait_for(timed_out, 30, what="timeout error")
        assert not response.success and "request_timeout_s" in response.error
        # The timed-out generation is cancelled, so the worker is free again at once.
        wait_for(lambda: node._worker.depth == 0, 5, what="worker idle after cancel")
    finally:
        harness.close()
        executor.shutdown()
        spinner.join(5)
        node.release()
        node.destroy_node()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_qwen3vl_model_serves_like_its_engine(ros_context, tiny_qwen3vl_dir, tmp_path, backend):
    """The node is architecture-agnostic: a Qwen3-VL directory (torch, or its ONNX export with
    DeepStack) answers about the frame it was sent exactly as the torch engine does."""
    from onnx_helpers import export_once

    params = {"model_path": str(tiny_qwen3vl_dir), "backend": backend, "max_new_tokens": 8, "max_frame_age_s": 30.0}
    if backend == "onnxruntime":
        params["engine_dir"] = str(export_once(tiny_qwen3vl_dir))
    namespace = f"/qwen3vl_{backend}"  # raw_node is still up: its `ask` must not answer for this one
    proc = NodeProcess("vqa_node", params, extra=["-r", f"__ns:={namespace}"], log_path=tmp_path / "vqa_qwen3vl.log")
    harness = ClientHarness(f"qwen3vl_client_{backend}", namespace=namespace)
    engine = load_engine(tiny_qwen3vl_dir, backend="torch")
    try:
        harness.client.wait_until_ready(60)
        harness.publisher = harness.node.create_publisher(Image, f"{namespace}/image", RELIABLE)
        image = scene_image(4)
        response = publish_until_answered(harness, rgb_to_image_msg(image, "rgb8", now_header(harness.node, "q3")))
        assert response.answer == expected_answer(engine, image)
    finally:
        engine.close()
        harness.close()
        code = proc.stop()
        assert code == 0, proc.log_text()
