"""The floor under vqa_node's overhead: what rclpy + Fast DDS cost on this machine, no model.

    scripts/in_env.sh python benchmarks/ros_service_floor.py [--requests 100]

vqa_node's overhead goal (service round trip minus engine time < 2 ms p50, issue 2) sits on top
of what an empty rclpy service costs here. This measures that cost in one process, side by side,
for the two server designs rclpy offers:

* "blocking": the callback blocks a MultiThreadedExecutor thread until a worker thread finishes
  (vqa_node's design);
* "async": a coroutine callback on a SingleThreadedExecutor awaits an rclpy Future the worker
  completes (no pool thread; the executor is woken by the future's done callback),

each with a worker that answers at once, sleeps 30 ms, or computes 30 ms (holding the GIL in
Python, the worst case for the executor threads), optionally with a 640x480 rgb8 camera
publishing at 30 Hz into the server node. Overhead = round trip - the worker's time. The client
is a plain one (SingleThreadedExecutor.spin_until_future_complete).

Why it exists: it separates the host's floor from vqa_node's own cost. On the 2-core VM this
project is developed on, the floor was ~1.5-1.9 ms with an immediate answer but ~2.6-3.7 ms once
the worker takes 30 ms, *also when it sleeps*: the threads that waited are woken from idle, and
each wake-up costs there. Run it on the target (a Jetson) before judging the 2 ms goal.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future as ThreadFuture

os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(151, 200)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

import rclpy  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.task import Future  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from vlsi_ros.srv import Ask  # noqa: E402

WORK_S = 0.03


class Worker:
    """One thread that 'answers' jobs: at once, after sleeping, or after computing for WORK_S."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            done = self.jobs.get()
            if self.work == "sleep":
                time.sleep(WORK_S)
            elif self.work == "compute":
                end = time.perf_counter() + WORK_S
                while time.perf_counter() < end:
                    sum(range(1000))
            done()

    @property
    def seconds(self) -> float:
        return 0.0 if self.work == "none" else WORK_S


def spin_in_thread(executor) -> None:
    threading.Thread(target=executor.spin, daemon=True).start()


def measure(design: str, work: str, camera: bool, requests: int, index: int) -> tuple[float, float]:
    """(p50, p95) overhead in ms for one configuration; every entity lives in its own namespace."""
    ns = f"/floor{index}"
    worker = Worker(work)
    server = rclpy.create_node("server", namespace=ns)
    frames = [0]
    server.create_subscription(Image, "image", lambda _m: frames.__setitem__(0, frames[0] + 1),
                               qos_profile_sensor_data, callback_group=ReentrantCallbackGroup())
    executors = []
    if design == "blocking":
        def on_ask(_request, response):
            done = ThreadFuture()
            worker.jobs.put(lambda: done.set_result(True))
            done.result()
            response.success = True
            return response

        server.create_service(Ask, "ask", on_ask, callback_group=ReentrantCallbackGroup())
        executor = MultiThreadedExecutor(num_threads=8)
    else:
        executor = SingleThreadedExecutor()

        async def on_ask_async(_request, response):
            done = Future(executor=executor)
            done.add_done_callback(lambda _f: None)  # a done callback is what wakes the executor
            worker.jobs.put(lambda: done.set_result(True))
            await done
            response.success = True
            return response

        server.create_service(Ask, "ask", on_ask_async)
    executor.add_node(server)
    executors.append(executor)
    spin_in_thread(executor)
    if camera:
        cam = rclpy.create_node("camera", namespace=ns)
        publisher = cam.create_publisher(Image, "image", qos_profile_sensor_data)
        image = Image(width=640, height=480, encoding="rgb8", step=1920, data=bytes(640 * 480 * 3))
        cam.create_timer(1 / 30, lambda: publisher.publish(image))
        cam_executor = SingleThreadedExecutor()
        cam_executor.add_node(cam)
        executors.append(cam_executor)
        spin_in_thread(cam_executor)
    client_node = rclpy.create_node("client", namespace=ns)
    client = client_node.create_client(Ask, "ask")
    if not client.wait_for_service(timeout_sec=10):
        raise RuntimeError("the service did not come up")
    client_executor = SingleThreadedExecutor()
    client_executor.add_node(client_node)
    overheads = []
    for i in range(requests + 10):
        sent = time.perf_counter()
        future = client.call_async(Ask.Request(question="q"))
        client_executor.spin_until_future_complete(future, timeout_sec=10)
        if not future.done():
            raise RuntimeError("no reply within 10 s")
        if i >= 10:  # warm-up
            overheads.append(1000 * (time.perf_counter() - sent - worker.seconds))
    for ex in executors:
        ex.shutdown(timeout_sec=1)
    client_executor.shutdown(timeout_sec=1)
    if camera and frames[0] == 0:
        raise RuntimeError("the camera frames never arrived")
    return statistics.median(overheads), sorted(overheads)[int(0.95 * len(overheads))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    rclpy.init()
    print("| server | worker | camera 30 Hz | overhead p50 | overhead p95 |\n|---|---|---|---|---|")
    index = 0
    for work in ("none", "sleep", "compute"):
        for camera in (False, True):
            for design in ("blocking", "async"):
                index += 1
                p50, p95 = measure(design, work, camera, args.requests, index)
                label = {"none": "answers at once", "sleep": "sleeps 30 ms", "compute": "computes 30 ms"}[work]
                print(f"| {design} | {label} | {'yes' if camera else 'no'} | {p50:.2f} ms | {p95:.2f} ms |",
                      flush=True)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
