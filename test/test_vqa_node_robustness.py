"""vqa_node under what a robot's network and its operators send: in-process nodes.

Each test reproduces a way the node used to crash, lose a request or ignore a setting (issue
"vqa_node survives whatever a robot's network sends"); the end-to-end fuzzing, bursts and
lifecycle cycles across processes are in test_node_stress.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import ClientHarness, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import String

from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene
from vlsi_ros.image_conversion import rgb_to_image_msg
from vlsi_ros.srv import Ask
from vlsi_ros.vqa_node import VqaNode

pytestmark = pytest.mark.ros

QUESTION = "How many objects are there?"


def make_node(model_dir, namespace: str = "", **params) -> VqaNode:
    overrides = [Parameter("model_path", value=str(model_dir)), Parameter("image_qos", value="reliable")]
    overrides += [Parameter(name, value=value) for name, value in params.items()]
    return VqaNode(namespace=namespace, parameter_overrides=overrides)


def request_with_image(seed: int = 0, **fields) -> Ask.Request:
    rgb = render_scene(generate_scene(seed, SceneConfig(width=112, height=112)))
    return Ask.Request(question=QUESTION, image=rgb_to_image_msg(rgb, "rgb8"), **fields)


class Spinning:
    """A node spun by a MultiThreadedExecutor on a background thread, destroyed on exit."""

    def __init__(self, node: VqaNode) -> None:
        self.node = node
        self.executor = MultiThreadedExecutor(num_threads=6)
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)

    def __enter__(self) -> VqaNode:
        self.thread.start()
        return self.node

    def __exit__(self, *exc) -> None:
        self.executor.shutdown()
        self.thread.join(5)
        self.node.destroy_node()


@pytest.mark.parametrize("topic_first", [True, False])
def test_empty_topic_question_and_refused_ask_in_one_process_keep_the_node_alive(ros_context, tiny_qwen2vl_dir,
                                                                                   topic_first):
    """Both refusals log a warning; the deprecated `warn` shared one call site, so throttled and
    unthrottled calls clashed and rclpy raised 'Requested logging filters cannot be changed
    between calls', which killed the process."""
    node = make_node(tiny_qwen2vl_dir, autostart=False)
    try:
        calls = [lambda: node._on_question(String(data="")),
                 lambda: node._on_ask(Ask.Request(question="Is it on?"), Ask.Response())]
        for call in calls if topic_first else calls[::-1]:
            call()
        for call in calls:  # and again, now that both call sites have logged
            call()
        response = node._on_ask(Ask.Request(question=QUESTION), Ask.Response())
        assert not response.success and "not active" in response.error
    finally:
        node.destroy_node()


def test_parameters_apply_live_or_are_refused_with_a_reason(ros_context, tiny_qwen2vl_dir):
    node = make_node(tiny_qwen2vl_dir, max_new_tokens=24, max_new_tokens_limit=40)
    try:
        result = node.set_parameters([Parameter("max_new_tokens", value=3)])[0]
        assert result.successful, result.reason
        answered = node._on_ask(request_with_image(max_new_tokens=0), Ask.Response())
        assert answered.success and answered.num_tokens <= 3  # applied at once, no reconfigure
        for name, value, fragment in [
            ("backend", "onnxruntime", "takes effect at configure"),
            ("cameras", ["front", "back"], "takes effect at configure"),
            ("autostart", False, "read-only"),
            ("queue_size", 9, "read-only"),
            ("max_frame_age_s", -1.0, "finite number >= 0"),
            ("max_frame_age_s", float("nan"), "finite number >= 0"),
            ("max_new_tokens", 41, "above max_new_tokens_limit"),
        ]:
            result = node.set_parameters([Parameter(name, value=value)])[0]
            assert not result.successful, (name, value)
            assert fragment in result.reason, (name, result.reason)
        assert node.get_parameter("backend").value == "auto"
        assert node._values["max_frame_age_s"] == 1.0
        # Standing questions and their rate apply while active: the timer appears at once.
        assert "standing" not in node._named_timers
        assert all(r.successful for r in node.set_parameters([
            Parameter("standing_questions", value=["What is there?"]), Parameter("standing_rate_hz", value=2.0)]))
        assert "standing" in node._named_timers
        # Unconfigured, a configure-time parameter is accepted and used by the next configure.
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert "standing" not in node._named_timers
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        refused = node.set_parameters([Parameter("image_qos", value="bogus")])[0]
        assert not refused.successful and "image_qos must be one of" in refused.reason  # still validated
        assert node.set_parameters([Parameter("cameras", value=["front", "back"])])[0].successful
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node._frames.cameras == ["front", "back"]
    finally:
        node.destroy_node()


def test_configure_failure_is_the_reply_of_ask(ros_context, tmp_path):
    """With a model that cannot load, `ask` exists (a `ros2 service call` used to wait forever)
    and answers with the reason; diagnostics report it as an error."""
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2_vl"}')
    node = make_node(broken, namespace="/broken")
    with Spinning(node):
        harness = ClientHarness("broken_client", namespace="/broken")
        try:
            assert harness.client.service.wait_for_service(timeout_sec=30), "ask does not exist"
            response = harness.client.ask(QUESTION, timeout_s=30)
            assert not response.success
            assert "the last configure failed" in response.error and "could not load the model" in response.error
        finally:
            harness.close()


def test_image_qos_auto_follows_the_camera_publishers(ros_context, tiny_qwen2vl_dir):
    """auto subscribes best effort while no camera publishes (compatible with any publisher) and
    switches to reliable when the publishers are reliable, back when a best-effort one appears."""
    node = make_node(tiny_qwen2vl_dir, namespace="/qos_auto", image_qos="auto")
    with Spinning(node):
        assert node._camera_presets == {"default": "best_effort"}
        harness = ClientHarness("qos_client")
        try:
            reliable = harness.node.create_publisher(Image, "/qos_auto/image",
                                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            wait_for(lambda: node._camera_presets.get("default") == "reliable", 15, what="switch to reliable")
            best_effort = harness.node.create_publisher(
                Image, "/qos_auto/image", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
            wait_for(lambda: node._camera_presets.get("default") == "best_effort", 15, what="back to best effort")
            harness.node.destroy_publisher(best_effort)
            wait_for(lambda: node._camera_presets.get("default") == "reliable", 15, what="reliable again")
            # Frames flow through the remade subscription.
            rgb = render_scene(generate_scene(3, SceneConfig(width=112, height=112)))

            def answered():
                msg = rgb_to_image_msg(rgb, "rgb8")
                now = harness.node.get_clock().now().to_msg()
                msg.header.stamp, msg.header.frame_id = now, "auto_frame"
                reliable.publish(msg)
                time.sleep(0.05)
                r = node._on_ask(Ask.Request(question=QUESTION), Ask.Response())
                return r if r.success else None

            assert wait_for(answered, 15, what="answer").image_header.frame_id == "auto_frame"
        finally:
            harness.close()


def test_invalid_start_up_parameters_leave_the_node_up_and_saying_why(ros_context, tiny_qwen2vl_dir):
    node = make_node(tiny_qwen2vl_dir, diagnostics_period_s=0.0, max_frame_age_s=-2.0)
    try:
        response = node._on_ask(Ask.Request(question=QUESTION), Ask.Response())
        assert not response.success and "invalid parameters" in response.error
        assert "must be a finite number" in response.error
        fixed = node.set_parameters([Parameter("max_frame_age_s", value=1.0),
                                     Parameter("diagnostics_period_s", value=0.5)])
        assert all(r.successful for r in fixed), [r.reason for r in fixed]
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    finally:
        node.destroy_node()


def test_ctrl_c_while_the_model_loads_exits_cleanly(tmp_path):
    """SIGINT during start-up (autostart loads the model inside the constructor: minutes for a 2B
    model on a Jetson) stops the process with status 0 and no traceback, as it does while spinning.
    In a child process: main() initialises rclpy's default context itself."""
    import subprocess
    import sys

    code = ("import sys, vlsi_ros.vqa_node as vn\n"
            "def loading(*a, **k):\n    raise KeyboardInterrupt\n"
            "vn.VqaNode = loading\n"
            "status = vn.main([])\n"
            "import rclpy\n"
            "sys.exit(status if not rclpy.ok() else 3)\n")
    # cwd: not the repository, whose source vlsi_ros/ lacks the generated interfaces
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
