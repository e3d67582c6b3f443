"""QoS profiles chosen by parameters, and matching a camera's publishers.

Two layers, both standard in ROS 2: a preset parameter (`image_qos`: auto, sensor_data,
reliable, best_effort) with a depth, and rclpy's QoS overrides (`qos_overrides./image.
subscription.reliability:=...` in the YAML) applied on top, as in ros2/demos
quality_of_service_demo.

Why `auto` is the default: a reliable subscription receives nothing from a best-effort
publisher (most camera drivers publish with the sensor-data profile), and a best-effort
subscription to a reliable publisher (the bundled image_source, many drivers' defaults)
loses large frames over Fast DDS's default UDP transport (4-5 of 10 Hz at 640x480, measured).
`auto` asks the graph what the topic's publishers offer, as `ros2 bag record` does, and
follows them when they come and go.

Large images over best-effort Fast DDS need `FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA` in the
environment (both ends); without it most 640x480 frames are lost in UDP fragmentation.
"""

from __future__ import annotations

from collections.abc import Iterable

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.qos_overriding_options import QoSOverridingOptions

IMAGE_QOS_PRESETS = ("sensor_data", "reliable", "best_effort")
AUTO = "auto"


def image_qos(preset: str, depth: int) -> QoSProfile:
    """Keep-last QoS for camera frames; a depth of 1 is right for 'newest frame only'."""
    if preset not in IMAGE_QOS_PRESETS:
        raise ValueError(f"image_qos must be one of {', '.join(IMAGE_QOS_PRESETS)}, not '{preset}'")
    reliability = ReliabilityPolicy.RELIABLE if preset == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, depth),
                      reliability=reliability, durability=DurabilityPolicy.VOLATILE)


def preset_matching_publishers(publisher_reliabilities: Iterable[ReliabilityPolicy]) -> str:
    """The preset an `auto` subscription uses for publishers offering these reliabilities.

    Reliable when there are publishers and every one is reliable (no frame lost to UDP
    fragmentation); best effort otherwise, which is compatible with every publisher, and
    while there is none yet (the subscription is remade when one appears)."""
    found = list(publisher_reliabilities)
    if found and all(r == ReliabilityPolicy.RELIABLE for r in found):
        return "reliable"
    return "best_effort"


def request_qos(depth: int) -> QoSProfile:
    """QoS of the ask service and the ask_stream action's services.

    The rmw default keeps 10 requests: a burst beyond that, taken one per executor turn, was
    overwritten in the middleware and never answered (175-190 of 200 lost). A deep history
    lets every request reach the node, which then answers or refuses each one."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, depth),
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def overridable() -> QoSOverridingOptions:
    """Let users override history/depth/reliability/durability per topic from parameters."""
    return QoSOverridingOptions.with_default_policies()
