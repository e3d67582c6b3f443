"""End-to-end tests of the installed `image_source` executable over real Fast DDS.

The node runs as its own process (exactly what users and the launch file start); this test
process subscribes with rclpy. Run under `scripts/in_env.sh pytest ...` so the process gets
the venv, the colcon install and localhost-only discovery.

Isolation: the module picks a random ROS_DOMAIN_ID (1..100) before its rclpy context is
created and passes it to every process it starts, and each test uses its own frame_id and
ignores messages with any other, so parallel runs on the machine cannot cross-talk.
"""

from __future__ import annotations

import contextlib
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

from vlsi_model.data.scenes import COLOR_RGB  # noqa: E402
from vlsi_ros import frame_sources  # noqa: E402
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
        ({"wait_for_subscribers": -1}, "parameter wait_for_subscribers must be >= 0"),
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
    monkeypatch.setattr(frame_sources.cv2, "VideoCapture", FakeCapture)
    clock = iter(range(10**9))
    source = frame_sources.DeviceSource("0", 0, 0, now_ns=lambda: next(clock))
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
    monkeypatch.setattr(frame_sources.cv2, "VideoCapture", FakeCapture)
    monkeypatch.setattr(FakeCapture, "fail_reads", True)
    source = frame_sources.DeviceSource("3", 0, 0, now_ns=time.monotonic_ns, timeout_s=0.2)
    try:
        time.sleep(0.4)
        with pytest.raises(frame_sources.ImageSourceError, match="camera 3 delivered no frame for 0.2 s"):
            source.next()
    finally:
        source.close()


def test_synthetic_source_keeps_a_scene_for_its_period() -> None:
    now = [0.0]
    source = frame_sources.SyntheticSource(96, 64, seed=1, period_s=1.0, clock=lambda: now[0])
    first = source.next()
    assert first.rgb.shape == (64, 96, 3) and first.ground_truth["scene_index"] == 0
    now[0] = 0.9
    assert source.next() is first
    now[0] = 1.0
    second = source.next()
    assert second.ground_truth["scene_index"] == 1 and second.key != first.key
    again = frame_sources.SyntheticSource(96, 64, seed=1, period_s=0.0)
    np.testing.assert_array_equal(again.next().rgb, first.rgb)  # seeded: same sequence every run
    assert again.next().ground_truth["scene_index"] == 1  # period 0: a new scene per frame


def test_fit_size_and_device_names() -> None:
    assert frame_sources.fit_size((480, 640, 3), 320, 240) == (320, 240)
    assert frame_sources.fit_size((480, 640, 3), 320, 0) == (320, 240)
    assert frame_sources.fit_size((480, 640, 3), 0, 120) == (160, 120)
    assert frame_sources.fit_size((480, 640, 3), 0, 0) == (640, 480)
    assert frame_sources._parse_device("2") == 2
    assert frame_sources._parse_device(" /dev/video1 ") == "/dev/video1"


# ---- bag replay ------------------------------------------------------------------------

BAG_FRAMES = 20
BAG_INTERVAL_NS = 200_000_000  # recorded at 5 frames/s
BAG_T0_NS = 1_700_000_000 * 1_000_000_000  # recorded long ago: a replay must not reuse these stamps
BAG_TOPIC = "/robot/front/image_raw"


def distinct_scenes(n: int) -> list[np.ndarray]:
    """n distinct synthetic scenes, 96x72 (odd sizes for the decoder are not the point here)."""
    from vlsi_model.data import render, scenes
    config = scenes.SceneConfig(width=96, height=72)
    rgbs = [render.render_scene(scenes.generate_scene(scenes.scene_seed("test", 11, i), config)) for i in range(n)]
    assert len({rgb.tobytes() for rgb in rgbs}) == n
    return rgbs


@pytest.fixture(scope="module")
def bag_rgbs() -> list[np.ndarray]:
    return distinct_scenes(BAG_FRAMES)


def make_bag(tmp_path: Path, rgbs: list[np.ndarray], fmt: str = "mcap", frame_id: str = "front",
             compressed: bool = False, name: str = "run1") -> Path:
    from vlsi_model.data.bags import write_image_bag

    path = tmp_path / (f"{name}.bag" if fmt == "ros1" else name)
    frames = [(BAG_T0_NS + i * BAG_INTERVAL_NS, rgb) for i, rgb in enumerate(rgbs)]
    return write_image_bag(path, frames, topic=BAG_TOPIC, fmt=fmt, compressed=compressed, frame_id=frame_id)


def storage_file(bag: Path) -> Path:
    """The .mcap / .db3 of a rosbag2 directory, or the ROS 1 .bag itself."""
    return bag if bag.is_file() else next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))


def bag_index(rgb: np.ndarray, rgbs: list[np.ndarray]) -> int:
    """Which bag frame `rgb` is, pixel for pixel."""
    matches = [i for i, frame in enumerate(rgbs) if frame.shape == rgb.shape and np.array_equal(frame, rgb)]
    assert len(matches) == 1, f"published frame matches bag frames {matches}"
    return matches[0]


def wait_for_log(proc: SourceProcess, text: str, listener: Listener, timeout_s: float = 15.0) -> str:
    """Spin `listener` (so arrival times are true) until `text` is in the node's log."""
    def done() -> bool:
        assert proc.proc.poll() is None, proc.log()
        return text in proc.log()

    assert listener.spin_until(done, timeout_s), proc.log()
    return proc.log()


def assert_stamped_now(listener: Listener) -> None:
    """Stamps are the publish time (ROS clock = wall clock here), not the recorded ones."""
    wall_minus_monotonic = time.time() - time.monotonic()
    for arrival, msg in listener.images:
        delay = arrival + wall_minus_monotonic - stamp_s(msg)
        assert -0.05 < delay < 1.0, f"stamp {stamp_s(msg):.3f} is {delay:.3f} s before its arrival"


@pytest.mark.parametrize("fmt", ["mcap", "sqlite3", "ros1"])
def test_bag_fixed_timing_replays_frames_in_order_and_loops(start_source, listen, tmp_path: Path, bag_rgbs,
                                                            fmt: str) -> None:
    frame_id = unique_frame_id()
    bag = make_bag(tmp_path, bag_rgbs, fmt=fmt, frame_id=frame_id)
    listener = listen(frame_id)
    proc = start_source(source="bag", path=str(bag), bag_timing="fixed", rate_hz=50.0, width=0, height=0,
                        frame_id="not_the_recorded_one", qos_depth=50)
    assert listener.spin_until(lambda: len(listener.images) >= 1, DISCOVERY_TIMEOUT_S), proc.log()
    assert listener.spin_until(lambda: len(listener.images) >= 30, 10.0), f"{len(listener.images)} frames"
    indices = []
    for _, msg in listener.images[:30]:
        assert (msg.width, msg.height, msg.encoding) == (96, 72, "rgb8")
        assert msg.header.frame_id == frame_id  # the recorded one, not the parameter
        indices.append(bag_index(image_msg_to_rgb(msg), bag_rgbs))
    assert indices == [(indices[0] + i) % BAG_FRAMES for i in range(30)], indices  # in order, wrapping
    assert_stamped_now(listener)
    log = proc.log()
    assert f"bag {bag} topic {BAG_TOPIC} ({BAG_FRAMES} frames, 3.8 s, fixed timing, looping)" in log, log
    assert proc.stop() == 0, proc.log()


def test_bag_without_loop_publishes_each_frame_once_and_stops(start_source, listen, tmp_path: Path,
                                                               bag_rgbs) -> None:
    frame_id = unique_frame_id()
    bag = make_bag(tmp_path, bag_rgbs, fmt="sqlite3", frame_id=frame_id)
    listener = listen(frame_id)
    # wait_for_subscribers: the first frame waits for the listener (a CI run under load lost all 20
    # frames to discovery without it), so every frame arrives, in order
    proc = start_source(source="bag", path=str(storage_file(bag)), bag_timing="fixed", rate_hz=10.0,
                        width=0, height=0, loop=False, qos_depth=50, wait_for_subscribers=1)
    log = wait_for_log(proc, "end of bag", listener, timeout_s=DISCOVERY_TIMEOUT_S)
    assert f"published {BAG_FRAMES} frames" in log, log
    listener.spin_for(0.5)
    indices = [bag_index(image_msg_to_rgb(msg), bag_rgbs) for _, msg in listener.images]
    assert indices == list(range(BAG_FRAMES)), indices  # the whole bag, in order
    count = len(listener.images)
    listener.spin_for(0.3)
    assert len(listener.images) == count, "nothing after the end"
    assert_stamped_now(listener)
    assert proc.proc.poll() is None, "the node stays up after the end (it only stops publishing)"
    assert proc.stop() == 0


def test_no_frame_until_enough_subscribers_match(start_source, listen) -> None:
    frame_id = unique_frame_id()
    first = listen(frame_id)
    proc = start_source(rate_hz=20.0, width=64, height=48, frame_id=frame_id, wait_for_subscribers=2)
    assert first.spin_until(lambda: "waiting for 2 subscriber(s)" in proc.log(), DISCOVERY_TIMEOUT_S), proc.log()
    first.spin_for(1.5)  # matched to one subscriber: still nothing
    assert not first.images and "first frame published" not in proc.log(), proc.log()
    second = listen(frame_id)
    assert first.spin_until(lambda: len(first.images) >= 3, DISCOVERY_TIMEOUT_S), proc.log()
    second.spin_for(0.5)
    assert second.images


def test_bag_recorded_timing_follows_the_recorded_pace(start_source, listen, tmp_path: Path) -> None:
    """8 s of recorded frames: discovery on a loaded machine can take seconds, and the frames the
    listener sees after it must still come at the recorded pace, each once."""
    count = 2 * BAG_FRAMES
    rgbs = distinct_scenes(count)
    frame_id = unique_frame_id()
    bag = make_bag(tmp_path, rgbs, fmt="mcap", frame_id=frame_id)
    listener = listen(frame_id)
    proc = start_source(source="bag", path=str(bag), rate_hz=50.0, width=0, height=0, loop=False, qos_depth=50)
    log = wait_for_log(proc, "end of bag", listener, timeout_s=DISCOVERY_TIMEOUT_S + 8.0)
    listener.spin_for(0.3)
    assert f"published {count} frames" in log and "recorded timing" in log, log
    frames = [(bag_index(image_msg_to_rgb(msg), rgbs), stamp_s(msg)) for _, msg in listener.images]
    assert len(frames) >= 8, f"only {len(frames)} frames received"
    indices = [i for i, _ in frames]
    assert indices == list(range(indices[0], count)), indices  # every frame once (50 Hz > 5 frames/s)
    rate = (len(frames) - 1) / (frames[-1][1] - frames[0][1])
    assert 5.0 * 0.85 < rate < 5.0 * 1.15, f"{rate:.2f} frames/s for a bag recorded at 5"
    # Each frame goes out on the first tick after it is due: publish time - recorded offset is
    # the same for all, up to a tick (20 ms) and scheduling jitter.
    lags = [stamp - i * BAG_INTERVAL_NS * 1e-9 for i, stamp in frames]
    assert max(lags) - min(lags) < 0.1, [round(lag - min(lags), 3) for lag in lags]
    assert_stamped_now(listener)


def test_bag_of_compressed_images(start_source, listen, tmp_path: Path, bag_rgbs) -> None:
    frame_id = unique_frame_id()
    bag = make_bag(tmp_path, bag_rgbs, fmt="ros1", frame_id=frame_id, compressed=True)
    listener = listen(frame_id)
    proc = start_source(source="bag", path=str(bag), topic=BAG_TOPIC, bag_timing="fixed", rate_hz=50.0,
                        width=0, height=0, qos_depth=50)
    assert listener.spin_until(lambda: len(listener.images) >= 25, DISCOVERY_TIMEOUT_S), proc.log()
    indices = []
    for _, msg in listener.images[:25]:
        rgb = image_msg_to_rgb(msg)
        errors = [np.abs(rgb.astype(int) - frame.astype(int)).mean() for frame in bag_rgbs]
        indices.append(int(np.argmin(errors)))
        assert errors[indices[-1]] < 4.0, errors  # JPEG quality 90: close, not exact
    assert indices == [(indices[0] + i) % BAG_FRAMES for i in range(25)], indices
    assert_stamped_now(listener)


def corrupt_bag(tmp_path: Path, rgbs: list[np.ndarray], kind: str) -> Path:
    if kind == "truncated mcap":
        bag = make_bag(tmp_path, rgbs, fmt="mcap")
        data = storage_file(bag).read_bytes()
        storage_file(bag).write_bytes(data[: len(data) // 2])  # a recording cut short
    elif kind == "garbage db3":
        bag = make_bag(tmp_path, rgbs, fmt="sqlite3")
        storage_file(bag).write_bytes(b"this is not a database " * 1000)
    else:
        raise ValueError(kind)
    return bag


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "bag not found: /nonexistent/run1"),
        ("unknown topic", f"no topic /rear/image in {{bag}} (image topics: {BAG_TOPIC})"),
        ("truncated mcap", "cannot open bag {bag}"),
        ("garbage db3", "cannot open bag {bag}: AnyReaderError: Cannot open database"),
        ("no path", "source 'bag' needs the parameter path"),
        ("bad timing", "parameter bag_timing must be one of recorded, fixed, got 'realtime'"),
    ],
)
def test_bad_bag_exits_non_zero_with_a_clear_message(start_source, tmp_path: Path, bag_rgbs, case: str,
                                                     message: str) -> None:
    params: dict[str, object] = {"source": "bag"}
    bag = Path("/nonexistent/run1")
    if case in ("truncated mcap", "garbage db3"):
        bag = corrupt_bag(tmp_path, bag_rgbs[:4], case)
    elif case in ("unknown topic", "bad timing"):
        bag = make_bag(tmp_path, bag_rgbs[:4])
    if case == "unknown topic":
        params["topic"] = "/rear/image"
    if case == "bad timing":
        params["bag_timing"] = "realtime"
    if case != "no path":
        params["path"] = str(bag)
    proc = start_source(**params)
    code = wait_exit(proc)
    log = proc.log()
    assert code == 1, log
    assert message.format(bag=bag) in log, log
    assert "Traceback" not in log, log


# ---- BagSource on its own (in this process, no DDS) -----------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def count_decodes(monkeypatch) -> list[int]:
    """Indices of the bag frames whose pixels were decoded."""
    from vlsi_model.data import bags

    decoded: list[int] = []
    rgb = bags.BagFrame.rgb

    def counting(self, *args, **kwargs):
        decoded.append(self.index)
        return rgb(self, *args, **kwargs)

    monkeypatch.setattr(bags.BagFrame, "rgb", counting)
    return decoded


def test_bag_source_recorded_timing_skips_late_frames_undecoded(tmp_path: Path, bag_rgbs, monkeypatch) -> None:
    rgbs = bag_rgbs[:10]
    bag = make_bag(tmp_path, rgbs, fmt="mcap")
    decoded = count_decodes(monkeypatch)
    clock = FakeClock()
    source = frame_sources.BagSource(str(bag), "", "recorded", loop=True, clock=clock)
    try:
        assert source.topic == BAG_TOPIC

        def at(t: float) -> int | None:
            clock.now = 100.0 + t
            frame = source.next()
            if frame is None:
                return None
            assert frame.stamp_ns is None and frame.frame_id == "front"  # the node stamps the publish time
            return bag_index(frame.rgb, rgbs)

        assert at(0.0) == 0  # the first call starts the replay clock
        assert at(0.1) is None  # frame 1 is not due yet: nothing new
        assert at(0.201) == 1
        assert at(0.25) is None
        assert at(1.05) == 5  # 2, 3 and 4 are past: skipped
        assert at(1.801) == 9  # the last frame
        assert at(1.9) is None  # the next pass starts one frame interval (0.2 s) after the last frame
        assert at(2.01) == 0  # looped: the clock restarts
        assert at(2.1) is None
        assert at(2.211) == 1
        assert decoded == [0, 1, 5, 9, 0, 1], "only published frames are decoded"
    finally:
        source.close()


def test_bag_source_fixed_timing_ends_or_loops(tmp_path: Path, bag_rgbs) -> None:
    rgbs = bag_rgbs[:5]
    bag = make_bag(tmp_path, rgbs, fmt="ros1", frame_id="")
    once = frame_sources.BagSource(str(bag), BAG_TOPIC, "fixed", loop=False)
    try:
        assert once.describe() == f"bag {bag} topic {BAG_TOPIC} (5 frames, 0.8 s, fixed timing)"
        frames = [once.next() for _ in range(5)]
        assert [bag_index(f.rgb, rgbs) for f in frames] == [0, 1, 2, 3, 4]
        assert all(f.frame_id is None for f in frames), "no recorded frame_id: the node's parameter is used"
        with pytest.raises(frame_sources.EndOfSource, match="end of bag"):
            once.next()
    finally:
        once.close()
    looping = frame_sources.BagSource(str(bag), "", "fixed", loop=True)
    try:
        assert [bag_index(looping.next().rgb, rgbs) for _ in range(12)] == [i % 5 for i in range(12)]
    finally:
        looping.close()


def write_messages_bag(path: Path, messages: list[tuple[str, str, int, object]]) -> Path:
    """A rosbag2 MCAP bag of arbitrary (topic, msgtype, time_ns, message) records."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connections: dict[str, object] = {}
        for topic, msgtype, time_ns, msg in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connections[topic], time_ns, store.serialize_cdr(msg, msgtype))
    return path


def ros_image(rgb: np.ndarray, time_ns: int, encoding: str = "rgb8"):
    from rosbags.typesys import Stores, get_typestore

    types = get_typestore(Stores.ROS2_HUMBLE).types
    header = types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=time_ns // 10**9, nanosec=time_ns % 10**9), frame_id="front")
    h, w = rgb.shape[:2]
    return types["sensor_msgs/msg/Image"](header=header, height=h, width=w, encoding=encoding, is_bigendian=0,
                                          step=w * 3, data=rgb.reshape(-1).copy())


def test_bag_source_skips_undecodable_frames_with_a_throttled_warning(tmp_path: Path, bag_rgbs) -> None:
    rgbs = bag_rgbs[:6]
    bad = {1, 3, 4}  # an encoding the decoder does not know
    messages = [(BAG_TOPIC, "sensor_msgs/msg/Image", BAG_T0_NS + i * BAG_INTERVAL_NS,
                 ros_image(rgb, BAG_T0_NS + i * BAG_INTERVAL_NS, "hsv8" if i in bad else "rgb8"))
                for i, rgb in enumerate(rgbs)]
    bag = write_messages_bag(tmp_path / "bad_frames", messages)
    warnings: list[str] = []
    clock = FakeClock()
    source = frame_sources.BagSource(str(bag), "", "fixed", loop=True, warn=warnings.append, clock=clock)
    try:
        assert [bag_index(source.next().rgb, rgbs) for _ in range(3)] == [0, 2, 5]
        assert len(warnings) == 1 and "skipping undecodable frame 1" in warnings[0], warnings  # throttled
        clock.now += frame_sources.BAG_WARN_INTERVAL_S
        assert bag_index(source.next().rgb, rgbs) == 0  # looped
        assert bag_index(source.next().rgb, rgbs) == 2
        assert len(warnings) == 2 and "frame 1" in warnings[1] and "(4 skipped so far)" in warnings[1], warnings
    finally:
        source.close()

    all_bad = write_messages_bag(tmp_path / "all_bad", [m[:3] + (ros_image(rgbs[0], m[2], "hsv8"),)
                                                         for m in messages[:3]])
    source = frame_sources.BagSource(str(all_bad), "", "fixed", loop=True, warn=warnings.append)
    try:
        with pytest.raises(frame_sources.ImageSourceError, match="no frame of .* could be decoded"):
            source.next()
    finally:
        source.close()


def test_bag_source_with_several_image_topics_needs_a_topic(tmp_path: Path, bag_rgbs) -> None:
    messages = [(topic, "sensor_msgs/msg/Image", BAG_T0_NS + i, ros_image(bag_rgbs[i], BAG_T0_NS + i))
                for i, topic in enumerate(["/front/image", "/rear/image"])]
    bag = write_messages_bag(tmp_path / "two_cameras", messages)
    with pytest.raises(frame_sources.ImageSourceError,
                       match=r"has 2 image topics \(/front/image \(Image, 1 messages\), /rear/image \(Image, 1 "
                             r"messages\)\); choose one with the parameter topic"):
        frame_sources.BagSource(str(bag), "", "fixed", loop=False)
    source = frame_sources.BagSource(str(bag), "/rear/image", "fixed", loop=False)
    try:
        assert bag_index(source.next().rgb, bag_rgbs) == 1
    finally:
        source.close()


def test_bag_source_found_corrupt_while_replaying_ends_the_pass(tmp_path: Path, bag_rgbs) -> None:
    bag = make_bag(tmp_path, bag_rgbs, fmt="ros1")
    data = bytearray(bag.read_bytes())
    record = data.rfind(b"op=\x02", 0, data.find(bag_rgbs[10].tobytes()))  # frame 10's message record
    assert record > 0
    data[record - 8:record + 16] = b"\xff" * 24  # its header; the index (at the end) stays intact
    bag.write_bytes(bytes(data))
    for loop in (False, True):
        warnings: list[str] = []
        source = frame_sources.BagSource(str(bag), "", "fixed", loop=loop, warn=warnings.append)
        try:
            indices = []
            with pytest.raises(frame_sources.EndOfSource, match="end of truncated or corrupt bag") if not loop \
                    else contextlib.nullcontext():
                for _ in range(BAG_FRAMES + 5):
                    indices.append(bag_index(source.next().rgb, bag_rgbs))
            readable = indices.index(0, 1) if loop else len(indices)
            assert readable == 10 and indices[:readable] == list(range(readable)), indices
            if loop:
                assert indices == [i % readable for i in range(len(indices))], "looped to the start each time"
            assert len(warnings) == 1 and "corrupt or truncated after 10 messages" in warnings[0], warnings
        finally:
            source.close()
