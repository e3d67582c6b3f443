"""`make demo`: the whole pipeline on the embedded default, no ROS install or GPU needed.

Starts the ROS-free bringup (synthetic image_source + vqa_node, one process) as a child
process, then, as a separate client over Fast DDS, asks questions about a handful of frames
through the real `ask` service and one through the `ask_stream` action, and prints each
question, the answer, the ground truth of the frame that was actually answered (matched
by its header stamp) and the latency. Exits 0 when every request was served.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from ament_index_python.packages import get_package_prefix
from std_msgs.msg import String

from vlsi_model.answers import exact_match
from vlsi_model.defaults import default_model_is_placeholder, default_model_path
from vlsi_ros.ask_client import AskClient

PR_SET_PDEATHSIG = 1  # linux/prctl.h

FAMILY_ORDER = ("count", "attribute", "locate", "exist", "spatial", "compare", "caption", "describe")


def stamp_key(stamp) -> tuple[int, int]:
    return (int(stamp.sec), int(stamp.nanosec))


class GroundTruthListener:
    """Keeps the ground truth of recent synthetic frames, keyed by their header stamp."""

    def __init__(self, node, keep: int = 200) -> None:
        self.by_stamp: dict[tuple[int, int], dict] = {}
        self.latest: dict | None = None
        self.keep = keep
        node.create_subscription(String, "ground_truth", self._on_truth, 50)

    def _on_truth(self, msg: String) -> None:
        truth = json.loads(msg.data)
        key = (int(truth["stamp"]["sec"]), int(truth["stamp"]["nanosec"]))
        self.by_stamp[key] = truth
        self.latest = truth
        while len(self.by_stamp) > self.keep:
            self.by_stamp.pop(next(iter(self.by_stamp)))


def pick_question(truth: dict, index: int) -> dict:
    """One QA pair of this frame, cycling through the question families."""
    by_family = {qa["family"]: qa for qa in truth["qas"]}
    for offset in range(len(FAMILY_ORDER)):
        family = FAMILY_ORDER[(index + offset) % len(FAMILY_ORDER)]
        if family in by_family:
            return by_family[family]
    return truth["qas"][0]


def reference_answer(truth: dict | None, question: str) -> str | None:
    if truth is None:
        return None
    return next((qa["answer"] for qa in truth["qas"] if qa["question"] == question), None)


def _end_with_parent() -> None:
    """Runs in the bringup child before exec: the kernel sends it SIGTERM when the demo dies.

    The child has its own session (so a terminal's Ctrl-C reaches the demo, which then stops
    bringup in order); without this, a demo killed from outside (SIGKILL, an OOM kill, a CI
    timeout) would leave bringup publishing and answering forever. Linux-only (prctl); where
    prctl is missing the demo still stops bringup on every exit it gets to run code for.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_bringup(scene_period_s: float, extra: list[str]) -> subprocess.Popen:
    exe = Path(get_package_prefix("vlsi_ros")) / "lib" / "vlsi_ros" / "bringup"
    cmd = [sys.executable, str(exe), "--ros-args", "-p", f"image_source:scene_period_s:={scene_period_s}",
           *extra]
    return subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True,
                            preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None)


def stop_bringup(bringup: subprocess.Popen) -> None:
    """SIGINT to bringup's process group (it shuts its nodes down in order), SIGKILL after 20 s."""
    if bringup.poll() is not None:
        return
    os.killpg(bringup.pid, signal.SIGINT)
    try:
        bringup.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(bringup.pid, signal.SIGKILL)
        bringup.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5, help="number of frames to ask about")
    parser.add_argument("--scene-period", type=float, default=1.5, help="seconds between scene changes")
    parser.add_argument("--timeout", type=float, default=120.0)
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    model = default_model_path()
    print(f"model: {model}")
    if default_model_is_placeholder():
        print("NOTE: the project's trained student is not shipped yet; this is a PLACEHOLDER tiny\n"
              "      Qwen2-VL with random weights, built locally. Its answers are meaningless; the\n"
              "      demo shows the pipeline (camera -> node -> service/action -> answer tied to frame).")
    bringup = start_bringup(args.scene_period, extra)
    rclpy.init()
    node = rclpy.create_node("vlsi_demo_client")
    failures = 0
    try:
        truths = GroundTruthListener(node)
        client = AskClient(node)
        client.wait_until_ready(args.timeout)
        print(f"{'question':<58} {'answer':<22} {'truth':<14} {'ok':<3} {'frame':>16} {'ms':>6}")
        correct = asked = 0
        last_scene = None
        deadline = time.monotonic() + args.timeout
        while asked < args.frames and time.monotonic() < deadline:
            client.spin_once(0.1)
            truth = truths.latest
            if truth is None or truth.get("seed") == last_scene:
                continue
            last_scene = truth.get("seed")
            qa = pick_question(truth, asked)
            started = time.perf_counter()
            # The ground truth of the first scene can reach this client before its image reaches
            # the node: ask again while the node has no frame yet.
            response = client.ask(qa["question"], timeout_s=args.timeout, wait_for_frame_s=10.0)
            ms = 1000 * (time.perf_counter() - started)
            asked += 1
            if not response.success:
                failures += 1
                print(f"{qa['question'][:57]:<58} ERROR: {response.error}")
                continue
            answered = truths.by_stamp.get(stamp_key(response.image_header.stamp))
            ref = reference_answer(answered, qa["question"])
            ok = ref is not None and exact_match(response.answer, ref)
            correct += ok
            stamp = response.image_header.stamp
            print(f"{qa['question'][:57]:<58} {response.answer[:21]:<22} {str(ref)[:13]:<14} "
                  f"{'yes' if ok else 'no':<3} {stamp.sec % 100000:>6}.{stamp.nanosec // 1000000:03d}"
                  f"{'':>5} {ms:6.0f}")
            print(f"{'':<58} engine: vision {response.vision_ms:.1f} ms, prefill {response.prefill_ms:.1f} ms, "
                  f"decode {response.decode_ms:.1f} ms ({response.num_tokens} tokens)")
        if asked < args.frames:
            print(f"only {asked} of {args.frames} frames asked before the timeout", file=sys.stderr)
            failures += 1
        question = "What objects are there?"
        print(f"\nstreaming (ask_stream action): {question}")
        result, _ = client.ask_stream(
            question, timeout_s=args.timeout,
            on_feedback=lambda text, n: print(f"\r  [{n:2d} tokens] {text[:100]}", end="", flush=True))
        print()
        if result.success:
            print(f"  final: {result.answer!r} about frame {result.image_header.frame_id} "
                  f"@ {result.image_header.stamp.sec}.{result.image_header.stamp.nanosec:09d} "
                  f"in {result.total_ms:.0f} ms")
        else:
            failures += 1
            print(f"  ERROR: {result.error}")
        print(f"\nexact match {correct}/{asked}; requests failed: {failures}")
    except (TimeoutError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        failures += 1
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_bringup(bringup)
    return 1 if failures else 0
