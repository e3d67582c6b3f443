"""sensor_msgs Image / CompressedImage <-> numpy RGB: the ROS side of `vlsi_model.image_codec`.

The pixel work (every encoding, row padding, zero-copy views, the decompression-bomb bound)
lives in the ROS-free `vlsi_model.image_codec`, shared with the bag reader and the data
tools; this module only builds and reads rclpy message objects.
"""

from __future__ import annotations

import array

import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from vlsi_model.image_codec import (
    COMPRESSED_FORMATS,
    DEFAULT_MAX_IMAGE_PIXELS,
    ENCODABLE_ENCODINGS,
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    decode_compressed,
    decode_image,
    encode_compressed,
    encode_image,
    encoding_info,
    normalize_compressed_format,
)

__all__ = [
    "COMPRESSED_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ENCODABLE_ENCODINGS",
    "SUPPORTED_ENCODINGS",
    "ImageConversionError",
    "compressed_msg_to_rgb",
    "encoding_info",
    "image_msg_to_rgb",
    "normalize_compressed_format",
    "rgb_to_compressed_msg",
    "rgb_to_image_msg",
]


def image_msg_to_rgb(msg: Image, *, copy: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """H x W x 3 uint8 RGB of a `sensor_msgs/Image` (see `vlsi_model.image_codec.decode_image`)."""
    return decode_image(msg, copy=copy, max_pixels=max_pixels)


def compressed_msg_to_rgb(msg: CompressedImage, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """H x W x 3 uint8 RGB of a `sensor_msgs/CompressedImage`, size checked on its header first."""
    return decode_compressed(msg, max_pixels=max_pixels)


def _new_msg(cls):
    """An empty message whose `data` setter keeps an array.array('B') as is.

    Kilted's generated setters copy every assigned sequence unless the message checks
    its fields (`check_fields=True`), in which case an array.array('B') is stored as is;
    Humble/Jazzy messages always check and have no such argument.
    """
    try:
        return cls(check_fields=True)
    except (AssertionError, TypeError):
        return cls()


def _to_uint8_array(data: np.ndarray) -> array.array:
    """Pack bytes into the array.array('B') rclpy uses for uint8[] fields, in one memcpy.

    Assigning bytes or a list makes older rclpy (Humble, Jazzy) validate every element
    in Python (seconds for a 1080p frame); an array.array('B') is accepted as is.
    """
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return out


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = "rgb8", header=None, *, is_bigendian: bool = False) -> Image:
    """A `sensor_msgs/Image` of `rgb` in `encoding` (see `vlsi_model.image_codec.encode_image`);
    `header` (std_msgs/Header) is copied into the message when given."""
    encoded = encode_image(rgb, encoding, is_bigendian=is_bigendian)
    msg = _new_msg(Image)
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.step = encoded.height, encoded.width, encoded.step
    msg.encoding = encoded.encoding
    msg.is_bigendian = encoded.is_bigendian
    msg.data = _to_uint8_array(encoded.data)
    return msg


def rgb_to_compressed_msg(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, header=None) -> CompressedImage:
    """A `sensor_msgs/CompressedImage` of `rgb` (JPEG or PNG, compressed_image_transport's format string)."""
    fmt_field, data = encode_compressed(rgb, fmt, quality)
    msg = _new_msg(CompressedImage)
    if header is not None:
        msg.header = header
    msg.format = fmt_field
    msg.data = _to_uint8_array(data)
    return msg
