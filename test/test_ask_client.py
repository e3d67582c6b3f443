"""AskClient's resend of a first request whose reply may have been lost (see its docstring), on
rclpy futures completed by the test: which reply a caller gets when the original and its copy
answer differently, late or never. The real node's side is in test_vqa_node.py."""

from __future__ import annotations

import threading
import time

import pytest
import rclpy
from rclpy.task import Future

from vlsi_ros.ask_client import AskClient

pytestmark = pytest.mark.ros


@pytest.fixture
def client(ros_context):
    node = rclpy.create_node("ask_client_resend_test")
    yield AskClient(node, spin=False, resend_first_after_s=0.2)
    node.destroy_node()


def replies(*results: str | None):
    """A send function whose n-th request gets `results[n]` (None: no reply ever), and the futures."""
    futures: list[Future] = []

    def send() -> Future:
        future = Future()
        result = results[len(futures)]
        if result is not None:
            future.set_result(result)
        futures.append(future)
        return future

    return send, futures


def answered(reply: str) -> bool:
    return reply.startswith("answer")


def test_a_copy_that_answers_is_taken_at_once(client):
    send, futures = replies(None, "answer")
    started = time.monotonic()
    assert client._reply("ask", send, timeout_s=10, settles=answered) == "answer"
    assert len(futures) == 2 and time.monotonic() - started < 5


def test_a_copy_refused_while_the_original_is_pending_waits_for_the_original(client):
    # A slow first answer: its copy finds the queue full; the original's answer must win.
    send, futures = replies(None, "refused: queue full")
    threading.Timer(0.8, lambda: futures[0].set_result("answer, late")).start()
    assert client._reply("ask", send, timeout_s=10, settles=answered) == "answer, late"


def test_the_copy_refusal_comes_back_when_the_original_never_replies(client):
    send, _ = replies(None, "refused: queue full")
    started = time.monotonic()
    assert client._reply("ask", send, timeout_s=1.0, settles=answered) == "refused: queue full"
    assert time.monotonic() - started >= 1.0


def test_no_copy_once_the_channel_has_replied_and_no_reply_times_out(client):
    send, futures = replies("answer")
    assert client._reply("ask", send, timeout_s=5, settles=answered) == "answer"
    send, futures = replies(None, "answer")
    with pytest.raises(TimeoutError):
        client._reply("ask", send, timeout_s=0.6, settles=answered)
    assert len(futures) == 1
    send, futures = replies(None, "answer")  # another channel still gets its copy
    assert client._reply("result", send, timeout_s=5) == "answer" and len(futures) == 2
