"""vlsi_model.image_codec without ROS: the decoder the node, the bag reader and the data tools
share. Messages here are plain namespaces with the sensor_msgs field names (what `rosbags`
hands out); the encodings themselves are tested through the ROS wrapper in
test_image_conversion.py."""

from __future__ import annotations

import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from vlsi_model import image_codec
from vlsi_model.image_codec import (
    ImageConversionError,
    compressed_dimensions,
    decode_compressed,
    decode_image,
    decode_image_message,
    encode_compressed,
    encode_image,
)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height RGB pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width) * 8)) + chunk(b"IEND", b""))


def rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plain_field_messages_decode_like_ros_ones():
    pixels = rgb()
    encoded = encode_image(pixels, "bgr8")
    msg = SimpleNamespace(encoding=encoded.encoding, height=encoded.height, width=encoded.width,
                          step=encoded.step, is_bigendian=encoded.is_bigendian, data=encoded.data)
    np.testing.assert_array_equal(decode_image(msg), pixels)
    fmt, data = encode_compressed(pixels, "png")
    np.testing.assert_array_equal(decode_compressed(SimpleNamespace(format=fmt, data=data)), pixels)
    assert decode_image_message(msg).flags.writeable  # owned, for readers that keep frames
    np.testing.assert_array_equal(decode_image_message(SimpleNamespace(format=fmt, data=data)), pixels)
    with pytest.raises(ImageConversionError, match="neither"):
        decode_image_message(SimpleNamespace(pixels=1))


def test_compressed_bombs_are_refused_from_the_header_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder ran on an image the header already ruled out")

    monkeypatch.setattr(image_codec.cv2, "imdecode", no_decoding)
    assert compressed_dimensions(png_claiming(10000, 9000)) == (10000, 9000, "png")
    for side in (16384, 20000):
        with pytest.raises(ImageConversionError, match="larger than the limit"):
            decode_compressed(SimpleNamespace(format="png", data=png_claiming(side, side)))
    with pytest.raises(ImageConversionError, match="larger than the limit"):
        decode_compressed(SimpleNamespace(format="png", data=png_claiming(4000, 3000)), max_pixels=1_000_000)


def test_raw_images_above_the_bound_are_refused_and_zero_means_no_bound():
    pixels = rgb(40, 50)
    encoded = encode_image(pixels, "rgb8")
    msg = SimpleNamespace(**{k: getattr(encoded, k) for k in ("encoding", "height", "width", "step",
                                                               "is_bigendian", "data")})
    with pytest.raises(ImageConversionError, match="2,000 pixels is larger than the limit of 1,999"):
        decode_image(msg, max_pixels=1999)
    np.testing.assert_array_equal(decode_image(msg, max_pixels=0), pixels)
