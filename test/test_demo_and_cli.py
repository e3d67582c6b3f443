"""The README's main job (`make demo`: bringup + client) and the `ask_client` command, run as a
user runs them: installed executables as processes, real rclpy and Fast DDS, shipped student."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ros_harness import NodeProcess, installed_executable

from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import SceneConfig, generate_scene


def run_executable(name: str, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(installed_executable(name)), *args], capture_output=True, text=True,
                          timeout=timeout_s)


def test_demo_answers_through_the_service_and_the_action_then_exits_0(ros_context):
    done = run_executable("demo", "--frames", "2", "--scene-period", "1.0", "--timeout", "120")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "default_student" in out.splitlines()[0]  # the shipped student, not a placeholder
    assert "PLACEHOLDER" not in out
    assert re.search(r"exact match \d/2; requests failed: 0", out)
    assert "streaming (ask_stream action): What objects are there?" in out
    assert re.search(r"final: '.+' about frame", out)  # the action's answer names the frame it describes


@pytest.fixture(scope="module")
def camera_and_node(ros_context, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cli_logs")
    source = NodeProcess("image_source", {"rate_hz": 10.0, "width": 320, "height": 240},
                         log_path=logs / "image_source.log")
    vqa = NodeProcess("vqa_node", {"max_new_tokens": 8}, log_path=logs / "vqa_node.log")
    yield
    vqa.stop()
    source.stop()


def test_ask_client_answers_about_the_camera_and_about_a_file(camera_and_node, tmp_path):
    # The node may not have the camera's first frame yet: the client asks again until it has.
    asked = run_executable("ask_client", "How many objects are there?", "--timeout", "90", "--wait-for-frame", "60")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert re.search(r"^answer: \S+", asked.stdout, re.M)
    assert re.search(r"^frame: camera @ \d+\.\d+ +round trip \d+ ms", asked.stdout, re.M)

    streamed = run_executable("ask_client", "What objects are there?", "--stream", "--timeout", "60")
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    assert re.search(r"\[ *\d+\] ", streamed.stdout)  # token feedback arrived before the result
    assert "answer: " in streamed.stdout

    import cv2

    image = render_scene(generate_scene(3, SceneConfig(layout="grid", width=112, height=112)))
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
    from_file = run_executable("ask_client", "How many objects are there?", "--image", str(path), "--timeout", "60")
    assert from_file.returncode == 0, from_file.stdout + from_file.stderr
    assert "answer: " in from_file.stdout


def test_ask_client_reports_bad_input_with_exit_1(camera_and_node, tmp_path):
    missing = run_executable("ask_client", "What is this?", "--image", str(tmp_path / "none.png"), "--timeout", "30")
    assert missing.returncode == 1 and "cannot read image" in missing.stderr
    empty = run_executable("ask_client", "", "--timeout", "30")
    assert empty.returncode == 1 and "error:" in empty.stderr


def test_readme_documents_every_vlsi_command():
    """Each `vlsi` subcommand has a usage line in the README (an edit once dropped the export /
    build-engine / bench section unnoticed)."""
    from pathlib import Path

    from vlsi_model.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if not re.search(rf"^vlsi {re.escape(name)}\b", readme, re.MULTILINE)]
    assert not missing, f"README has no usage line for: {missing}"


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _running(pid: int) -> bool:
    """False once the process is gone or a zombie (reparented, maybe to a PID 1 that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_bringup_ends_when_the_demo_is_killed_from_outside(ros_context):
    demo = subprocess.Popen([sys.executable, str(installed_executable("demo")), "--frames", "1000", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        bringup = []
        while not bringup and time.monotonic() < deadline and demo.poll() is None:
            bringup = _children(demo.pid)
            time.sleep(0.2)
        assert bringup, "the demo did not start bringup"
        # Let bringup get past its imports and into its executor (it answers the demo's questions).
        for line in demo.stdout:
            if line.startswith("question"):
                break
        demo.send_signal(signal.SIGKILL)  # no finally, no handler: only the kernel can tell bringup
        demo.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _running(bringup[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(bringup[0]), "bringup kept running after the demo was killed"
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in bringup:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
