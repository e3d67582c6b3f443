"""Camera frames from rosbag2 (sqlite3, MCAP) and ROS 1 bags, without a ROS install.

Reading is the `rosbags` library's (pure Python, well kept; its AnyReader opens ROS 1 and
ROS 2 bags alike and deserialises with the bag's own message definitions, falling back to the
Humble type store for old rosbag2 files that carry none). This module adds what the data tools
and the bag replay need on top: which topics hold images, frames streamed one at a time with
their bag time, header stamp and frame_id, pixels decoded lazily by the one decoder the node
uses (`image_codec`), and errors that say what is wrong with a bag instead of a traceback.

`write_image_bag` writes such bags (tests, benchmarks, and users who want a bag from a folder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlsi_model.image_codec import decode_image_message

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
BAG_FORMATS = ("mcap", "sqlite3", "ros1")


class BagError(ValueError):
    """A bag that cannot be read as asked: missing, corrupt or truncated, or without the topic."""


@dataclass(frozen=True)
class BagFrame:
    """One image message of a bag. `msg` is the deserialised message; `rgb()` decodes it."""

    index: int  # position among the topic's messages (0-based)
    topic: str
    msgtype: str
    bag_time_ns: int  # when the recorder received it
    stamp_ns: int  # header.stamp (0 when the publisher left it unset)
    frame_id: str
    msg: Any

    def rgb(self, max_pixels: int | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB pixels (owned); ImageConversionError for an undecodable frame."""
        return decode_image_message(self.msg) if max_pixels is None else \
            decode_image_message(self.msg, max_pixels=max_pixels)


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def _bag_paths(path: str | Path) -> list[Path]:
    """AnyReader's paths: a rosbag2 directory (or its metadata.yaml / .mcap / .db3 file's folder),
    or one ROS 1 .bag file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BagError(f"bag not found: {p}")
    if p.is_file() and p.suffix in (".mcap", ".db3", ".yaml"):
        p = p.parent
    return [p]


class BagReader:
    """An open bag: `image_topics()` and `frames(topic)`; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        from rosbags.highlevel import AnyReader

        self.path = Path(path).expanduser()
        try:
            self._reader = AnyReader(_bag_paths(path), default_typestore=_typestore())
            self._reader.open()
        except BagError:
            raise
        except Exception as exc:  # rosbags raises several types for unreadable bags
            hint = ""
            if self.path.suffix == ".mcap" or any(self.path.glob("*.mcap")):
                hint = (" (an MCAP file cut off by a crash: `mcap recover` rewrites what is intact; a bare .mcap "
                        "without metadata.yaml: `ros2 bag reindex` writes one)")
            raise BagError(f"cannot open bag {self.path}: {type(exc).__name__}: {exc}{hint}") from exc

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    def image_topics(self) -> dict[str, tuple[str, int]]:
        """topic -> (message type, message count) for every Image / CompressedImage topic."""
        return {name: (info.msgtype, info.msgcount) for name, info in self._reader.topics.items()
                if info.msgtype in IMAGE_TYPES}

    def resolve_topic(self, topic: str | None) -> str:
        """`topic`, checked to be an image topic of the bag; None or "" picks the only one."""
        topics = self.image_topics()
        if not topic:
            if len(topics) != 1:
                raise BagError(f"{self.path} has {len(topics)} image topics ({', '.join(sorted(topics)) or 'none'}); "
                               "name the one to read")
            return next(iter(topics))
        if topic not in topics:
            all_topics = {name: info.msgtype for name, info in self._reader.topics.items()}
            if topic in all_topics:
                raise BagError(f"topic {topic} in {self.path} holds {all_topics[topic]}, not an image "
                               f"(image topics: {', '.join(sorted(topics)) or 'none'})")
            raise BagError(f"no topic {topic} in {self.path} (image topics: {', '.join(sorted(topics)) or 'none'})")
        return topic

    @property
    def duration_s(self) -> float:
        return self._reader.duration * 1e-9

    def frames(self, topic: str | None = None) -> Iterator[BagFrame]:
        """The image messages of `topic` in bag-time order, deserialised one at a time.

        An unknown topic raises BagError here, at the call; a message that cannot be deserialised,
        or a bag that ends mid-record, raises BagError naming the message index while iterating
        (the caller decides whether what came before is usable)."""
        return self._frames(self.resolve_topic(topic))

    def _frames(self, topic: str) -> Iterator[BagFrame]:
        connections = [c for c in self._reader.connections if c.topic == topic]
        index = -1
        try:
            for connection, bag_time, raw in self._reader.messages(connections=connections):
                index += 1
                try:
                    msg = self._reader.deserialize(raw, connection.msgtype)
                except Exception as exc:
                    raise BagError(f"{self.path}: message {index} on {topic} cannot be deserialised "
                                   f"({type(exc).__name__}: {exc})") from exc
                header = msg.header
                stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
                yield BagFrame(index, topic, connection.msgtype, int(bag_time), stamp, str(header.frame_id), msg)
        except BagError:
            raise
        except Exception as exc:  # truncated or corrupt storage surfaces while iterating
            raise BagError(f"{self.path}: the bag is corrupt or truncated after {index + 1} messages on {topic} "
                           f"({type(exc).__name__}: {exc})") from exc


def write_image_bag(path: str | Path, frames: Iterable[tuple[int, np.ndarray]], topic: str = "/camera/image_raw",
                    fmt: str = "mcap", compressed: bool = False, frame_id: str = "camera",
                    encoding: str = "rgb8") -> Path:
    """Write `(time_ns, rgb)` frames as a bag of sensor_msgs Image (or CompressedImage JPEG).

    `fmt`: mcap or sqlite3 (rosbag2) or ros1 (a .bag file). Stamps equal the bag times."""
    from vlsi_model.image_codec import encode_compressed, encode_image

    if fmt not in BAG_FORMATS:
        raise ValueError(f"bag format must be one of {', '.join(BAG_FORMATS)}, got {fmt!r}")
    store = _typestore()
    Image = store.types["sensor_msgs/msg/Image"]
    CompressedImage = store.types["sensor_msgs/msg/CompressedImage"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    path = Path(path)

    def message(time_ns: int, rgb: np.ndarray) -> Any:
        header = Header(stamp=Time(sec=time_ns // 1_000_000_000, nanosec=time_ns % 1_000_000_000),
                        frame_id=frame_id)
        if compressed:
            fmt_field, data = encode_compressed(rgb, "jpeg", 90)
            return CompressedImage(header=header, format=fmt_field, data=np.asarray(data, dtype=np.uint8))
        e = encode_image(rgb, encoding)
        return Image(header=header, height=e.height, width=e.width, encoding=e.encoding,
                     is_bigendian=e.is_bigendian, step=e.step, data=np.asarray(e.data, dtype=np.uint8))

    if fmt == "ros1":
        from rosbags.rosbag1 import Writer as Writer1
        from rosbags.typesys import Stores, get_typestore

        ros1 = get_typestore(Stores.ROS1_NOETIC)
        ros1_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        with Writer1(path) as writer:
            conn = writer.add_connection(topic, ros1_type, typestore=ros1)
            for time_ns, rgb in frames:
                msg = message(time_ns, rgb)
                ros1_msg = _to_ros1(ros1, msg, compressed)
                writer.write(conn, time_ns, ros1.serialize_ros1(ros1_msg, ros1_type))
        return path

    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=store)
        for time_ns, rgb in frames:
            writer.write(conn, time_ns, store.serialize_cdr(message(time_ns, rgb), msgtype))
    return path


def _to_ros1(store: Any, msg: Any, compressed: bool) -> Any:
    """The ROS 1 form of a ROS 2 image message (ROS 1 headers have a seq and a Time of secs/nsecs)."""
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    header = Header(seq=0, stamp=Time(sec=msg.header.stamp.sec, nanosec=msg.header.stamp.nanosec),
                    frame_id=msg.header.frame_id)
    if compressed:
        return store.types["sensor_msgs/msg/CompressedImage"](header=header, format=msg.format, data=msg.data)
    return store.types["sensor_msgs/msg/Image"](header=header, height=msg.height, width=msg.width,
                                                 encoding=msg.encoding, is_bigendian=msg.is_bigendian,
                                                 step=msg.step, data=msg.data)
