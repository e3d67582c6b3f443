"""QoS profiles chosen by parameters.

Two layers, both standard in ROS 2: a preset parameter (`image_qos`: sensor_data, reliable,
best_effort) with a depth, and rclpy's QoS overrides (`qos_overrides./image.subscription.
reliability:=...` in the YAML) applied on top, as in ros2/demos quality_of_service_demo.

Large images over best-effort Fast DDS need `FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA` in the
environment (both ends); without it most 640x480 frames are lost in UDP fragmentation.
"""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.qos_overriding_options import QoSOverridingOptions

IMAGE_QOS_PRESETS = ("sensor_data", "reliable", "best_effort")


def image_qos(preset: str, depth: int) -> QoSProfile:
    """Keep-last QoS for camera frames; a depth of 1 is right for 'newest frame only'."""
    if preset not in IMAGE_QOS_PRESETS:
        raise ValueError(f"image_qos must be one of {', '.join(IMAGE_QOS_PRESETS)}, not '{preset}'")
    reliability = ReliabilityPolicy.RELIABLE if preset == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, depth),
                      reliability=reliability, durability=DurabilityPolicy.VOLATILE)


def overridable() -> QoSOverridingOptions:
    """Let users override history/depth/reliability/durability per topic from parameters."""
    return QoSOverridingOptions.with_default_policies()
