"""`image_source`: a camera stand-in that publishes `image` (or `image/compressed`).

Why it exists: the VQA node needs frames to answer about, and most people who try the
package have no camera on ROS, and tests need frames whose content is *known*. So the
default source is the project's seeded synthetic scene generator (vlsi_model.scenes),
and every synthetic frame's ground truth (objects, exact answers to questions about it)
goes out on `ground_truth` (std_msgs/String, JSON) carrying the frame's stamp and
frame_id, so that an answer can be checked against the frame it describes. The same node
plays a video file, an image folder or a V4L2 camera, so a demo moves to real pictures by
changing one parameter.

Parameters (all read-only: they are read once at start-up, and a runtime change is
refused rather than silently ignored):
  source            synthetic | video | folder | device              (synthetic)
  path              video file or image folder
  device            camera index or /dev/videoN (int or string)     ("0")
  rate_hz           publishing rate                                 (10.0)
  width, height     frame size; non-synthetic frames are resized when > 0 (640x480;
                    one of them 0 keeps the aspect ratio, both 0 the native size)
  encoding          any vlsi_ros.image_conversion encoding           (rgb8)
  frame_id          header.frame_id                                 (camera)
  compressed        publish image/compressed instead of image       (false)
  compressed_format jpeg | png                                      (jpeg)
  jpeg_quality      1..100                                          (90)
  loop              video/folder restart at the end; otherwise stop (true)
  seed              synthetic scene sequence seed                   (0)
  scene_period_s    keep each synthetic scene this long; 0 = new scene every frame (0.0)
  scene_layout      grid | random: synthetic objects one per grid cell, or anywhere (grid)
  scene_grid        [columns, rows] of the grid layout                ([4, 3])
                    At 640x480 a 4x3 grid puts each object on one image token of the
                    default student (frames are resized to 112x84 = 4x3 tokens of 28 px),
                    the layout it was trained on; "random" is harder for small models.
  qos_reliability   reliable | best_effort (image topic)            (reliable)
  qos_depth         keep-last depth (image topic)                   (1)
QoS can also be overridden per topic with `qos_overrides./image.publisher.*` parameters,
as in ros2/demos quality_of_service_demo.

Configuration and device errors (missing file, camera not opening, bad parameter) are
logged as one clear line and the process exits with status 1, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from vlsi_ros.image_conversion import (
    ImageConversionError,
    encoding_info,
    normalize_compressed_format,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)

SOURCES = ("synthetic", "video", "folder", "device")
RELIABILITIES = ("reliable", "best_effort")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
# A camera that delivers nothing for this long is considered gone (fatal error).
DEVICE_TIMEOUT_S = 5.0


class ImageSourceError(RuntimeError):
    """A problem that stops the node: bad parameter, missing file, camera not opening.

    Raised with a message meant for the user; `main` logs it and exits with status 1.
    """


class EndOfSource(Exception):
    """A video or folder has no more frames (and `loop` is false)."""


@dataclass
class Frame:
    """One frame to publish.

    `key` identifies frames whose pixels repeat (a synthetic scene shown for
    `scene_period_s`), so their message is encoded once; `stamp_ns` is the capture time
    when the source knows it (camera), else the node stamps the publish time.
    """

    rgb: np.ndarray
    key: Any = None
    stamp_ns: int | None = None
    ground_truth: dict | None = None
    resize: bool = True


@dataclass
class Settings:
    """The node's parameters, validated."""

    source: str
    path: str
    device: str
    rate_hz: float
    width: int
    height: int
    encoding: str
    frame_id: str
    compressed: bool
    compressed_format: str
    jpeg_quality: int
    loop: bool
    seed: int
    scene_period_s: float
    scene_layout: str
    scene_grid: tuple[int, int]
    qos_reliability: str
    qos_depth: int


# ---------------------------------------------------------------------------------------
# Frame sources: plain Python, no rclpy, so each is easy to reason about on its own.
# ---------------------------------------------------------------------------------------


class SyntheticSource:
    """Seeded scenes from vlsi_model.scenes, rendered at the published size.

    Scene i of run seed s is the generator's *test* split scene (`scene_seed("test", s, i)`),
    so the synthetic camera never shows a scene the small models were trained on. A scene
    stays for `period_s` (0: one scene per frame) so that questions about "the current
    frame" keep their answers for a while.
    """

    def __init__(self, width: int, height: int, seed: int, period_s: float,
                 clock: Callable[[], float] = time.monotonic, layout: str = "random",
                 grid: tuple[int, int] = (4, 3)) -> None:
        # Imported here so that video/folder/device users don't pay for the ML library.
        from vlsi_model import scenes

        self._scenes = scenes
        if not 0 <= seed <= scenes.MAX_RUN_SEED:
            raise ImageSourceError(f"seed must be in 0..{scenes.MAX_RUN_SEED}, got {seed}")
        self._config = scenes.SceneConfig(width=width, height=height, layout=layout, grid=tuple(grid))
        try:
            self._config.validate()
        except ValueError as exc:
            raise ImageSourceError(f"synthetic scenes at {width}x{height}: {exc}") from exc
        self._seed = seed
        self._period_s = period_s
        self._clock = clock
        self._index = -1
        self._since = 0.0
        self._frame: Frame | None = None

    def describe(self) -> str:
        period = f"a new scene every {self._period_s:g} s" if self._period_s > 0 else "a new scene every frame"
        c = self._config
        layout = f"{c.grid[0]}x{c.grid[1]} grid" if c.layout == "grid" else "random layout"
        return f"synthetic scenes (seed {self._seed}, {c.width}x{c.height}, {layout}, {period})"

    def next(self) -> Frame:
        now = self._clock()
        if self._frame is None or self._period_s <= 0 or now - self._since >= self._period_s:
            self._index += 1
            self._since = now
            self._frame = self._make(self._index)
        return self._frame

    def _make(self, index: int) -> Frame:
        scenes = self._scenes
        seed = scenes.scene_seed("test", self._seed, index % scenes.SEED_STRIDE)
        scene = scenes.generate_scene(seed, self._config)
        truth = scenes.scene_ground_truth(scene, scenes.make_questions(scene, seed))
        truth["scene_index"] = index
        return Frame(rgb=scenes.render_scene(scene), key=("scene", index), ground_truth=truth, resize=False)

    def close(self) -> None:
        pass


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV frames (BGR, BGRA, grey, maybe 16-bit) as H x W x 3 uint8 RGB."""
    if frame.dtype != np.uint8:
        frame = (frame >> 8).astype(np.uint8) if frame.dtype == np.uint16 else frame.astype(np.uint8)
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class VideoSource:
    """A video file via cv2.VideoCapture, one frame per tick, restarting at the end if `loop`."""

    def __init__(self, path: str, loop: bool) -> None:
        if not path:
            raise ImageSourceError("source 'video' needs the parameter path (a video file)")
        if not Path(path).is_file():
            raise ImageSourceError(f"video file not found: {path}")
        self._path, self._loop = path, loop
        self._cap = cv2.VideoCapture(path)
        if not self._cap.isOpened():
            raise ImageSourceError(f"could not open video {path} (not a video, or no codec for it in OpenCV)")
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise ImageSourceError(f"video {path} has no readable frames")
        self._pending: np.ndarray | None = first

    def describe(self) -> str:
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        return f"video {self._path} ({count} frames at {fps:.3g} fps{', looping' if self._loop else ''})"

    def next(self) -> Frame:
        frame, self._pending = self._pending, None
        if frame is None:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                if not self._loop:
                    raise EndOfSource(f"end of video {self._path}")
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self._cap.read()
                if not ok or frame is None:
                    raise ImageSourceError(f"could not restart video {self._path}")
        return Frame(rgb=_bgr_to_rgb(frame))

    def close(self) -> None:
        self._cap.release()


def _natural_key(path: Path) -> list:
    """frame2.png before frame10.png: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FolderSource:
    """Images of a folder in natural name order, read one per tick (not preloaded)."""

    def __init__(self, path: str, loop: bool, warn: Callable[[str], None] = print) -> None:
        if not path:
            raise ImageSourceError("source 'folder' needs the parameter path (a folder of images)")
        folder = Path(path)
        if not folder.is_dir():
            raise ImageSourceError(f"image folder not found: {path}")
        self._files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=_natural_key,
        )
        if not self._files:
            raise ImageSourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        self._folder, self._loop, self._warn = folder, loop, warn
        self._next = self._bad = 0

    def describe(self) -> str:
        return f"folder {self._folder} ({len(self._files)} images{', looping' if self._loop else ''})"

    def next(self) -> Frame:
        while True:
            if self._next >= len(self._files):
                if not self._loop:
                    raise EndOfSource(f"end of folder {self._folder} ({len(self._files)} images)")
                self._next = 0
            path = self._files[self._next]
            self._next += 1
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is not None and image.size:
                self._bad = 0
                return Frame(rgb=_bgr_to_rgb(image), key=None)
            self._bad += 1
            self._warn(f"skipping unreadable image {path}")
            if self._bad >= len(self._files):
                raise ImageSourceError(f"no image in {self._folder} could be read")

    def close(self) -> None:
        pass


def _parse_device(device: str) -> int | str:
    text = str(device).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if not text:
        raise ImageSourceError("source 'device' needs the parameter device (an index like 0, or /dev/video0)")
    return text


class DeviceSource:
    """A V4L2 camera, read continuously on its own thread; each tick takes the newest frame.

    Why a thread: cameras queue frames, so reading one per tick at a rate below the
    camera's would publish ever older frames. Each frame is stamped with the time it was
    grabbed, not the time it is published.
    """

    def __init__(self, device: str, width: int, height: int, now_ns: Callable[[], int],
                 timeout_s: float = DEVICE_TIMEOUT_S) -> None:
        self._device = _parse_device(device)
        if isinstance(self._device, str) and not os.path.exists(self._device):
            raise ImageSourceError(f"camera device not found: {self._device}")
        backend = cv2.CAP_V4L2 if os.name == "posix" and hasattr(cv2, "CAP_V4L2") else cv2.CAP_ANY
        self._cap = cv2.VideoCapture(self._device, backend)
        if not self._cap.isOpened():
            self._cap.release()
            raise ImageSourceError(
                f"camera {self._device} could not be opened (is it connected, free, and readable by this "
                "user, e.g. in group 'video'?)"
            )
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if width > 0 and height > 0:  # ask for the size; frames are resized anyway if it differs
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._now_ns, self._timeout_s = now_ns, timeout_s
        self._lock = threading.Lock()
        self._latest: tuple[np.ndarray, int] | None = None
        self._taken = True
        self._last_ok = time.monotonic()
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grab, name="image_source_camera", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return f"camera {self._device} ({w}x{h} at {self._cap.get(cv2.CAP_PROP_FPS):.3g} fps)"

    def _grab(self) -> None:
        while not self._stop.is_set():
            ok, frame = self._cap.read()
            if ok and frame is not None:
                stamp = self._now_ns()
                with self._lock:
                    self._latest, self._taken = (frame, stamp), False
                self._last_ok = time.monotonic()
            elif time.monotonic() - self._last_ok > self._timeout_s:
                self._error = f"camera {self._device} delivered no frame for {self._timeout_s:g} s"
                return
            else:
                time.sleep(0.01)

    def next(self) -> Frame | None:
        """The newest frame not yet published, or None when the camera has nothing new."""
        if self._error:
            raise ImageSourceError(self._error)
        with self._lock:
            if self._latest is None or self._taken:
                return None
            frame, stamp = self._latest
            self._taken = True
        return Frame(rgb=_bgr_to_rgb(frame), stamp_ns=stamp)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._cap.release()


def fit_size(shape: tuple[int, ...], width: int, height: int) -> tuple[int, int]:
    """Target (width, height) for a frame of `shape`: both > 0 as given, one 0 keeps the
    aspect ratio, both 0 keeps the native size."""
    h, w = shape[:2]
    if width > 0 and height > 0:
        return width, height
    if width > 0:
        return width, max(1, round(h * width / w))
    if height > 0:
        return max(1, round(w * height / h)), height
    return w, h


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """`rgb` at (width, height) (area filter when shrinking); unchanged if already that size."""
    w, h = fit_size(rgb.shape, width, height)
    if (h, w) == rgb.shape[:2]:
        return rgb
    shrink = w < rgb.shape[1] or h < rgb.shape[0]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------


def _descriptor(text: str, dynamic: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=True, dynamic_typing=dynamic)


class ImageSource(Node):
    """Publishes frames from one source at `rate_hz`; see the module docstring.

    Construction raises ImageSourceError for bad parameters or an unusable source (the
    node is destroyed first). A failure while running (camera gone) is logged and sets
    the `fatal` future, which `main` waits on; the node then stops publishing.
    """

    def __init__(self, node_name: str = "image_source", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.fatal = Future()
        self._source = None
        self._timer = None
        try:
            self._settings = self._read_parameters()
            self._source = self._open_source(self._settings)
            self._create_publishers(self._settings)
        except Exception:
            self._close_source()
            self.destroy_node()
            raise
        s = self._settings
        self._published = 0
        self._cache_key: Any = None
        self._cache_msg: Image | CompressedImage | None = None
        self._timer = self.create_timer(1.0 / s.rate_hz, self._tick)
        size = {(True, True): f"{s.width}x{s.height}", (True, False): f"width {s.width}",
                (False, True): f"height {s.height}", (False, False): "native size"}[(s.width > 0, s.height > 0)]
        fmt = s.compressed_format if s.compressed else s.encoding
        self.get_logger().info(
            f"publishing {self._source.describe()} on {self._image_pub.topic_name} ({fmt}, {size}) at "
            f"{s.rate_hz:g} Hz, frame_id '{s.frame_id}', "
            f"QoS {s.qos_reliability} depth {s.qos_depth}"
            + (f"; ground truth on {self._truth_pub.topic_name}" if self._truth_pub else ""))

    # -- set-up ---------------------------------------------------------------------------

    def _read_parameters(self) -> Settings:
        declare = self.declare_parameter
        try:
            source = declare("source", "synthetic", _descriptor("synthetic | video | folder | device")).value
            path = declare("path", "", _descriptor("video file (source video) or image folder (source folder)")).value
            device = declare("device", "0", _descriptor("camera index or /dev/videoN (source device)", True)).value
            rate_hz = declare("rate_hz", 10.0, _descriptor("publishing rate in Hz", True)).value
            width = declare("width", 640, _descriptor("frame width; 0 with height 0: native size")).value
            height = declare("height", 480, _descriptor("frame height; 0 with width 0: native size")).value
            encoding = declare("encoding", "rgb8", _descriptor("sensor_msgs/Image encoding")).value
            frame_id = declare("frame_id", "camera", _descriptor("header.frame_id of every frame")).value
            compressed = declare("compressed", False, _descriptor("publish image/compressed instead")).value
            fmt = declare("compressed_format", "jpeg", _descriptor("jpeg | png")).value
            quality = declare("jpeg_quality", 90, _descriptor("JPEG quality 1..100")).value
            loop = declare("loop", True, _descriptor("restart a video or folder at its end")).value
            seed = declare("seed", 0, _descriptor("synthetic scene sequence seed")).value
            period = declare("scene_period_s", 0.0, _descriptor("seconds per synthetic scene; 0: every frame",
                                                                 True)).value
            layout = declare("scene_layout", "grid", _descriptor("grid | random placement of synthetic objects")).value
            grid = declare("scene_grid", [4, 3], _descriptor("[columns, rows] of the grid layout")).value
            reliability = declare("qos_reliability", "reliable", _descriptor("reliable | best_effort")).value
            depth = declare("qos_depth", 1, _descriptor("keep-last depth of the image topic")).value
        except ParameterException as exc:  # e.g. width:=320.0 for an integer parameter
            raise ImageSourceError(f"invalid parameter: {exc}") from exc

        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ImageSourceError(f"parameter {name} must be a number, got {value!r}")
            return float(value)

        rate_hz, period = number("rate_hz", rate_hz), number("scene_period_s", period)
        if source not in SOURCES:
            raise ImageSourceError(f"parameter source must be one of {', '.join(SOURCES)}, got {source!r}")
        if rate_hz <= 0:
            raise ImageSourceError(f"parameter rate_hz must be > 0, got {rate_hz:g}")
        if width < 0 or height < 0:
            raise ImageSourceError(f"width and height must be >= 0, got {width}x{height}")
        if source == "synthetic" and (width <= 0 or height <= 0):
            raise ImageSourceError(f"synthetic frames need width and height > 0, got {width}x{height}")
        if period < 0:
            raise ImageSourceError(f"parameter scene_period_s must be >= 0, got {period:g}")
        if layout not in ("grid", "random"):
            raise ImageSourceError(f"parameter scene_layout must be grid or random, got {layout!r}")
        grid = tuple(grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ImageSourceError(f"parameter scene_grid must be [columns, rows] >= 1, got {list(grid)}")
        if reliability not in RELIABILITIES:
            raise ImageSourceError(f"parameter qos_reliability must be reliable or best_effort, got {reliability!r}")
        if depth < 1:
            raise ImageSourceError(f"parameter qos_depth must be >= 1, got {depth}")
        if not 1 <= quality <= 100:
            raise ImageSourceError(f"parameter jpeg_quality must be in 1..100, got {quality}")
        try:
            encoding = encoding_info(encoding).name
            fmt = normalize_compressed_format(fmt)
        except ImageConversionError as exc:
            raise ImageSourceError(str(exc)) from exc
        if encoding_info(encoding).kind == "yuv422" and width % 2:
            raise ImageSourceError(f"encoding {encoding} needs an even width, got {width}")
        if compressed and encoding != "rgb8":
            self.get_logger().warning(f"compressed: true publishes {fmt} colour images; encoding {encoding} is unused")
        return Settings(source, path, str(device), rate_hz, width, height, encoding, frame_id, bool(compressed),
                        fmt, quality, bool(loop), seed, period, layout, (int(grid[0]), int(grid[1])), reliability,
                        depth)

    def _open_source(self, s: Settings):
        if s.source == "synthetic":
            return SyntheticSource(s.width, s.height, s.seed, s.scene_period_s, layout=s.scene_layout,
                                   grid=s.scene_grid)
        if s.source == "video":
            return VideoSource(s.path, s.loop)
        if s.source == "folder":
            return FolderSource(s.path, s.loop, warn=self.get_logger().warning)
        return DeviceSource(s.device, s.width, s.height, lambda: self.get_clock().now().nanoseconds)

    def _create_publishers(self, s: Settings) -> None:
        reliability = ReliabilityPolicy.RELIABLE if s.qos_reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=s.qos_depth, reliability=reliability,
                         durability=DurabilityPolicy.VOLATILE)
        overrides = QoSOverridingOptions.with_default_policies()
        if s.compressed:
            self._image_pub = self.create_publisher(CompressedImage, "image/compressed", qos,
                                                    qos_overriding_options=overrides)
        else:
            self._image_pub = self.create_publisher(Image, "image", qos, qos_overriding_options=overrides)
        # Ground truth is small and a listener pairs it with frames by stamp: reliable, a
        # few deep, so none is lost even when the images go best effort.
        self._truth_pub = (self.create_publisher(String, "ground_truth", QoSProfile(depth=10))
                           if s.source == "synthetic" else None)

    # -- running --------------------------------------------------------------------------

    def _tick(self) -> None:
        try:
            frame = self._source.next()
        except EndOfSource as end:
            self.get_logger().info(f"{end}: published {self._published} frames; stopping (loop:=true restarts)")
            self._stop_timer()
            return
        except ImageSourceError as exc:
            self._fail(str(exc))
            return
        if frame is None:  # camera: nothing new since the last tick
            return
        try:
            msg = self._message(frame)
        except ImageConversionError as exc:
            self.get_logger().error(f"cannot encode frame: {exc}", throttle_duration_sec=5.0)
            return
        stamp_ns = frame.stamp_ns if frame.stamp_ns is not None else self.get_clock().now().nanoseconds
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = self._settings.frame_id
        if self._truth_pub is not None and frame.ground_truth is not None:
            # Published first, so a listener holding the image can already look it up.
            truth = {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
                     "frame_id": msg.header.frame_id, "encoding": self._encoding_label(), **frame.ground_truth}
            self._truth_pub.publish(String(data=json.dumps(truth)))
        self._image_pub.publish(msg)
        self._published += 1
        if self._published == 1:
            self.get_logger().info("first frame published")

    def _encoding_label(self) -> str:
        s = self._settings
        return s.compressed_format if s.compressed else s.encoding

    def _message(self, frame: Frame) -> Image | CompressedImage:
        """The frame's message without header; encoded once per `key` (repeated scenes)."""
        if frame.key is not None and frame.key == self._cache_key:
            return self._cache_msg
        s = self._settings
        rgb = resize_rgb(frame.rgb, s.width, s.height) if frame.resize else frame.rgb
        if s.compressed:
            msg = rgb_to_compressed_msg(rgb, s.compressed_format, s.jpeg_quality)
        else:
            msg = rgb_to_image_msg(rgb, s.encoding)
        self._cache_key, self._cache_msg = frame.key, msg
        return msg

    def _fail(self, message: str) -> None:
        self.get_logger().error(message)
        self._stop_timer()
        if not self.fatal.done():
            self.fatal.set_result(message)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _close_source(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def destroy_node(self) -> None:
        """Release the camera or video before the node goes."""
        self._close_source()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the node until Ctrl-C (exit 0) or a fatal error (logged, exit 1)."""
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = ImageSource()
        except ImageSourceError as exc:
            rclpy.logging.get_logger("image_source").error(str(exc))
            return 1
        rclpy.spin_until_future_complete(node, node.fatal)
        return 1 if node.fatal.done() else 0
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
