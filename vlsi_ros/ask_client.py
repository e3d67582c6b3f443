"""A small client for vqa_node's `ask` service and `ask_stream` action (no ros2cli needed).

    ask_client "How many objects are there?"            # service, newest camera frame
    ask_client "What is in front?" --stream             # action, prints tokens as they come
    ask_client "What color is the circle?" --image photo.png

Also the library the demo and the tests use to talk to the node.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.task import Future
from unique_identifier_msgs.msg import UUID

from vlsi_model.serving import NO_FRAME_YET
from vlsi_ros.action import Ask as AskAction
from vlsi_ros.image_conversion import rgb_to_image_msg
from vlsi_ros.qos import request_qos
from vlsi_ros.srv import Ask

# The client keeps as many replies as the node keeps requests: a client that sends a burst and
# spins late must not lose replies in its own middleware history (the rmw default keeps 10).
CLIENT_QUEUE_DEPTH = 1000

# How long the first request on each channel (service, goal, result) waits for its reply before
# it is sent again; see AskClient.
RESEND_FIRST_AFTER_S = 10.0


class AskClient:
    """Blocking helpers over the service and the action.

    With `spin=True` the calls spin `node` while they wait, on a SingleThreadedExecutor this
    client owns (added once: rclpy.spin_until_future_complete(node, ...) would add and remove
    the node on every call, ~0.3 ms of a round trip); pass `spin=False` when an executor
    thread already spins it (the calls then wait for the futures' done callbacks, one more
    executor iteration and thread hop per call).

    Lost first replies: a DDS service reply is dropped when the server answers before its reply
    writer has matched this client's reply reader (Fast DDS waits 100 ms for the match and then
    gives up, "failed to send response (timeout)" in the node's log; ros2/rmw_fastrtps#392 and #842).
    `wait_for_service` cannot see that half of discovery, and on a loaded machine it can lag by
    seconds, so the first call would hang until its timeout. Until a channel (the service, the
    action's goal and result services) has delivered one reply, a request with no reply after
    `resend_first_after_s` (0: never) is sent once more. Once, not repeatedly: each copy of a
    question costs the node an answer. The original's reply is taken whenever it comes; a copy's
    reply is taken at once when it is an answer, while a copy's refusal (a slow first answer's copy
    can find the queue full) is returned only if the original never replies. A resent goal keeps
    its goal id, which the node refuses to run twice (it keeps finished goals for 120 s, longer than
    the resend delay; vqa_node.ACTION_RESULT_KEEP_S); a resent result request costs nothing.
    """

    def __init__(self, node: Node, namespace: str = "", spin: bool = True,
                 resend_first_after_s: float = RESEND_FIRST_AFTER_S) -> None:
        prefix = f"{namespace.rstrip('/')}/" if namespace else ""
        self.node = node
        self.spin = spin
        self.resend_first_after_s = resend_first_after_s
        self._channels_replied: set[str] = set()
        qos = request_qos(CLIENT_QUEUE_DEPTH)
        self.service = node.create_client(Ask, f"{prefix}ask", qos_profile=qos)
        self.action = ActionClient(node, AskAction, f"{prefix}ask_stream", goal_service_qos_profile=qos,
                                   result_service_qos_profile=qos, cancel_service_qos_profile=qos)
        self._executor: SingleThreadedExecutor | None = None

    def _own_executor(self) -> SingleThreadedExecutor:
        if self._executor is None:
            self._executor = SingleThreadedExecutor(context=self.node.context)
            self._executor.add_node(self.node)
        return self._executor

    def spin_once(self, timeout_sec: float = 0.1) -> None:
        """Serve the node's other callbacks (subscriptions) between calls, on the client's executor."""
        if not self.spin:
            raise RuntimeError("spin_once: another executor spins this node (spin=False)")
        self._own_executor().spin_once(timeout_sec=timeout_sec)

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        if not self.service.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"service {self.service.srv_name} not available after {timeout_s:.0f} s")
        if not self.action.wait_for_server(timeout_sec=timeout_s):
            raise TimeoutError(f"action ask_stream not available after {timeout_s:.0f} s")

    def _reply(self, channel: str, send: Callable[[], Future], timeout_s: float,
               settles: Callable[[object], bool] = lambda reply: True):
        """Send with `send()` and wait at most `timeout_s` for the reply; while `channel` has never
        replied, send once more after `resend_first_after_s` (see the class docstring). The
        original's reply is returned whenever it comes, the copy's at once if `settles(reply)`,
        else only when the time is up with no reply from the original."""
        replied = threading.Event()  # set by any copy's reply (the spin=False path waits on it)
        futures: list[Future] = []

        def send_copy() -> None:
            future = send()
            future.add_done_callback(lambda _: replied.set())
            futures.append(future)

        now = time.monotonic()
        deadline = now + timeout_s
        resend = self.resend_first_after_s > 0 and channel not in self._channels_replied
        next_copy = now + self.resend_first_after_s if resend else float("inf")
        send_copy()
        while True:
            if futures[0].done():
                reply = futures[0].result()
                break
            copy = futures[1] if len(futures) > 1 and futures[1].done() else None
            if copy is not None and settles(copy.result()):
                reply = copy.result()
                break
            now = time.monotonic()
            if now >= deadline:
                if copy is None:
                    raise TimeoutError(f"no reply after {timeout_s:.0f} s")
                reply = copy.result()
                break
            if now >= next_copy:
                send_copy()
                next_copy = float("inf")
                continue
            wait_s = min(deadline, next_copy) - now
            if self.spin:  # returns after one callback, or when the time is up
                self._own_executor().spin_once(timeout_sec=wait_s)
            else:  # an executor thread already spins the node: wait for a done callback
                replied.clear()
                if not futures[0].done() and not (len(futures) > 1 and futures[1].done()):
                    replied.wait(wait_s)
        self._channels_replied.add(channel)
        if channel == "ask":  # the other copy's reply would only be dropped on arrival
            for future in futures:
                if not future.done():
                    self.service.remove_pending_request(future)
        return reply

    def _asking_again_while_no_frame(self, send: Callable[[], object], error_of: Callable[[object], str],
                                     wait_for_frame_s: float) -> object:
        """Send, and send again every 0.1 s while the node refuses with "no frame received yet",
        for at most `wait_for_frame_s`. Right after start-up the camera's first frame may still be
        on its way to the node when a client (which saw the camera start) asks; every other
        refusal is returned at once. The last try may end up to one request later than the deadline."""
        deadline = time.monotonic() + wait_for_frame_s
        while True:
            reply = send()
            if not error_of(reply).startswith(NO_FRAME_YET) or time.monotonic() >= deadline:
                return reply
            next_try = time.monotonic() + 0.1
            while (left := next_try - time.monotonic()) > 0:
                if self.spin:  # serve the node's other callbacks meanwhile (returns after one)
                    self.spin_once(left)
                else:
                    time.sleep(left)

    def ask(self, question: str, camera: str = "", image: np.ndarray | None = None, max_new_tokens: int = 0,
            max_frame_age_s: float = 0.0, timeout_s: float = 60.0, wait_for_frame_s: float = 0.0) -> Ask.Response:
        """Call the `ask` service. `wait_for_frame_s` > 0 asks again while the camera has not
        delivered its first frame to the node (start-up), at most that long."""
        request = Ask.Request(question=question, camera=camera, max_new_tokens=max_new_tokens,
                              max_frame_age_s=max_frame_age_s)
        if image is not None:
            request.image = rgb_to_image_msg(image, "rgb8")
        return self._asking_again_while_no_frame(
            lambda: self._reply("ask", lambda: self.service.call_async(request), timeout_s,
                                settles=lambda response: response.success),
            lambda response: "" if response.success else response.error, wait_for_frame_s)

    def ask_stream(self, question: str, camera: str = "", max_new_tokens: int = 0,
                   on_feedback: Callable[[str, int], None] | None = None,
                   cancel_after_tokens: int | None = None, timeout_s: float = 60.0, wait_for_frame_s: float = 0.0,
                   image: np.ndarray | None = None, max_frame_age_s: float = 0.0):
        """Send a goal; returns (result, status). Cancels once `cancel_after_tokens` arrived;
        `image`, `max_frame_age_s` and `wait_for_frame_s` as in `ask`."""
        goal = AskAction.Goal(question=question, camera=camera, max_new_tokens=max_new_tokens,
                              max_frame_age_s=max_frame_age_s)
        if image is not None:
            goal.image = rgb_to_image_msg(image, "rgb8")
        return self._asking_again_while_no_frame(
            lambda: self._one_goal(goal, on_feedback, cancel_after_tokens, timeout_s),
            lambda outcome: "" if outcome[0].success else outcome[0].error, wait_for_frame_s)

    def _one_goal(self, goal: AskAction.Goal, on_feedback: Callable[[str, int], None] | None,
                  cancel_after_tokens: int | None, timeout_s: float):
        goal_handle_holder = {}
        cancel_lock = threading.Lock()  # feedback (an executor thread) and this thread may both cancel

        def feedback_cb(msg) -> None:
            fb = msg.feedback
            if on_feedback is not None:
                on_feedback(fb.partial_answer, fb.num_tokens)
            if cancel_after_tokens is not None and fb.num_tokens >= cancel_after_tokens:
                cancel_once()

        def cancel_once() -> None:  # once the goal's handle is in: feedback can come before it
            with cancel_lock:
                goal_handle_holder["cancel wanted"] = True
                handle = goal_handle_holder.get("handle")
                if handle is not None and "cancel" not in goal_handle_holder:
                    goal_handle_holder["cancel"] = handle.cancel_goal_async()

        goal_id = UUID(uuid=list(uuid.uuid4().bytes))  # one id for every copy of this goal
        handle = self._reply("goal", lambda: self.action.send_goal_async(goal, feedback_callback=feedback_cb,
                                                                         goal_uuid=goal_id), timeout_s)
        # vqa_node accepts every goal, except a second copy of one it holds (same id): so a refusal
        # may answer a resent goal whose acceptance was lost. Its result says which: a goal the
        # node does not hold comes back with status UNKNOWN.
        with cancel_lock:
            goal_handle_holder["handle"] = handle
        if goal_handle_holder.get("cancel wanted"):
            cancel_once()
        wrapped = self._reply("result", handle.get_result_async, timeout_s)
        if not handle.accepted and wrapped.status == GoalStatus.STATUS_UNKNOWN:
            raise RuntimeError("goal rejected")
        return wrapped.result, wrapped.status


def load_image(path: str) -> np.ndarray:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image '{path}'")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ask_client", description="Ask vqa_node a question.")
    parser.add_argument("question")
    parser.add_argument("--camera", default="")
    parser.add_argument("--image", default=None, help="answer about this image file instead of a camera")
    parser.add_argument("--stream", action="store_true", help="use the ask_stream action")
    parser.add_argument("--max-new-tokens", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--wait-for-frame", type=float, default=10.0, metavar="S",
                        help="while the camera has not delivered its first frame (node just started), "
                             "ask again for at most S seconds (0: report it at once)")
    parser.add_argument("--resend-after", type=float, default=RESEND_FIRST_AFTER_S, metavar="S",
                        help="send the first request once more when its reply has not come after S seconds, "
                             "as happens when the node answers before discovery has finished (0: never)")
    args, ros_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    rclpy.init(args=["ask_client", *ros_args])
    node = rclpy.create_node("ask_client")
    try:
        client = AskClient(node, resend_first_after_s=args.resend_after)
        client.wait_until_ready(args.timeout)
        started = time.perf_counter()
        image = load_image(args.image) if args.image else None
        if args.stream:
            result, _ = client.ask_stream(
                args.question, args.camera, args.max_new_tokens, timeout_s=args.timeout,
                wait_for_frame_s=args.wait_for_frame, image=image,
                on_feedback=lambda text, n: print(f"\r[{n:3d}] {text}", end="", flush=True))
            print()
            ok, answer, error, header = result.success, result.answer, result.error, result.image_header
        else:
            r = client.ask(args.question, args.camera, image, args.max_new_tokens, timeout_s=args.timeout,
                           wait_for_frame_s=args.wait_for_frame)
            ok, answer, error, header = r.success, r.answer, r.error, r.image_header
        elapsed = 1000 * (time.perf_counter() - started)
        if not ok:
            print(f"error: {error}", file=sys.stderr)
            return 1
        stamp = header.stamp.sec + header.stamp.nanosec * 1e-9
        print(f"answer: {answer}\nframe: {header.frame_id} @ {stamp:.3f}  round trip {elapsed:.0f} ms")
        return 0
    except (TimeoutError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
