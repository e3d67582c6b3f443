"""Helpers for tests that run real ROS 2 nodes: processes from installed executables and a
client node spun on a background executor thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import rclpy
from ament_index_python.packages import get_package_prefix
from rclpy.executors import SingleThreadedExecutor

from vlsi_ros.ask_client import AskClient


def installed_executable(name: str) -> Path:
    path = Path(get_package_prefix("vlsi_ros")) / "lib" / "vlsi_ros" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not installed: run scripts/setup_env.sh")
    return path


class NodeProcess:
    """A node started from its installed executable, stopped with SIGINT (then SIGKILL)."""

    def __init__(self, executable: str, params: dict[str, object] | None = None, extra: list[str] | None = None,
                 log_path: Path | None = None) -> None:
        args = [sys.executable, str(installed_executable(executable)), "--ros-args"]
        for key, value in (params or {}).items():
            args += ["-p", f"{key}:={format_param(value)}"]
        args += extra or []
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                     start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode


def format_param(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in value) + "]"
    if value == "":
        return "''"  # rcl refuses an empty override value
    return str(value)


class ClientHarness:
    """A test-side node spun on a background thread, with an AskClient on it."""

    def __init__(self, name: str = "test_client", namespace: str = "") -> None:
        self.node = rclpy.create_node(name)
        self.client = AskClient(self.node, namespace=namespace, spin=False)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(5)
        self.node.destroy_node()


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met after {timeout_s:.1f} s")
