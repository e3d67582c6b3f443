"""Where `image_source`'s frames come from: synthetic scenes, a video, a folder, a camera, a bag.

Plain Python, no rclpy: each source is a small class with `next() -> Frame` (raising
`EndOfSource` when a finite source ends and does not loop), `describe()` and `close()`, so each
is tested on its own and the node (`image_source.py`) only publishes what they return.
"""

from __future__ import annotations

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

from vlsi_ros.image_conversion import ImageConversionError

SOURCES = ("synthetic", "video", "folder", "device", "bag")


BAG_TIMINGS = ("recorded", "fixed")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")


# A camera that delivers nothing for this long is considered gone (fatal error).
DEVICE_TIMEOUT_S = 5.0


# At most one warning about undecodable bag frames per this many seconds (they are counted).
BAG_WARN_INTERVAL_S = 5.0


class ImageSourceError(RuntimeError):
    """A problem that stops the node: bad parameter, missing file, camera not opening.

    Raised with a message meant for the user; `main` logs it and exits with status 1.
    """


class EndOfSource(Exception):
    """A video, folder or bag has no more frames (and `loop` is false)."""


@dataclass
class Frame:
    """One frame to publish.

    `key` identifies frames whose pixels repeat (a synthetic scene shown for
    `scene_period_s`), so their message is encoded once; `stamp_ns` is the capture time
    when the source knows it (camera), else the node stamps the publish time; `frame_id`
    is the source's own (a bag's recorded one), else the node's parameter is used.
    """

    rgb: np.ndarray
    key: Any = None
    stamp_ns: int | None = None
    ground_truth: dict | None = None
    resize: bool = True
    frame_id: str | None = None


class SyntheticSource:
    """Seeded scenes from vlsi_model.data.scenes, rendered at the published size.

    Scene i of run seed s is the generator's *test* split scene (`scene_seed("test", s, i)`),
    so the synthetic camera never shows a scene the small models were trained on. A scene
    stays for `period_s` (0: one scene per frame) so that questions about "the current
    frame" keep their answers for a while.
    """

    def __init__(self, width: int, height: int, seed: int, period_s: float,
                 clock: Callable[[], float] = time.monotonic, layout: str = "random",
                 grid: tuple[int, int] = (4, 3)) -> None:
        # Imported here so that video/folder/device users don't pay for the ML library.
        from vlsi_model.data import question_families, render, scene_dataset, scenes

        self._scenes, self._questions, self._render, self._truth = scenes, question_families, render, scene_dataset
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
        truth = self._truth.scene_ground_truth(scene, self._questions.make_questions(scene, seed))
        truth["scene_index"] = index
        return Frame(rgb=self._render.render_scene(scene), key=("scene", index), ground_truth=truth, resize=False)

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


class BagSource:
    """One image topic of a bag (rosbag2 sqlite3 / MCAP, or ROS 1), replayed.

    Streamed: messages are read one at a time (bags are GBs), and pixels are decoded only
    for the frames that are published. `timing` "fixed" gives one frame per `next()`;
    "recorded" gives the newest frame whose bag-time offset from the pass's first frame is
    <= the time elapsed since the pass started (frames already past are skipped, not
    decoded), or None when no new frame is due. With `loop` the bag is read again from its
    start (recorded timing restarts its clock, one mean frame interval after the last
    frame), else EndOfSource.

    `tick_s` is the caller's period between calls: recorded timing starts each pass's clock
    half a tick before the call that publishes its first frame, so that frames recorded at
    the tick rate (or a divisor of it) are due half a tick before a call rather than right
    on it, where timer jitter would delay them by a tick or skip them.

    Frames carry no stamp (the node stamps the publish time, as for a live camera: the
    recorded stamps would be refused as stale by vqa_node's max_frame_age_s) and keep the
    recorded frame_id when the message has one.

    Errors: a missing, unreadable or corrupt bag, or no usable topic, is an
    ImageSourceError here; an undecodable frame is skipped with a throttled `warn` (and
    counted); a bag found truncated or corrupt while reading ends the pass there (logged
    with `warn`) as if the bag ended; a pass in which no frame could be decoded is an
    ImageSourceError.
    """

    def __init__(self, path: str, topic: str = "", timing: str = "recorded", loop: bool = True,
                 warn: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 tick_s: float = 0.0) -> None:
        if not path:
            raise ImageSourceError("source 'bag' needs the parameter path (a rosbag2 directory, the .mcap or .db3 "
                                   "in one, or a ROS 1 .bag file)")
        if timing not in BAG_TIMINGS:
            raise ImageSourceError(f"parameter bag_timing must be one of {', '.join(BAG_TIMINGS)}, got {timing!r}")
        try:  # imported here: rosbags is needed only to replay bags
            from vlsi_model.data.bags import BagError, BagReader
        except ImportError as exc:
            raise ImageSourceError(f"source 'bag' needs the Python package rosbags (requirements/ml.txt): {exc}") \
                from exc
        self._bag_error = BagError
        self._timing, self._loop, self._warn, self._clock = timing, loop, warn, clock
        self._lead_s = max(0.0, tick_s) / 2
        try:
            self._reader = BagReader(path)
        except BagError as exc:
            raise ImageSourceError(str(exc)) from exc
        try:
            self._open(topic)
        except BaseException:
            self._reader.close()
            raise
        # Undecodable frames: in all, in this pass, and when the last warning went out.
        self._bad = self._pass_bad = self._pass_ok = 0
        self._last_error = ""
        self._last_warn: float | None = None
        # Recorded timing: the pass's wall-clock start (None: starts at the next call), its
        # first frame's bag time, and the wall time the next pass may start.
        self._start: float | None = None
        self._t0_ns = 0
        self._pass_end = 0.0
        self._late = 0  # frames skipped because they were already past when a tick came

    def _open(self, topic: str) -> None:
        BagError = self._bag_error
        path = self._reader.path
        topics = self._reader.image_topics()
        if not topic:
            if len(topics) != 1:
                listing = ", ".join(f"{name} ({msgtype.rsplit('/', 1)[-1]}, {count} messages)"
                                    for name, (msgtype, count) in sorted(topics.items())) or "none"
                raise ImageSourceError(f"bag {path} has {len(topics)} image topics ({listing}); "
                                       "choose one with the parameter topic")
            topic = next(iter(topics))
        try:
            self._topic = self._reader.resolve_topic(topic)
        except BagError as exc:
            raise ImageSourceError(str(exc)) from exc
        self._msgtype, self._count = topics[self._topic]
        if self._count == 0:
            raise ImageSourceError(f"topic {self._topic} of bag {path} has no messages")
        self._truncated = self._truncated_warned = ""
        self._frames = self._reader.frames(self._topic)
        try:  # the first message now, so that a bag unreadable from its start fails at start-up
            self._pending = next(self._frames)
        except BagError as exc:
            raise ImageSourceError(str(exc)) from exc
        except StopIteration:
            raise ImageSourceError(f"topic {self._topic} of bag {path} has no readable messages") from None

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def recorded_rate_hz(self) -> float:
        """About the recording's frame rate (from the bag's duration, all topics); 0 if unknown."""
        duration = self._reader.duration_s
        return (self._count - 1) / duration if self._count > 1 and duration > 0 else 0.0

    def describe(self) -> str:
        return (f"bag {self._reader.path} topic {self._topic} ({self._count} frames, {self._reader.duration_s:.1f} s, "
                f"{self._timing} timing{', looping' if self._loop else ''})")

    def _read(self):
        """The next BagFrame (deserialised, not decoded), or None at the end of the bag or
        where it turns out truncated or corrupt (logged; the pass ends there)."""
        try:
            return next(self._frames, None)
        except self._bag_error as exc:
            if str(exc) != self._truncated_warned:  # once, not on every pass of a looping replay
                self._truncated_warned = str(exc)
                self._warn(f"{exc}; ending this pass of the bag there")
            self._truncated = str(exc)
            return None

    def _decode(self, bag_frame) -> Frame | None:
        try:
            rgb = bag_frame.rgb()
        except (ImageConversionError, ValueError, cv2.error) as exc:
            self._bad += 1
            self._pass_bad += 1
            self._last_error = f"frame {bag_frame.index}: {exc}"
            now = self._clock()
            if self._last_warn is None or now - self._last_warn >= BAG_WARN_INTERVAL_S:
                self._last_warn = now
                self._warn(f"skipping undecodable frame {bag_frame.index} of {self._topic} in bag "
                           f"{self._reader.path}: {exc} ({self._bad} skipped so far)")
            return None
        self._pass_ok += 1
        return Frame(rgb=rgb, frame_id=bag_frame.frame_id or None)

    def _restart(self) -> None:
        """At the end of a pass: EndOfSource, or read the bag again from its start."""
        path = self._reader.path
        if self._pass_bad and not self._pass_ok:
            raise ImageSourceError(f"no frame of {self._topic} in bag {path} could be decoded "
                                   f"({self._pass_bad} tried; {self._last_error})")
        if not self._loop:
            late = f", frames skipped as late: {self._late}" if self._late else ""
            bad = f", undecodable frames skipped: {self._bad}" if self._bad else ""
            where = "truncated or corrupt bag" if self._truncated else "bag"
            raise EndOfSource(f"end of {where} {path} topic {self._topic}{late}{bad}")
        self._frames.close()
        self._frames = self._reader.frames(self._topic)
        self._truncated = ""
        self._pending = self._read()
        if self._pending is None:
            raise ImageSourceError(f"bag {path} topic {self._topic} has no readable frame any more")
        self._pass_bad = self._pass_ok = 0
        self._start = None

    def next(self) -> Frame | None:
        if self._timing == "fixed":
            while True:  # one frame per call; an undecodable one is skipped
                if self._pending is None:
                    self._restart()
                bag_frame, self._pending = self._pending, self._read()
                frame = self._decode(bag_frame)
                if frame is not None:
                    return frame
        now = self._clock()
        if self._pending is None:
            if self._loop and now + self._lead_s < self._pass_end:
                return None  # the last frame's interval is not over yet
            self._restart()
        if self._start is None:  # a pass begins: its first frame is due now
            self._start, self._t0_ns = now - self._lead_s, self._pending.bag_time_ns
        elapsed_ns = (now - self._start) * 1e9
        due = None
        while self._pending is not None and self._pending.bag_time_ns - self._t0_ns <= elapsed_ns:
            if due is not None:
                self._late += 1
            due, self._pending = self._pending, self._read()
        if due is None:
            return None
        if self._pending is None:  # its last frame: the next pass starts one mean frame interval later
            offset_s = (due.bag_time_ns - self._t0_ns) * 1e-9
            self._pass_end = self._start + offset_s + (offset_s / due.index if due.index > 0 else 0.0)
        return self._decode(due)

    def close(self) -> None:
        self._frames.close()
        self._reader.close()


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
