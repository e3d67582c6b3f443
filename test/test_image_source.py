"""End-to-end tests of the installed `image_source` executable over real Fast DDS.

The node runs as its own process (exactly what users and the launch file start); this test
process subscribes with rclpy. Run under `scripts/in_env.sh pytest ...` so the process gets
the venv, the colcon install and localhost-only discovery.

Isolation: the module picks a random ROS_DOMAIN_ID (1..100) before its rclpy context is
created and passes it to every process it starts, and each test uses its own frame_id and
ignores messages with any other, so parallel runs on the machine cannot cross-talk.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_harness import NodeProcess  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from vlsi_model.scenes import COLOR_RGB  # noqa: E402
from vlsi_ros import image_source  # noqa: E402
from vlsi_ros.image_conversion import compressed_msg_to_rgb, image_msg_to_rgb  # noqa: E402

pytestmark = pytest.mark.ros

DISCOVERY_TIMEOUT_S = 20.0  # first frames: process start (~1-2 s) + DDS discovery (~1-3 s)


# ---- fixtures and helpers ------------------------------------------------------------

@pytest.fixture(scope="module")
def domain_id() -> Iterator[int]:
    """A random ROS_DOMAIN_ID for this module, set in os.environ while it runs."""
    old = os.environ.get("ROS_DOMAIN_ID")
    domain = random.SystemRandom().randint(1, 100)
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    yield domain
    if old is None:
        os.environ.pop("ROS_DOMAIN_ID", None)
    else:
        os.environ["ROS_DOMAIN_ID"] = old


@pytest.fixture(scope="module")
def context(domain_id: int) -> Iterator[Context]:
    """A private rclpy context (domain read from os.environ at init), so other test modules'
    rclpy state neither leaks in nor is shut down by this one."""
    ctx = Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


class SourceProcess(NodeProcess):
    """The installed image_source with parameters; output captured in a log file."""

    def __init__(self, params: dict[str, object], log_path: Path) -> None:
        # found through the ament index, so it runs in any workspace layout (colcon test in ws/src)
        super().__init__("image_source", params, log_path=log_path)

    def log(self) -> str:
        return self.log_text()


@pytest.fixture
def start_source(domain_id: int, tmp_path: Path) -> Iterator[Callable[..., SourceProcess]]:
    """Start image_source processes; every one is stopped at teardown, even on failure."""
    started: list[SourceProcess] = []

    def start(**params: object) -> SourceProcess:
        proc = SourceProcess(params, tmp_path / f"image_source_{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class Listener:
    """Test-side node recording image, compressed and ground-truth messages of one frame_id."""

    def __init__(self, context: Context, frame_id: str, subscribe: bool = True) -> None:
        self.frame_id = frame_id
        self.node = rclpy.create_node(f"listener_{uuid.uuid4().hex[:8]}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.images: list[tuple[float, Image]] = []
        self.compressed: list[tuple[float, CompressedImage]] = []
        self.truths: list[dict] = []
        if not subscribe:
            return
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Image, "image", lambda m: self._keep(self.images, m), qos)
        self.node.create_subscription(CompressedImage, "image/compressed",
                                      lambda m: self._keep(self.compressed, m), qos)
        self.node.create_subscription(String, "ground_truth", self._truth, qos)

    def _keep(self, store: list, msg) -> None:
        if msg.header.frame_id == self.frame_id:
            store.append((time.monotonic(), msg))

    def _truth(self, msg: String) -> None:
        record = json.loads(msg.data)
        if record.get("frame_id") == self.frame_id:
            self.truths.append(record)

    def spin_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return done()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def truth_for(self, msg) -> dict | None:
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        for record in self.truths:
            if (record["stamp"]["sec"], record["stamp"]["nanosec"]) == key:
                return record
        return None

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture
def listen(context: Context) -> Iterator[Callable[[str], Listener]]:
    listeners: list[Listener] = []

    def make(frame_id: str, subscribe: bool = True) -> Listener:
        listeners.append(Listener(context, frame_id, subscribe))
        return listeners[-1]

    yield make
    for listener in listeners:
        listener.close()


def unique_frame_id() -> str:
    return f"cam_{uuid.uuid4().hex[:10]}"


def stamp_s(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def wait_exit(proc: SourceProcess, timeout_s: float = 20.0) -> int:
    try:
        return proc.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"image_source did not exit; log:\n{proc.log()}")


def assert_objects_drawn(rgb: np.ndarray, truth: dict, tolerance: int) -> None:
    """Each object's colour is at its centre pixel (the generator draws exact palette colours)."""
    assert truth["objects"], "a synthetic scene has at least one object"
    for obj in truth["objects"]:
        pixel = rgb[int(obj["y"]), int(obj["x"])].astype(int)
        expected = np.array(COLOR_RGB[obj["color"]])
        assert np.abs(pixel - expected).max() <= tolerance, (obj, pixel.tolist())


# ---- synthetic camera ----------------------------------------------------------------

def test_synthetic_frames_rate_size_and_ground_truth(start_source, listen) -> None:
    frame_id = unique_frame_id()
    listener = listen(frame_id)
    proc = start_source(rate_hz=20.0, width=320, height=240, frame_id=frame_id, seed=3)
    assert listener.spin_until(lambda: len(listener.images) >= 1, DISCOVERY_TIMEOUT_S), proc.log()
    assert listener.spin_until(lambda: len(listener.images) >= 41, 10.0), f"{len(listener.images)} frames"
    listener.spin_for(0.2)  # the ground truth of the last frame
    assert proc.proc.poll() is None

    frames = [msg for _, msg in listener.images[1:41]]  # the first one may have waited for discovery
    # Rate: from the publisher's stamps (exact timer ticks) and from arrival times (DDS + load).
    stamps = [stamp_s(m) for m in frames]
    assert 20.0 * 0.75 < (len(stamps) - 1) / (stamps[-1] - stamps[0]) < 20.0 * 1.25
    arrivals = [t for t, _ in listener.images[1:41]]
    assert 20.0 * 0.6 < (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) < 20.0 * 1.5
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), "stamps must increase"

    for msg in frames:
        assert (msg.width, msg.height, msg.encoding, msg.step) == (320, 240, "rgb8", 960)
        assert msg.header.frame_id == frame_id

    paired = [(m, listener.truth_for(m)) for m in frames]
    paired = [(m, t) for m, t in paired if t is not None]
    assert len(paired) == len(frames), f"only {len(paired)} of {len(frames)} frames have ground truth"
    indices = [t["scene_index"] for _, t in paired]
    assert indices == sorted(indices) and len(set(indices)) == len(indices), "scene_period_s 0: a scene per frame"
    for msg, truth in paired:
        assert truth["frame_id"] == frame_id and truth["encoding"] == "rgb8"
        assert (truth["width"], truth["height"]) == (320, 240)
        assert truth["qas"] and all({"question", "answer", "family"} <= set(qa) for qa in truth["qas"])
        assert_objects_drawn(image_msg_to_rgb(msg), truth, tolerance=0)
        # Default layout: a 4x3 grid, one object centred per 80x80 cell (the student's image tokens).
        assert all((o["x"] - 40) % 80 == 0 and (o["y"] - 40) % 80 == 0 for o in truth["objects"]), truth

    assert proc.stop() == 0, proc.log()  # SIGINT is a clean exit
    assert "publishing synthetic scenes" in proc.log()


def test_compressed_mode_and_scene_period(start_source, listen) -> None:
    frame_id = unique_frame_id()
    listener = listen(frame_id)
    proc = start_source(rate_hz=20.0, width=320, height=240, frame_id=frame_id, compressed=True,
                        compressed_format="jpeg", scene_period_s=0.5, seed=5, scene_layout="random")
    assert listener.spin_until(lambda: len(listener.compressed) >= 1, DISCOVERY_TIMEOUT_S), proc.log()
    assert listener.spin_until(lambda: len(listener.compressed) >= 31, 10.0)
    listener.spin_for(0.2)
    assert not listener.images, "compressed mode publishes image/compressed only"

    frames = [msg for _, msg in listener.compressed[1:31]]
    for msg in frames:
        assert msg.format == "rgb8; jpeg compressed bgr8"
        assert bytes(msg.data[:2]) == b"\xff\xd8"
    truths = [listener.truth_for(m) for m in frames]
    assert all(t is not None for t in truths)
    # 30 frames at 20 Hz span 1.5 s: with 0.5 s per scene, 3-4 scenes, each on many frames.
    indices = [t["scene_index"] for t in truths]
    runs = [indices.count(i) for i in sorted(set(indices))]
    assert 2 <= len(runs) <= 5 and max(runs) >= 8, indices
    for msg, truth in zip(frames, truths, strict=True):
        rgb = compressed_msg_to_rgb(msg)
        assert rgb.shape == (240, 320, 3)
        assert_objects_drawn(rgb, truth, tolerance=24)  # JPEG: close, not exact
    centres = [(o["x"], o["y"]) for t in truths for o in t["objects"]]
    assert any((x - 40) % 80 or (y - 40) % 80 for x, y in centres), "scene_layout random: objects anywhere"


# ---- folder and video ----------------------------------------------------------------

FOLDER_COLOURS = {"img1.png": (200, 30, 30), "img2.png": (30, 200, 30), "img10.png": (30, 30, 200)}


def write_folder(folder: Path, broken: bool = False) -> Path:
    folder.mkdir()
    for name, colour in FOLDER_COLOURS.items():  # natural order: img1, img2, img10
        image = np.zeros((90, 120, 3), np.uint8)
        image[:] = colour
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    if broken:
        (folder / "img5.png").write_bytes(b"\x89PNG but broken")
    return folder


def test_folder_source_publishes_images_in_order_resized(start_source, listen, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "frames")
    frame_id = unique_frame_id()
    listener = listen(frame_id)
    proc = start_source(source="folder", path=str(folder), rate_hz=20.0, width=64, height=48,
                        encoding="bgr8", frame_id=frame_id, loop=True)
    assert listener.spin_until(lambda: len(listener.images) >= 8, DISCOVERY_TIMEOUT_S), proc.log()
    assert not listener.truths, "only synthetic frames have ground truth"
    expected = list(FOLDER_COLOURS.values())
    colours = []
    for _, msg in listener.images[:8]:
        assert (msg.width, msg.height, msg.encoding) == (64, 48, "bgr8")
        rgb = image_msg_to_rgb(msg)
        assert (rgb == rgb[0, 0]).all()
        colours.append(tuple(int(c) for c in rgb[0, 0]))
    start = expected.index(colours[0])
    assert colours == [expected[(start + i) % 3] for i in range(8)], colours


def test_folder_without_loop_stops_and_skips_unreadable(start_source, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "frames", broken=True)
    proc = start_source(source="folder", path=str(folder), rate_hz=50.0, loop=False, frame_id=unique_frame_id())
    deadline = time.monotonic() + 15.0
    while "end of folder" not in proc.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = proc.log()
    assert "end of folder" in log and "published 3 frames" in log, log
    assert "skipping unreadable image" in log and "img5.png" in log
    time.sleep(0.3)
    assert proc.proc.poll() is None, "the node stays up after the end (it only stops publishing)"
    assert proc.stop() == 0


def write_video(path: Path, colours: list[tuple[int, int, int]]) -> bool:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    if not writer.isOpened():
        return False
    for colour in colours:
        frame = np.zeros((120, 160, 3), np.uint8)
        frame[:] = colour[::-1]  # BGR
        writer.write(frame)
    writer.release()
    return path.is_file() and path.stat().st_size > 0


def test_video_source_loops(start_source, listen, tmp_path: Path) -> None:
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    video = tmp_path / "clip.avi"
    if not write_video(video, colours):
        pytest.skip("this OpenCV build cannot write MJPG video")
    frame_id = unique_frame_id()
    listener = listen(frame_id)
    proc = start_source(source="video", path=str(video), rate_hz=20.0, width=0, height=0, frame_id=frame_id)
    assert listener.spin_until(lambda: len(listener.images) >= 7, DISCOVERY_TIMEOUT_S), proc.log()
    seen = []
    for _, msg in listener.images[:7]:
        assert (msg.width, msg.height) == (160, 120), "width=height=0 keeps the native size"
        centre = image_msg_to_rgb(msg)[60, 80].astype(int)
        nearest = int(np.argmin([np.abs(centre - c).sum() for c in colours]))
        assert np.abs(centre - colours[nearest]).max() <= 20
        seen.append(nearest)
    start = seen[0]
    assert seen == [(start + i) % 3 for i in range(7)], seen  # in order, wrapping around
    assert "video" in proc.log()


# ---- errors --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source": "video", "path": "/nonexistent/clip.mp4"}, "video file not found: /nonexistent/clip.mp4"),
        ({"source": "folder", "path": "/nonexistent/frames"}, "image folder not found: /nonexistent/frames"),
        ({"source": "video"}, "source 'video' needs the parameter path"),
        ({"source": "device", "device": "/dev/video_nonexistent"}, "camera device not found"),
        ({"source": "webcam"}, "parameter source must be one of synthetic, video, folder, device"),
        ({"encoding": "hsv8"}, "unsupported image encoding 'hsv8'; supported: rgb8"),
        ({"rate_hz": 0.0}, "rate_hz must be > 0"),
        ({"width": 320.5}, "invalid parameter"),
        ({"scene_layout": "hexagonal"}, "parameter scene_layout must be grid or random"),
        ({"scene_grid": [0, 3]}, "parameter scene_grid must be [columns, rows] >= 1"),
        ({"scene_grid": [2, 2], "width": 320, "height": 240}, "exceeds the 2x2 grid"),
    ],
)
def test_bad_configuration_exits_non_zero_with_a_clear_message(start_source, params: dict, message: str) -> None:
    proc = start_source(**params)
    code = wait_exit(proc)
    log = proc.log()
    assert code == 1, log
    assert message in log, log
    assert "Traceback" not in log, log


def test_rate_accepts_an_integer(start_source) -> None:
    """`-p rate_hz:=20` (an integer) must not be a type error for a float parameter."""
    proc = start_source(rate_hz=20, width=64, height=48)
    deadline = time.monotonic() + 15.0
    while "first frame published" not in proc.log() and time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()
        time.sleep(0.1)
    assert "at 20 Hz" in proc.log(), proc.log()


def test_qos_reliability_parameter_is_applied(start_source, listen) -> None:
    listener = listen(unique_frame_id(), subscribe=False)  # a reliable reader would be incompatible
    proc = start_source(rate_hz=5.0, width=64, height=48, qos_reliability="best_effort", qos_depth=3)

    def publisher_reliabilities():
        infos = listener.node.get_publishers_info_by_topic("/image")
        return [i.qos_profile.reliability for i in infos if i.node_name == "image_source"]

    assert listener.spin_until(lambda: publisher_reliabilities(), DISCOVERY_TIMEOUT_S), proc.log()
    assert set(publisher_reliabilities()) == {ReliabilityPolicy.BEST_EFFORT}
    assert listener.spin_until(lambda: "QoS best_effort depth 3" in proc.log(), 5.0), proc.log()


# ---- the sources on their own (in this process, no DDS) -------------------------------

class FakeCapture:
    """Stands in for cv2.VideoCapture of a camera: frames numbered in pixel [0, 0, 0]."""

    fail_reads = False
    paused = False

    def __init__(self, device, backend=None) -> None:
        self.device, self.count = device, 0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def set(self, prop, value) -> bool:
        return True

    def get(self, prop) -> float:
        return 0.0

    def read(self):
        time.sleep(0.005)
        if self.fail_reads or FakeCapture.paused:
            return False, None
        self.count += 1
        frame = np.zeros((4, 6, 3), np.uint8)
        frame[0, 0, 0] = self.count % 256  # BGR blue channel -> RGB [..., 2]
        return True, frame

    def release(self) -> None:
        pass


def test_device_source_publishes_the_newest_frame_once(monkeypatch) -> None:
    monkeypatch.setattr(image_source.cv2, "VideoCapture", FakeCapture)
    clock = iter(range(10**9))
    source = image_source.DeviceSource("0", 0, 0, now_ns=lambda: next(clock))
    try:
        time.sleep(0.1)  # the camera thread grabs ~20 frames
        monkeypatch.setattr(FakeCapture, "paused", True)
        time.sleep(0.05)
        first = source.next()
        assert first is not None and first.rgb.shape == (4, 6, 3) and first.stamp_ns is not None
        assert source.next() is None  # nothing new since: no frame is published twice
        monkeypatch.setattr(FakeCapture, "paused", False)
        time.sleep(0.1)
        second = source.next()
        assert second is not None and second.stamp_ns > first.stamp_ns
        assert int(second.rgb[0, 0, 2]) != int(first.rgb[0, 0, 2]), "old frames are skipped, not queued"
    finally:
        source.close()


def test_device_source_reports_a_dead_camera(monkeypatch) -> None:
    monkeypatch.setattr(image_source.cv2, "VideoCapture", FakeCapture)
    monkeypatch.setattr(FakeCapture, "fail_reads", True)
    source = image_source.DeviceSource("3", 0, 0, now_ns=time.monotonic_ns, timeout_s=0.2)
    try:
        time.sleep(0.4)
        with pytest.raises(image_source.ImageSourceError, match="camera 3 delivered no frame for 0.2 s"):
            source.next()
    finally:
        source.close()


def test_synthetic_source_keeps_a_scene_for_its_period() -> None:
    now = [0.0]
    source = image_source.SyntheticSource(96, 64, seed=1, period_s=1.0, clock=lambda: now[0])
    first = source.next()
    assert first.rgb.shape == (64, 96, 3) and first.ground_truth["scene_index"] == 0
    now[0] = 0.9
    assert source.next() is first
    now[0] = 1.0
    second = source.next()
    assert second.ground_truth["scene_index"] == 1 and second.key != first.key
    again = image_source.SyntheticSource(96, 64, seed=1, period_s=0.0)
    np.testing.assert_array_equal(again.next().rgb, first.rgb)  # seeded: same sequence every run
    assert again.next().ground_truth["scene_index"] == 1  # period 0: a new scene per frame


def test_fit_size_and_device_names() -> None:
    assert image_source.fit_size((480, 640, 3), 320, 240) == (320, 240)
    assert image_source.fit_size((480, 640, 3), 320, 0) == (320, 240)
    assert image_source.fit_size((480, 640, 3), 0, 120) == (160, 120)
    assert image_source.fit_size((480, 640, 3), 0, 0) == (640, 480)
    assert image_source._parse_device("2") == 2
    assert image_source._parse_device(" /dev/video1 ") == "/dev/video1"
