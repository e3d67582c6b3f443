"""Newest frame per camera, converted only when a request actually uses it.

Why: cameras publish at 30 Hz while answers take tens to hundreds of milliseconds, so
converting every frame wastes CPU and a backlog answers old frames. The store keeps one
raw frame per camera (the newest) and a converter; a request takes the newest frame at the
moment its inference starts and refuses it when it is older than the allowed age.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


class FrameError(RuntimeError):
    """No usable frame (unknown camera, none received yet, too old, undecodable)."""


# How a refusal for "this camera has not delivered its first frame" starts. It is transient (the
# first frame is on its way right after start-up), so clients may ask again; see AskClient.
NO_FRAME_YET = "no frame received yet"


def check_max_age(max_age_s: float) -> float:
    """A frame-age limit must be a finite number >= 0 (0: no limit): NaN, negative or infinite
    limits would switch the stale-frame check off without anyone noticing."""
    if not isinstance(max_age_s, (int, float)) or not math.isfinite(max_age_s) or max_age_s < 0:
        raise ValueError(f"max_frame_age_s must be a finite number >= 0 (0: no limit), got {max_age_s!r}")
    return float(max_age_s)


@dataclass(frozen=True)
class Frame:
    """One received frame. `stamp_s` is the capture time (seconds, the publisher's clock);
    `received_s` the time it arrived (seconds, the same clock as `now` in `age_s`)."""

    camera: str
    raw: Any
    stamp_s: float
    received_s: float
    frame_id: str
    header: Any = None

    def age_s(self, now_s: float) -> float:
        """Age from the capture stamp, never younger than the time since the frame arrived.

        A frame cannot be newer than its arrival: a stamp in the future (a camera whose clock
        runs ahead) would otherwise keep an old frame "fresh" forever. A zero stamp (the
        publisher left it unset) counts from arrival."""
        reference = min(self.stamp_s, self.received_s) if self.stamp_s > 0 else self.received_s
        return max(0.0, now_s - reference)

    @property
    def stamp_ahead_s(self) -> float:
        """How far the stamp is ahead of the arrival time (> 0: the publisher's clock runs ahead)."""
        return self.stamp_s - self.received_s if self.stamp_s > 0 else 0.0


class FrameStore:
    """Thread-safe newest-frame-per-camera store.

    `convert(raw) -> np.ndarray` turns a stored raw frame into H x W x 3 uint8 RGB and may
    raise (bad encoding, truncated data); the error is reported to the request, never lost.
    """

    def __init__(self, cameras: list[str], convert: Callable[[Any], np.ndarray],
                 clock: Callable[[], float] = time.time) -> None:
        if not cameras:
            raise ValueError("at least one camera name is needed")
        self._cameras = list(cameras)
        self._convert = convert
        self._clock = clock
        self._frames: dict[str, Frame] = {}
        self._lock = threading.Lock()

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def put(self, camera: str, raw: Any, stamp_s: float, frame_id: str = "", header: Any = None) -> None:
        frame = Frame(camera, raw, stamp_s, self._clock(), frame_id, header)
        with self._lock:
            self._frames[camera] = frame

    def latest(self, camera: str) -> Frame | None:
        with self._lock:
            return self._frames.get(camera)

    def stamps_ahead(self) -> dict[str, float | None]:
        """Per camera, how far the newest frame's stamp was ahead of its arrival (clock skew)."""
        with self._lock:
            return {c: (self._frames[c].stamp_ahead_s if c in self._frames else None) for c in self._cameras}

    def ages(self) -> dict[str, float | None]:
        """Age in seconds of the newest frame per camera (None: nothing received yet)."""
        now = self._clock()
        with self._lock:
            return {c: (self._frames[c].age_s(now) if c in self._frames else None) for c in self._cameras}

    def check_camera(self, camera: str) -> None:
        if camera not in self._cameras:
            raise FrameError(f"unknown camera '{camera}' (known: {', '.join(self._cameras)})")

    def take(self, camera: str, max_age_s: float) -> tuple[Frame, np.ndarray]:
        """The newest frame of `camera` and its RGB pixels, or FrameError saying why not."""
        check_max_age(max_age_s)
        self.check_camera(camera)
        frame = self.latest(camera)
        if frame is None:
            raise FrameError(f"{NO_FRAME_YET} on camera '{camera}'")
        age = frame.age_s(self._clock())
        if max_age_s > 0 and age > max_age_s:
            raise FrameError(
                f"newest frame on camera '{camera}' is {age:.2f} s old (max_frame_age_s {max_age_s:.2f})")
        try:
            rgb = self._convert(frame.raw)
        except Exception as exc:  # any converter failure is a bad frame, not a crash
            raise FrameError(f"frame on camera '{camera}' could not be decoded: {exc}") from exc
        return frame, rgb
