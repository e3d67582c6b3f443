"""`image_source`: a camera stand-in that publishes `image` (or `image/compressed`).

Why it exists: the VQA node needs frames to answer about, and most people who try the
package have no camera on ROS, and tests need frames whose content is *known*. So the
default source is the project's seeded synthetic scene generator (vlsi_model.data.scenes),
and every synthetic frame's ground truth (objects, exact answers to questions about it)
goes out on `ground_truth` (std_msgs/String, JSON) carrying the frame's stamp and
frame_id, so that an answer can be checked against the frame it describes. The same node
plays a video file, an image folder, a V4L2 camera or a recorded bag (rosbag2 sqlite3 or
MCAP, or ROS 1; read without ROS by vlsi_model.data.bags), so a demo moves to real
pictures, or to a robot's recorded data without the robot, by changing one parameter.

Parameters (all read-only: they are read once at start-up, and a runtime change is
refused rather than silently ignored):
  source            synthetic | video | folder | device | bag        (synthetic)
  path              video file, image folder, or bag: a rosbag2 directory (or the .mcap /
                    .db3 in it) or a ROS 1 .bag file
  topic             bag: the image topic (Image or CompressedImage) to replay; empty: the
                    bag's only image topic (several: an error that lists them)     ("")
  bag_timing        bag: recorded | fixed                            (recorded)
                    recorded: frames at their recorded pace (bag time since the first
                    frame against wall time since the replay started); each tick at
                    rate_hz publishes the newest frame that is due, skipping frames
                    already past (rate_hz below the recording's rate) and publishing
                    nothing when none is new, so set rate_hz at or above the recording's
                    rate to see every frame. fixed: one frame per tick at rate_hz.
  device            camera index or /dev/videoN (int or string)     ("0")
  rate_hz           publishing rate                                 (10.0)
  width, height     frame size; non-synthetic frames are resized when > 0 (640x480;
                    one of them 0 keeps the aspect ratio, both 0 the native size)
  encoding          any vlsi_ros.image_conversion encoding           (rgb8)
  frame_id          header.frame_id; a bag frame keeps its recorded one (camera)
  compressed        publish image/compressed instead of image       (false)
  compressed_format jpeg | png                                      (jpeg)
  jpeg_quality      1..100                                          (90)
  loop              video/folder/bag restart at the end; otherwise stop (true)
  seed              synthetic scene sequence seed                   (0)
  scene_period_s    keep each synthetic scene this long; 0 = new scene every frame (0.0)
  scene_layout      grid | random: synthetic objects one per grid cell, or anywhere (grid)
  scene_grid        [columns, rows] of the grid layout                ([4, 3])
                    At 640x480 a 4x3 grid puts each object on one image token of the
                    default student (frames are resized to 112x84 = 4x3 tokens of 28 px),
                    the layout it was trained on; "random" is harder for small models.
  qos_reliability   reliable | best_effort (image topic)            (reliable)
  qos_depth         keep-last depth (image topic)                   (1)
  wait_for_subscribers  publish nothing until the image topic has this many matched
                    subscribers; then publish as usual, never pausing again (0)
                    Why: a bag or video played once (loop false) to a node started
                    beside it would lose its first frames while discovery runs (seconds
                    on a loaded machine); recorded timing starts with the first frame.
QoS can also be overridden per topic with `qos_overrides./image.publisher.*` parameters,
as in ros2/demos quality_of_service_demo.

Bag frames are stamped with their publish time, like a live camera's, not with their
recorded header stamps: those are minutes or days old, and vqa_node refuses frames older
than max_frame_age_s, so a replay with original stamps would answer nothing. The recorded
frame_id is kept (the parameter frame_id is used for frames recorded without one).

Configuration and device errors (missing file, camera not opening, bad parameter, a bag
that is missing, corrupt or lacks the topic) are logged as one clear line and the process
exits with status 1, not a traceback. A bag frame the decoder cannot read is skipped with
a throttled warning; a bag found truncated or corrupt while replaying is logged and ends
the pass there (restart with loop, else stop, as at the bag's end).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

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

from vlsi_ros.frame_sources import (
    BAG_TIMINGS,
    SOURCES,
    BagSource,
    DeviceSource,
    EndOfSource,
    FolderSource,
    Frame,
    ImageSourceError,
    SyntheticSource,
    VideoSource,
    resize_rgb,
)
from vlsi_ros.image_conversion import (
    ImageConversionError,
    encoding_info,
    normalize_compressed_format,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)

RELIABILITIES = ("reliable", "best_effort")


@dataclass
class Settings:
    """The node's parameters, validated."""

    source: str
    path: str
    topic: str
    bag_timing: str
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
    wait_for_subscribers: int


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
        self._started = False  # wait_for_subscribers met (then never checked again)
        self._cache_key: Any = None
        self._cache_msg: Image | CompressedImage | None = None
        self._timer = self.create_timer(1.0 / s.rate_hz, self._tick)
        size = {(True, True): f"{s.width}x{s.height}", (True, False): f"width {s.width}",
                (False, True): f"height {s.height}", (False, False): "native size"}[(s.width > 0, s.height > 0)]
        fmt = s.compressed_format if s.compressed else s.encoding
        bag = isinstance(self._source, BagSource)
        frame_id = (f"the recorded frame_id (else '{s.frame_id}'), stamped when published" if bag
                    else f"frame_id '{s.frame_id}'")
        self.get_logger().info(
            f"publishing {self._source.describe()} on {self._image_pub.topic_name} ({fmt}, {size}) at "
            f"{s.rate_hz:g} Hz, {frame_id}, "
            f"QoS {s.qos_reliability} depth {s.qos_depth}"
            + (f"; ground truth on {self._truth_pub.topic_name}" if self._truth_pub else ""))
        if bag and s.bag_timing == "recorded" and s.rate_hz < 0.95 * self._source.recorded_rate_hz:
            self.get_logger().info(
                f"rate_hz {s.rate_hz:g} is below the recording's ~{self._source.recorded_rate_hz:.3g} frames/s: "
                "frames in between are skipped (raise rate_hz to publish every frame)")

    # -- set-up ---------------------------------------------------------------------------

    def _read_parameters(self) -> Settings:
        declare = self.declare_parameter
        try:
            source = declare("source", "synthetic", _descriptor("synthetic | video | folder | device | bag")).value
            path = declare("path", "", _descriptor("video file (source video), image folder (source folder), or "
                                                   "bag directory / .mcap / .db3 / ROS 1 .bag (source bag)")).value
            topic = declare("topic", "", _descriptor("source bag: image topic to replay; empty: the bag's only "
                                                     "image topic")).value
            bag_timing = declare("bag_timing", "recorded", _descriptor("source bag: recorded (the recorded pace) "
                                                                       "| fixed (a frame per tick)")).value
            device = declare("device", "0", _descriptor("camera index or /dev/videoN (source device)", True)).value
            rate_hz = declare("rate_hz", 10.0, _descriptor("publishing rate in Hz", True)).value
            width = declare("width", 640, _descriptor("frame width; 0 with height 0: native size")).value
            height = declare("height", 480, _descriptor("frame height; 0 with width 0: native size")).value
            encoding = declare("encoding", "rgb8", _descriptor("sensor_msgs/Image encoding")).value
            frame_id = declare("frame_id", "camera", _descriptor("header.frame_id of every frame")).value
            compressed = declare("compressed", False, _descriptor("publish image/compressed instead")).value
            fmt = declare("compressed_format", "jpeg", _descriptor("jpeg | png")).value
            quality = declare("jpeg_quality", 90, _descriptor("JPEG quality 1..100")).value
            loop = declare("loop", True, _descriptor("restart a video, folder or bag at its end")).value
            seed = declare("seed", 0, _descriptor("synthetic scene sequence seed")).value
            period = declare("scene_period_s", 0.0, _descriptor("seconds per synthetic scene; 0: every frame",
                                                                 True)).value
            layout = declare("scene_layout", "grid", _descriptor("grid | random placement of synthetic objects")).value
            grid = declare("scene_grid", [4, 3], _descriptor("[columns, rows] of the grid layout")).value
            reliability = declare("qos_reliability", "reliable", _descriptor("reliable | best_effort")).value
            depth = declare("qos_depth", 1, _descriptor("keep-last depth of the image topic")).value
            wait_subs = declare("wait_for_subscribers", 0, _descriptor(
                "publish nothing until the image topic has this many matched subscribers")).value
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
        if bag_timing not in BAG_TIMINGS:
            raise ImageSourceError(f"parameter bag_timing must be one of {', '.join(BAG_TIMINGS)}, got {bag_timing!r}")
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
        if wait_subs < 0:
            raise ImageSourceError(f"parameter wait_for_subscribers must be >= 0, got {wait_subs}")
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
        return Settings(source, path, topic, bag_timing, str(device), rate_hz, width, height, encoding, frame_id,
                        bool(compressed), fmt, quality, bool(loop), seed, period, layout,
                        (int(grid[0]), int(grid[1])), reliability, depth, wait_subs)

    def _open_source(self, s: Settings):
        if s.source == "synthetic":
            return SyntheticSource(s.width, s.height, s.seed, s.scene_period_s, layout=s.scene_layout,
                                   grid=s.scene_grid)
        if s.source == "video":
            return VideoSource(s.path, s.loop)
        if s.source == "folder":
            return FolderSource(s.path, s.loop, warn=self.get_logger().warning)
        if s.source == "bag":
            return BagSource(s.path, s.topic, s.bag_timing, s.loop, warn=self.get_logger().warning,
                             tick_s=1.0 / s.rate_hz)
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
        if not self._started:
            if not self._subscribers_ready():
                return
            self._started = True
        try:
            frame = self._source.next()
        except EndOfSource as end:
            self.get_logger().info(f"{end}: published {self._published} frames; stopping (loop:=true restarts)")
            self._stop_timer()
            return
        except ImageSourceError as exc:
            self._fail(str(exc))
            return
        if frame is None:  # camera or recorded bag: nothing new since the last tick
            return
        try:
            msg = self._message(frame)
        except ImageConversionError as exc:
            self.get_logger().error(f"cannot encode frame: {exc}", throttle_duration_sec=5.0)
            return
        stamp_ns = frame.stamp_ns if frame.stamp_ns is not None else self.get_clock().now().nanoseconds
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = frame.frame_id or self._settings.frame_id
        if self._truth_pub is not None and frame.ground_truth is not None:
            # Published first, so a listener holding the image can already look it up.
            truth = {"stamp": {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec},
                     "frame_id": msg.header.frame_id, "encoding": self._encoding_label(), **frame.ground_truth}
            self._truth_pub.publish(String(data=json.dumps(truth)))
        self._image_pub.publish(msg)
        self._published += 1
        if self._published == 1:
            self.get_logger().info("first frame published")

    def _subscribers_ready(self) -> bool:
        """Whether enough subscribers matched to start (wait_for_subscribers); logged once while waiting."""
        wanted = self._settings.wait_for_subscribers
        if self._image_pub.get_subscription_count() >= wanted:
            return True
        self.get_logger().info(f"waiting for {wanted} subscriber(s) on {self._image_pub.topic_name} "
                               "before the first frame (wait_for_subscribers)", once=True)
        return False

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
