"""Stress harness for vqa_node: fuzzed inputs, bursts, lifecycle transitions under load.

    scripts/in_env.sh python benchmarks/node_stress.py [--messages 10000] [--burst 200]
        [--lifecycle-cycles 10] [--model DIR] [--json OUT]

Starts two vqa_node processes from the installed executable (raw transport and compressed
transport, each in its own namespace; real Fast DDS) and throws at them, from this process:

- fuzzed camera messages: Image with random encodings (valid and not), sizes, steps, byte
  orders and data lengths; CompressedImage with garbage, truncated JPEG/PNG, random formats
  and decompression bombs (PNG headers of 16384^2 and 20000^2 pixels), valid frames between;
- fuzzed requests on the `ask` service and the `ask_stream` action: empty, huge, control-token
  and random-unicode questions, unknown cameras, malformed request images, max_new_tokens
  up to 2^32-1, max_frame_age_s NaN / +-inf / negative, frames stamped in the past and future;
- fuzzed strings on `questions` and fuzzed `ros2 param set` calls (every parameter, random
  types and values);
- a burst of `--burst` requests sent at once from one client;
- lifecycle cycles (deactivate, cleanup, configure, activate) with requests in flight.

It counts messages tried, node crashes (a process that exits), lost requests (no reply within
request_timeout_s + 15 s), wrong answers to the stale / future-stamp / bomb checks, and each
process's RSS (start, peak, end, and growth per 1,000 fuzzed messages after warm-up).
Bounded in count and time: every phase sends a fixed number of messages. The tests run it at
a small size (test/test_node_stress.py); the README's figures come from the default size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(151, 200)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from lifecycle_msgs.msg import (
    State,  # noqa: E402
    Transition,  # noqa: E402
)
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_harness import NodeProcess  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402

from vlsi_model.data.render import render_scene  # noqa: E402
from vlsi_model.data.scenes import SceneConfig, generate_scene  # noqa: E402
from vlsi_model.image_codec import SUPPORTED_ENCODINGS  # noqa: E402
from vlsi_ros.action import Ask as AskAction  # noqa: E402
from vlsi_ros.image_conversion import rgb_to_compressed_msg, rgb_to_image_msg  # noqa: E402
from vlsi_ros.srv import Ask  # noqa: E402
from vlsi_ros.vqa_parameters import LIVE, PARAMETERS  # noqa: E402

RAW_NS, COMPRESSED_NS = "/stress_raw", "/stress_compressed"
REQUEST_TIMEOUT_S = 20.0
DEEP = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2000, reliability=ReliabilityPolicy.RELIABLE)
CONTROL_TOKENS = ("<|im_end|>", "<|im_start|>system\n", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>")


@dataclass
class StressConfig:
    messages: int = 10000  # fuzzed camera messages (raw + compressed) and requests, in total
    burst: int = 200
    lifecycle_cycles: int = 10
    model: str = ""  # empty: the package's default model
    seed: int = 0
    queue_size: int = 4
    max_new_tokens: int = 8


@dataclass
class StressReport:
    messages_tried: dict[str, int] = field(default_factory=dict)
    requests_sent: int = 0
    replies: int = 0
    answered: int = 0
    refused: int = 0
    lost_requests: int = 0
    crashes: int = 0
    burst_sent: int = 0
    burst_replied: int = 0
    burst_answered: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    check_replies: dict[str, str] = field(default_factory=dict)  # what the node said, for a failed check
    rss_mb: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_growth_mb_per_1000: dict[str, float] = field(default_factory=dict)
    rss_samples: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    rss_after_phase_mb: dict[str, dict[str, float]] = field(default_factory=dict)
    memory_after_phase: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    errors_seen: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    load_average: float = 0.0

    @property
    def total_messages(self) -> int:
        return sum(self.messages_tried.values())


def process_memory(pid: int) -> dict[str, float]:
    """RSS of a process in MB from /proc: total, peak, and its parts (anonymous: the process's
    own heap; shmem: shared memory it touched, e.g. Fast DDS's shared-memory transport
    segments; file: mapped libraries). Empty once the process is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return {}
    return {key: int(fields[name].split()[0]) / 1024 for key, name in
            (("rss", "VmRSS"), ("peak", "VmHWM"), ("anon", "RssAnon"), ("shmem", "RssShmem"), ("file", "RssFile"))
            if name in fields}  # a zombie's status has no memory lines


def process_memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB (0, 0 once it is gone)."""
    memory = process_memory(pid)
    return memory.get("rss", 0.0), memory.get("peak", 0.0)


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a small zlib stream of zeros:
    the decompression bomb shape (a few hundred KB that decode to gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (1 + 3 * width) * min(height, 64), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


class Fuzzer:
    """Random malformed (and some valid) inputs, reproducible from a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.frames = [render_scene(generate_scene(s, SceneConfig(width=160, height=120))) for s in range(4)]
        self.valid_png = bytes(rgb_to_compressed_msg(self.frames[0], "png").data)
        self.valid_jpeg = bytes(rgb_to_compressed_msg(self.frames[1], "jpeg").data)

    def header(self, node, ahead_s: float = 0.0) -> Header:
        ns = node.get_clock().now().nanoseconds + int(ahead_s * 1e9)
        h = Header(frame_id=f"fuzz{self.rng.randint(0, 9)}")
        h.stamp.sec, h.stamp.nanosec = ns // 10**9, ns % 10**9
        return h

    def image(self, node) -> Image:
        r = self.rng
        if r.random() < 0.2:
            return rgb_to_image_msg(r.choice(self.frames), r.choice(SUPPORTED_ENCODINGS), self.header(node))
        msg = Image(header=self.header(node))
        msg.encoding = r.choice([*SUPPORTED_ENCODINGS, "", "rgb9", "bayer_xyz8", "32FC1", "\x00", "RGB8" * 50])
        msg.width = r.choice([0, 1, 3, 64, 160, 4097, 2**16, 2**31 - 1, 2**32 - 1])
        msg.height = r.choice([0, 1, 2, 120, 4097, 2**31 - 1, 2**32 - 1])
        msg.step = r.choice([0, 1, msg.width, msg.width * 3, msg.width * 3 + 7, 2**32 - 1])
        msg.is_bigendian = r.randint(0, 1)
        msg.data = bytes(r.getrandbits(8) for _ in range(r.choice([0, 1, 17, 3 * 160, 57600, 3000])))
        return msg

    def compressed(self, node) -> CompressedImage:
        r = self.rng
        msg = CompressedImage(header=self.header(node))
        kind = r.randrange(7)
        if kind == 0:
            data = bytes(r.getrandbits(8) for _ in range(r.randint(0, 2000)))
        elif kind == 1:
            data = self.valid_png[: r.randint(0, len(self.valid_png))]
        elif kind == 2:
            data = self.valid_jpeg[: r.randint(0, len(self.valid_jpeg))]
        elif kind == 3:
            data = png_header_bomb(r.choice([16384, 20000, 65535]), r.choice([16384, 20000]))
        elif kind == 4:
            data = bytearray(self.valid_jpeg)
            for _ in range(20):
                data[r.randrange(len(data))] = r.getrandbits(8)
            data = bytes(data)
        else:
            data = r.choice([self.valid_png, self.valid_jpeg])
        msg.format = r.choice(["jpeg", "png", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth png", "", "?"])
        msg.data = data
        return msg

    def question(self) -> str:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            return ""
        if kind == 1:
            return " \t\n " * r.randint(1, 5)
        if kind == 2:
            return "What is there? " * r.randint(40, 2000)
        if kind == 3:
            return "How many objects?" + "".join(r.choice(CONTROL_TOKENS) for _ in range(r.randint(1, 6)))
        if kind == 4:
            return "".join(chr(r.randint(1, 0x2FFF)) for _ in range(r.randint(1, 80)))
        if kind == 5:
            return "What\x00 is\x7f there?\ud7ff"
        return r.choice(["How many objects are there?", "What objects are there?", "Is there a red circle?"])

    def request(self, node) -> Ask.Request:
        r = self.rng
        req = Ask.Request(question=self.question())
        req.camera = r.choice(["", "", "default", "nope", "x" * 300])
        if r.random() < 0.3:
            req.image = self.image(node)
        req.max_new_tokens = r.choice([0, 0, 1, 3, 2**32 - 1])
        req.max_frame_age_s = r.choice([0.0, 0.0, 5.0, 1e-9, -1.0, float("nan"), float("inf"), float("-inf"), 3e38])
        return req

    def parameter(self) -> ParameterMsg:
        r = self.rng
        name = r.choice([*PARAMETERS, "no_such_parameter"])
        value = ParameterValue()
        kind = r.randrange(5)
        if kind == 0:
            value.type, value.integer_value = ParameterType.PARAMETER_INTEGER, r.choice([-1, 0, 1, 8, 2**62])
        elif kind == 1:
            value.type, value.double_value = ParameterType.PARAMETER_DOUBLE, r.choice(
                [-1.0, 0.0, 0.5, float("nan"), float("inf")])
        elif kind == 2:
            value.type, value.string_value = ParameterType.PARAMETER_STRING, r.choice(
                ["", "onnxruntime", "compressed", "auto", "/nonexistent"])
        elif kind == 3:
            value.type, value.bool_value = ParameterType.PARAMETER_BOOL, r.random() < 0.5
        else:
            value.type, value.string_array_value = ParameterType.PARAMETER_STRING_ARRAY, ["a", "", "b"]
        return ParameterMsg(name=name, value=value)


def parameter_value(value: object) -> ParameterValue:
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(value))


class StressClient:
    """One client node, spun on a background executor, talking to one vqa_node namespace."""

    def __init__(self, node, namespace: str, transport: str) -> None:
        self.node = node
        self.ns = namespace
        self.ask = node.create_client(Ask, f"{namespace}/ask", qos_profile=DEEP)
        self.action = ActionClient(node, AskAction, f"{namespace}/ask_stream")
        self.lifecycle = node.create_client(ChangeState, f"{namespace}/vqa_node/change_state")
        self.get_state = node.create_client(GetState, f"{namespace}/vqa_node/get_state")
        self.params = node.create_client(SetParameters, f"{namespace}/vqa_node/set_parameters")
        msg_type, topic = (CompressedImage, "image/compressed") if transport == "compressed" else (Image, "image")
        self.camera = node.create_publisher(msg_type, f"{namespace}/{topic}", DEEP)
        self.questions = node.create_publisher(String, f"{namespace}/questions", 100)
        self.transport = transport

    def wait_ready(self, timeout_s: float) -> None:
        for client in (self.ask, self.lifecycle, self.params):
            if not client.wait_for_service(timeout_sec=timeout_s):
                raise TimeoutError(f"{client.srv_name} not available after {timeout_s:.0f} s")
        if not self.action.wait_for_server(timeout_sec=timeout_s):
            raise TimeoutError(f"{self.ns}/ask_stream not available after {timeout_s:.0f} s")
        # The services answer from construction on; the model is loaded once the node is active.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            future = self.get_state.call_async(GetState.Request())
            if not wait_all([future], 10) and future.result().current_state.id == State.PRIMARY_STATE_ACTIVE:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.ns}/vqa_node not active after {timeout_s:.0f} s")

    def set_parameters(self, values: dict[str, object]) -> list[str]:
        """Set parameters like `ros2 param set`; returns the reasons of any refusals."""
        params = [ParameterMsg(name=name, value=parameter_value(value)) for name, value in values.items()]
        future = self.params.call_async(SetParameters.Request(parameters=params))
        if wait_all([future], 30):
            raise TimeoutError(f"{self.ns}: set_parameters got no reply")
        return [r.reason for r in future.result().results if not r.successful]

    def valid_frame(self, fuzzer: Fuzzer, ahead_s: float = 0.0):
        rgb = fuzzer.frames[fuzzer.rng.randrange(len(fuzzer.frames))]
        h = fuzzer.header(self.node, ahead_s)
        return rgb_to_compressed_msg(rgb, "jpeg", header=h) if self.transport == "compressed" else \
            rgb_to_image_msg(rgb, "rgb8", h)


def wait_all(futures: list[Future], timeout_s: float) -> list[Future]:
    """Wait until every future is done or the time is up; returns the ones still pending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = [f for f in futures if not f.done()]
        if not pending:
            return []
        time.sleep(0.02)
    return [f for f in futures if not f.done()]


class StressRun:
    def __init__(self, config: StressConfig, log_dir: Path | None = None) -> None:
        self.config = config
        self.report = StressReport()
        self.fuzzer = Fuzzer(config.seed)
        self.log_dir = log_dir
        self.procs: dict[str, NodeProcess] = {}
        self.clients: dict[str, StressClient] = {}
        self.rss: dict[str, list[tuple[int, float]]] = {}  # transport -> (messages so far, RSS MB)
        self._sent_per_transport: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, kind: str, n: int = 1) -> None:
        self.report.messages_tried[kind] = self.report.messages_tried.get(kind, 0) + n

    def _record_reply(self, future: Future) -> None:
        response = future.result()
        self.report.replies += 1
        if response.success:
            self.report.answered += 1
        else:
            self.report.refused += 1
            reason = response.error.split(":")[0][:60]
            self.report.errors_seen[reason] = self.report.errors_seen.get(reason, 0) + 1

    def _sample_rss(self, transport: str) -> None:
        rss, _ = process_memory_mb(self.procs[transport].proc.pid)
        self.rss.setdefault(transport, []).append((self._sent_per_transport.get(transport, 0), rss))

    def _phase_done(self, phase: str) -> None:
        for transport, proc in self.procs.items():
            memory = process_memory(proc.proc.pid)
            self.report.rss_after_phase_mb.setdefault(transport, {})[phase] = memory.get("rss", 0.0)
            self.report.memory_after_phase.setdefault(transport, {})[phase] = memory

    def _requests(self, client: StressClient, requests: list[Ask.Request], window: int) -> None:
        """Send requests keeping at most `window` outstanding; count replies and losses."""
        futures: list[Future] = []
        for request in requests:
            while sum(1 for f in futures if not f.done()) >= window:
                time.sleep(0.002)
            futures.append(client.ask.call_async(request))
            self.report.requests_sent += 1
        lost = wait_all(futures, REQUEST_TIMEOUT_S + 15)
        self.report.lost_requests += len(lost)
        for f in futures:
            if f.done():
                self._record_reply(f)

    # ------------------------------------------------------------------ phases
    def fuzz_camera_and_requests(self, transport: str, count: int) -> None:
        """Fuzzed frames on the camera topic, with a fuzzed request, question or parameter
        between them, and a valid fresh frame every few messages so some requests are answered."""
        client, fz = self.clients[transport], self.fuzzer
        requests: list[Ask.Request] = []
        param_futures: list[Future] = []
        for i in range(count):
            if i % 5 == 0:
                client.camera.publish(client.valid_frame(fz))
            msg = fz.compressed(client.node) if transport == "compressed" else fz.image(client.node)
            client.camera.publish(msg)
            self._count(f"{transport} camera messages")
            self._sent_per_transport[transport] = self._sent_per_transport.get(transport, 0) + 1
            roll = fz.rng.random()
            if roll < 0.15:
                requests.append(fz.request(client.node))
            elif roll < 0.20:
                client.questions.publish(String(data=fz.question()))
                self._count("questions topic messages")
            elif roll < 0.22:
                param_futures.append(client.params.call_async(SetParameters.Request(parameters=[fz.parameter()])))
                self._count("parameter sets")
            if len(requests) >= 20:
                self._count("ask requests", len(requests))
                self._requests(client, requests, window=8)
                requests = []
            if i % 500 == 0:
                self._sample_rss(transport)
            time.sleep(0.0005)
        self._count("ask requests", len(requests))
        self._requests(client, requests, window=8)
        self.report.lost_requests += len(wait_all(param_futures, 30))
        refused = client.set_parameters(self.live_parameters)  # undo what the parameter fuzzing changed
        if refused:
            raise RuntimeError(f"{transport}: restoring the live parameters was refused: {refused}")
        self._sample_rss(transport)

    def fuzz_action(self, transport: str, count: int) -> None:
        client, fz = self.clients[transport], self.fuzzer
        results = []
        for i in range(count):
            client.camera.publish(client.valid_frame(fz))
            req = fz.request(client.node)
            goal = AskAction.Goal(question=req.question, camera=req.camera, max_new_tokens=req.max_new_tokens,
                                  image=req.image, max_frame_age_s=req.max_frame_age_s)
            send = client.action.send_goal_async(goal)
            if not wait_all([send], REQUEST_TIMEOUT_S) and send.result().accepted:
                handle = send.result()
                if i % 4 == 0:
                    handle.cancel_goal_async()
                results.append(handle.get_result_async())
            else:
                self.report.lost_requests += 1
            self._count("action goals")
        self.report.lost_requests += len(wait_all(results, REQUEST_TIMEOUT_S + 15))

    def burst(self, transport: str) -> None:
        client, fz = self.clients[transport], self.fuzzer
        client.camera.publish(client.valid_frame(fz))
        time.sleep(0.2)
        futures = [client.ask.call_async(Ask.Request(question="How many objects are there?", max_frame_age_s=30.0))
                   for _ in range(self.config.burst)]
        self.report.burst_sent += len(futures)
        self._count("burst requests", len(futures))
        lost = wait_all(futures, REQUEST_TIMEOUT_S + 15)
        self.report.lost_requests += len(lost)
        done = [f for f in futures if f.done()]
        self.report.burst_replied += len(done)
        self.report.burst_answered += sum(1 for f in done if f.result().success)

    def stamp_checks(self, transport: str) -> None:
        """A frame stamped 100 s in the future must go stale like any other; NaN ages are refused."""
        client, fz = self.clients[transport], self.fuzzer
        client.camera.publish(client.valid_frame(fz, ahead_s=100.0))
        time.sleep(2.5)
        # It ages from its arrival, and under load the node may take seconds to take the frame in (a
        # fixed wait failed a CI run): ask until the refusal comes. A node that kept the frame fresh
        # forever never refuses, so the check still fails for the fault it is there for.
        self._check(client, f"{transport}: future-stamped frame refused as stale", "stamp checks", 1.0, "old",
                    retry_for_s=REQUEST_TIMEOUT_S)
        for bad in (float("nan"), -1.0, float("inf")):
            client.camera.publish(client.valid_frame(fz))
            self._check(client, f"{transport}: max_frame_age_s {bad} refused", "stamp checks", bad,
                        "max_frame_age_s")

    def _check(self, client: StressClient, name: str, kind: str, max_age_s: float, refusal: str,
               retry_for_s: float = 0.0) -> None:
        """Ask; the check holds when the node refuses with `refusal` in its error (no reply: lost).

        With `retry_for_s`, ask again every half second until the check holds or the time is up,
        for conditions the node reaches by itself a little later (a frame going stale)."""
        deadline = time.monotonic() + retry_for_s
        tries = 0
        while True:
            future = client.ask.call_async(Ask.Request(question="How many objects are there?",
                                                       max_frame_age_s=max_age_s))
            self._count(kind)
            tries += 1
            if wait_all([future], REQUEST_TIMEOUT_S):
                self.report.lost_requests += 1
                return
            response = future.result()
            held = not response.success and refusal in response.error
            self.report.checks[name] = held
            reply = response.error or f"answered: {response.answer}"
            self.report.check_replies[name] = reply if tries == 1 else f"{reply} (try {tries})"
            if held or time.monotonic() >= deadline:
                return
            time.sleep(0.5)

    def bomb_checks(self) -> None:
        client = self.clients["compressed"]
        pid = self.procs["compressed"].proc.pid
        before, _ = process_memory_mb(pid)
        for side in (16384, 20000):
            msg = CompressedImage(header=self.fuzzer.header(client.node), format="png",
                                  data=png_header_bomb(side, side))
            client.camera.publish(msg)
            time.sleep(0.3)
            self._check(client, f"{side}x{side} PNG refused before decoding", "decompression bombs", 30.0,
                        "larger than the limit")
        after, _ = process_memory_mb(pid)
        self.report.checks["bombs left RSS within 100 MB"] = after - before < 100

    def lifecycle_cycles(self, transport: str) -> None:
        client, fz = self.clients[transport], self.fuzzer
        for _ in range(self.config.lifecycle_cycles):
            client.camera.publish(client.valid_frame(fz))
            in_flight = [client.ask.call_async(Ask.Request(question="What objects are there?", max_new_tokens=64,
                                                           max_frame_age_s=30.0))
                         for _ in range(self.config.queue_size + 3)]
            self.report.requests_sent += len(in_flight)
            self._count("requests during lifecycle transitions", len(in_flight))
            for transition in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                               Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                change = client.lifecycle.call_async(ChangeState.Request(transition=Transition(id=transition)))
                if wait_all([change], 120):
                    raise RuntimeError(f"{transport}: lifecycle transition {transition} got no reply")
                if transition == Transition.TRANSITION_DEACTIVATE:  # more requests while inactive
                    extra = client.ask.call_async(Ask.Request(question="Is there a red circle?"))
                    in_flight.append(extra)
                    self.report.requests_sent += 1
                    self._count("requests during lifecycle transitions")
            self.report.lost_requests += len(wait_all(in_flight, REQUEST_TIMEOUT_S + 15))
            for f in in_flight:
                if f.done():
                    self._record_reply(f)

    # ------------------------------------------------------------------ driver
    @property
    def live_parameters(self) -> dict[str, object]:
        """The harness's values of every live parameter (the fuzzing changes them)."""
        values = {name: spec.default for name, spec in PARAMETERS.items()
                  if spec.applies == LIVE and not isinstance(spec.default, list)}
        return {**values, "max_new_tokens": self.config.max_new_tokens, "max_frame_age_s": 5.0,
                "request_timeout_s": REQUEST_TIMEOUT_S}

    def start(self) -> None:
        c = self.config
        common = {**self.live_parameters, "queue_size": c.queue_size, "image_qos": "reliable"}
        if c.model:
            common["model_path"] = c.model
        for transport, ns in (("raw", RAW_NS), ("compressed", COMPRESSED_NS)):
            log = self.log_dir / f"vqa_{transport}.log" if self.log_dir else None
            self.procs[transport] = NodeProcess("vqa_node", {**common, "transport": transport},
                                                extra=["-r", f"__ns:={ns}"], log_path=log)

    def run(self) -> StressReport:
        started = time.monotonic()
        context = rclpy.Context()  # its own, so it runs beside other rclpy users (the tests)
        rclpy.init(context=context)
        node = rclpy.create_node("stress_client", context=context)
        executor = MultiThreadedExecutor(num_threads=4, context=context)
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        self.start()
        spinner.start()
        try:
            for transport, ns in (("raw", RAW_NS), ("compressed", COMPRESSED_NS)):
                self.clients[transport] = StressClient(node, ns, transport)
            for client in self.clients.values():
                client.wait_ready(120)
            for transport in self.procs:
                self._sample_rss(transport)
            self._phase_done("ready")
            per_transport = max(1, self.config.messages // 2)
            for transport in ("raw", "compressed"):
                self.fuzz_camera_and_requests(transport, per_transport)
                self._phase_done(f"fuzz {transport}")
                self.fuzz_action(transport, max(4, per_transport // 100))
                self.burst(transport)
                self.stamp_checks(transport)
                self._phase_done(f"action, burst, stamps {transport}")
            self.bomb_checks()
            self._phase_done("bombs")
            for transport in ("raw", "compressed"):
                self.lifecycle_cycles(transport)
            self._phase_done("lifecycle")
        finally:
            for transport, proc in self.procs.items():
                rss, peak = process_memory_mb(proc.proc.pid)
                samples = self.rss.get(transport, [])
                self.report.rss_mb[transport] = {"start": samples[0][1] if samples else 0.0, "peak": peak,
                                                 "end": rss}
                self.report.rss_growth_mb_per_1000[transport] = rss_growth_per_1000(samples)
                self.report.rss_samples[transport] = samples
                alive = proc.alive()
                code = proc.stop()  # SIGINT: a healthy node exits 0
                if not alive or code != 0:
                    self.report.crashes += 1
                    print(f"vqa_node ({transport}) exited with {code} (alive until the end: {alive})",
                          file=sys.stderr)
            executor.shutdown()
            spinner.join(5)
            node.destroy_node()
            rclpy.try_shutdown(context=context)
        self.report.seconds = time.monotonic() - started
        self.report.load_average = os.getloadavg()[0]
        return self.report


def rss_growth_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares RSS slope in MB per 1,000 messages over the second half of the fuzzing
    (the first half is warm-up: allocator pools and caches fill)."""
    half = [s for s in samples if s[0] >= (samples[-1][0] / 2 if samples else 0)]
    if len(half) < 3 or half[-1][0] == half[0][0]:
        return 0.0
    xs, ys = np.array([s[0] for s in half], float), np.array([s[1] for s in half], float)
    return float(np.polyfit(xs, ys, 1)[0] * 1000)


def format_report(report: StressReport) -> str:
    lines = ["| what | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(report.messages_tried.items())]
    lines += [
        f"| **messages tried** | **{report.total_messages:,}** |",
        f"| requests sent / replied / answered / refused | {report.requests_sent:,} / {report.replies:,} / "
        f"{report.answered:,} / {report.refused:,} |",
        f"| burst: sent / replied / answered | {report.burst_sent} / {report.burst_replied} / "
        f"{report.burst_answered} |",
        f"| **crashes** | **{report.crashes}** |",
        f"| **lost requests** | **{report.lost_requests}** |",
    ]
    for transport, rss in report.rss_mb.items():
        lines.append(f"| RSS {transport} node: start / peak / end | {rss['start']:.0f} / {rss['peak']:.0f} / "
                     f"{rss['end']:.0f} MB (growth {report.rss_growth_mb_per_1000.get(transport, 0.0):+.2f} MB "
                     "per 1,000 fuzzed messages, second half of the fuzzing) |")
    for transport, phases in report.rss_after_phase_mb.items():
        lines.append(f"| RSS {transport} node after each phase | "
                     + ", ".join(f"{p} {mb:.0f}" for p, mb in phases.items()) + " MB |")
    lines += [f"| check: {name} | {'ok' if ok else 'FAILED'} |" for name, ok in report.checks.items()]
    lines.append(f"| time, load average | {report.seconds:.0f} s, {report.load_average:.2f} on "
                 f"{os.cpu_count()} cores |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--lifecycle-cycles", type=int, default=10)
    parser.add_argument("--model", default="", help="default: the package's default model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=None, help="write the nodes' logs here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    config = StressConfig(messages=args.messages, burst=args.burst, lifecycle_cycles=args.lifecycle_cycles,
                          model=args.model, seed=args.seed)
    report = StressRun(config, args.log_dir).run()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(config), **asdict(report)}, indent=2, default=str))
    ok = report.crashes == 0 and report.lost_requests == 0 and all(report.checks.values())
    print("result: " + ("0 crashes, 0 lost requests, every check passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
