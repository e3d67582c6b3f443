"""Tests of vlsi_ros.image_conversion: every encoding round-trips, views are zero-copy,
malformed messages fail with ImageConversionError, and large frames convert fast.

No DDS here: messages that look exactly like received ones come from rclpy's own
serialize/deserialize, so these tests run in well under a second and need no ROS_DOMAIN_ID.
"""

from __future__ import annotations

import array
import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the ROS 2 Python packages (scripts/setup_env.sh)")
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from vlsi_ros.image_conversion import (  # noqa: E402
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_msg_to_rgb,
    encoding_info,
    image_msg_to_rgb,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)

H, W = 37, 50  # odd height, even width (YUV 4:2:2 needs even widths): catches stride bugs

COLOUR_EXACT = ("rgb8", "bgr8", "rgba8", "bgra8", "8UC3", "8UC4", "rgb16", "bgr16", "rgba16", "bgra16")
GREY_EXACT = ("mono8", "8UC1", "mono16", "16UC1")
BAYER = tuple(e for e in SUPPORTED_ENCODINGS if e.startswith("bayer_"))
YUV = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
VIEW_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "8UC4",
                  "rgb16", "bgra16", "mono16", "16UC1")


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture
def grey() -> np.ndarray:
    g = np.random.default_rng(2).integers(0, 256, size=(H, W), dtype=np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def received(msg: Image) -> Image:
    """The message as a subscriber gets it (data as array.array from the C conversion)."""
    return deserialize_message(serialize_message(msg), Image)


def with_padding(msg: Image, extra: int, fill: int = 0xAB) -> Image:
    """Same image with `extra` garbage bytes at the end of every row."""
    rows = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)
    padded = np.full((msg.height, msg.step + extra), fill, np.uint8)
    padded[:, : msg.step] = rows
    out = Image(header=msg.header, height=msg.height, width=msg.width, encoding=msg.encoding,
                is_bigendian=msg.is_bigendian, step=msg.step + extra)
    out.data = array.array("B", padded.tobytes())
    return out


def test_supported_encodings_cover_the_required_ones() -> None:
    for name in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "8UC1", "8UC3", "16UC1",
                 "bayer_rggb8", "yuv422", "yuv422_yuy2", "uyvy"):
        assert name in SUPPORTED_ENCODINGS
    assert isinstance(SUPPORTED_ENCODINGS, tuple)
    # Every supported encoding is exercised by one of the round-trip tests below.
    assert sorted(COLOUR_EXACT + GREY_EXACT + BAYER + YUV) == sorted(SUPPORTED_ENCODINGS)


@pytest.mark.parametrize("encoding", COLOUR_EXACT)
def test_colour_encodings_round_trip_exactly(rgb: np.ndarray, encoding: str) -> None:
    msg = received(rgb_to_image_msg(rgb, encoding))
    assert (msg.height, msg.width, msg.encoding) == (H, W, encoding)
    assert msg.step == W * encoding_info(encoding).bytes_per_pixel
    out = image_msg_to_rgb(msg)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", GREY_EXACT)
def test_grey_encodings_round_trip_exactly(grey: np.ndarray, encoding: str) -> None:
    out = image_msg_to_rgb(received(rgb_to_image_msg(grey, encoding)))
    np.testing.assert_array_equal(out, grey)


def test_mono8_is_luma_of_colour(rgb: np.ndarray) -> None:
    out = image_msg_to_rgb(rgb_to_image_msg(rgb, "mono8"))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[:, :, 0].astype(np.float64) - luma).max() <= 1.0
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


def test_mono16_scaling() -> None:
    # Encoding spreads 0..255 over 0..65535 (v * 257); decoding keeps the high byte.
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    msg = rgb_to_image_msg(np.repeat(ramp[:, :, None], 3, axis=2), "mono16")
    raw = np.frombuffer(msg.data, "<u2").reshape(16, 16)
    np.testing.assert_array_equal(raw, ramp.astype(np.uint16) * 257)
    values = np.array([[0, 255, 256, 0x1234], [0x7FFF, 0x8000, 0xFF00, 0xFFFF]], dtype="<u2")
    msg = Image(height=2, width=4, encoding="16UC1", step=8, is_bigendian=0)
    msg.data = array.array("B", values.tobytes())
    out = image_msg_to_rgb(msg)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 0, 1, 0x12], [0x7F, 0x80, 0xFF, 0xFF]])


def test_big_endian_mono16(grey: np.ndarray) -> None:
    msg = rgb_to_image_msg(grey, "mono16", is_bigendian=True)
    assert msg.is_bigendian == 1
    raw = np.frombuffer(msg.data, ">u2").reshape(H, W)
    np.testing.assert_array_equal(raw, grey[:, :, 0].astype(np.uint16) * 257)
    np.testing.assert_array_equal(image_msg_to_rgb(received(msg)), grey)
    # v * 257 has equal bytes; with distinct bytes the flag decides which one is kept.
    values = np.array([[0x1234, 0xAB01]], dtype=">u2")
    msg = Image(height=1, width=2, encoding="mono16", step=4, is_bigendian=1)
    msg.data = array.array("B", values.tobytes())
    np.testing.assert_array_equal(image_msg_to_rgb(msg)[:, :, 0], [[0x12, 0xAB]])
    msg.is_bigendian = 0
    np.testing.assert_array_equal(image_msg_to_rgb(msg)[:, :, 0], [[0x34, 0x01]])


def test_big_endian_rgb16_with_padding(rgb: np.ndarray) -> None:
    msg = with_padding(rgb_to_image_msg(rgb, "rgb16", is_bigendian=True), extra=6)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_demosaics_to_the_right_colours(encoding: str) -> None:
    # A flat colour survives demosaicing exactly if and only if the pattern is mapped right
    # (a wrong mapping swaps red and blue or mixes green in).
    flat = np.empty((H + 1, W, 3), np.uint8)  # even height: a whole number of 2x2 tiles
    flat[:] = (200, 100, 30)
    out = image_msg_to_rgb(received(rgb_to_image_msg(flat, encoding)))
    np.testing.assert_array_equal(out, flat)


@pytest.mark.parametrize("encoding", BAYER[:1] + BAYER[4:5])
def test_bayer_smooth_image_is_close(encoding: str) -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([xx * 4, yy * 4, 255 - (xx + yy) * 2], axis=2).astype(np.uint8)
    out = image_msg_to_rgb(rgb_to_image_msg(smooth, encoding))
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(out[inner].astype(int) - smooth[inner]).max() <= 8


@pytest.mark.parametrize("encoding", YUV)
def test_yuv422_round_trip_is_close(encoding: str) -> None:
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = np.stack([xx * 5, yy * 6, 255 - xx * 3], axis=2).astype(np.uint8)
    msg = received(rgb_to_image_msg(smooth, encoding))
    assert msg.step == 2 * W
    out = image_msg_to_rgb(msg)
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3.0
    assert np.abs(out.astype(int) - smooth).max() <= 12


def test_yuv422_is_uyvy_and_yuv422_yuy2_is_yuyv() -> None:
    # sensor_msgs: yuv422 has UYVY byte order, yuv422_yuy2 YUYV; for pure grey U = V = 128.
    # (OpenCV's 4:2:2 conversions use video range, Y = 16 + 219/255 * grey.)
    grey = np.full((2, 4, 3), 30, np.uint8)
    uyvy = np.frombuffer(rgb_to_image_msg(grey, "yuv422").data, np.uint8)
    yuyv = np.frombuffer(rgb_to_image_msg(grey, "yuv422_yuy2").data, np.uint8)
    assert (uyvy[0::2] == 128).all() and (yuyv[1::2] == 128).all()
    assert 35 <= uyvy[1] <= 48 and (uyvy[1::2] == uyvy[1]).all() and (yuyv[0::2] == uyvy[1]).all()


@pytest.mark.parametrize("encoding", VIEW_ENCODINGS)
def test_decoding_is_zero_copy_and_read_only(rgb: np.ndarray, encoding: str) -> None:
    msg = received(rgb_to_image_msg(rgb, encoding))
    assert isinstance(msg.data, array.array)
    buf = np.frombuffer(msg.data, np.uint8)
    out = image_msg_to_rgb(msg)
    assert np.shares_memory(out, buf), f"{encoding} decoding copied the pixels"
    if encoding_info(encoding).kind != "mono":
        np.testing.assert_array_equal(out, rgb)
    assert not out.flags.writeable  # a view must not let callers edit the message
    owned = image_msg_to_rgb(msg, copy=True)
    assert owned.flags.writeable and owned.flags.c_contiguous and not np.shares_memory(owned, buf)
    np.testing.assert_array_equal(owned, out)


def test_rgb8_is_a_plain_view(rgb: np.ndarray) -> None:
    msg = received(rgb_to_image_msg(rgb, "rgb8"))
    out = image_msg_to_rgb(msg)
    assert out.flags.c_contiguous
    assert out.__array_interface__["data"][0] == np.frombuffer(msg.data, np.uint8).__array_interface__["data"][0]
    # The view follows the buffer: changing the message's bytes changes the array.
    msg.data[0] = (int(msg.data[0]) + 1) % 256
    assert out[0, 0, 0] == msg.data[0]


@pytest.mark.parametrize("encoding", ("rgb8", "bgr8", "bgra8", "mono8", "mono16", "bayer_gbrg8", "uyvy"))
def test_row_padding_is_skipped(rgb: np.ndarray, grey: np.ndarray, encoding: str) -> None:
    image = grey if encoding.startswith("mono") else rgb
    plain = rgb_to_image_msg(image, encoding)
    padded = with_padding(plain, extra=13 if encoding.endswith("8") else 14)
    assert padded.step > plain.step
    np.testing.assert_array_equal(image_msg_to_rgb(padded), image_msg_to_rgb(plain))
    if encoding in ("rgb8", "bgr8", "bgra8", "mono8"):
        assert np.shares_memory(image_msg_to_rgb(padded), np.frombuffer(padded.data, np.uint8))


def test_data_as_bytes_list_and_longer_than_needed(rgb: np.ndarray) -> None:
    msg = rgb_to_image_msg(rgb, "bgr8")
    as_bytes = Image(height=H, width=W, encoding="bgr8", step=W * 3)
    as_bytes._data = bytes(msg.data) + b"\x00" * 5  # what a user-built message may hold
    np.testing.assert_array_equal(image_msg_to_rgb(as_bytes), rgb)
    as_list = Image(height=2, width=1, encoding="rgb8", step=3)
    as_list._data = [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(image_msg_to_rgb(as_list), [[[1, 2, 3]], [[4, 5, 6]]])


def test_encoding_names_are_case_insensitive(rgb: np.ndarray) -> None:
    msg = rgb_to_image_msg(rgb, "BGR8")
    assert msg.encoding == "bgr8"
    msg.encoding = "BGR8"
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_header_is_copied(rgb: np.ndarray) -> None:
    header = Header(frame_id="cam_left")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = rgb_to_image_msg(rgb, header=header)
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == ("cam_left", 12, 345)


# ---- malformed input ----------------------------------------------------------------

def make_msg(**fields) -> Image:
    base = {"height": 4, "width": 5, "encoding": "rgb8", "step": 15}
    base.update(fields)
    data = base.pop("data", bytes(base["step"] * base["height"]))
    msg = Image(**base)
    msg.data = array.array("B", data)
    return msg


def test_unsupported_encoding_lists_the_supported_ones() -> None:
    with pytest.raises(ImageConversionError, match=r"unsupported image encoding '32FC1'.*rgb8.*mono16"):
        image_msg_to_rgb(make_msg(encoding="32FC1"))
    with pytest.raises(ImageConversionError, match="unsupported image encoding ''"):
        image_msg_to_rgb(make_msg(encoding=""))
    with pytest.raises(ValueError):  # a ValueError, so generic validation catches it too
        rgb_to_image_msg(np.zeros((2, 2, 3), np.uint8), "hsv8")


@pytest.mark.parametrize("fields", [{"width": 0, "step": 0}, {"height": 0}])
def test_zero_size_is_rejected(fields: dict) -> None:
    with pytest.raises(ImageConversionError, match="zero size"):
        image_msg_to_rgb(make_msg(**fields))


def test_step_smaller_than_a_row_is_rejected() -> None:
    with pytest.raises(ImageConversionError, match="step 14 is smaller than one row"):
        image_msg_to_rgb(make_msg(step=14))
    with pytest.raises(ImageConversionError, match="smaller than one row"):
        image_msg_to_rgb(make_msg(encoding="mono16", step=5))


def test_truncated_data_is_rejected() -> None:
    with pytest.raises(ImageConversionError, match=r"truncated: 59 bytes .*needs step\*height = 60"):
        image_msg_to_rgb(make_msg(data=bytes(59)))
    with pytest.raises(ImageConversionError, match="truncated: 0 bytes"):
        image_msg_to_rgb(make_msg(data=b""))


def test_odd_width_yuv_is_rejected() -> None:
    with pytest.raises(ImageConversionError, match="even width"):
        image_msg_to_rgb(make_msg(encoding="uyvy", width=5, step=10))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8), [[1, 2, 3]]])
def test_bad_arrays_are_rejected(bad) -> None:
    with pytest.raises(ImageConversionError):
        rgb_to_image_msg(bad)
    with pytest.raises(ImageConversionError):
        rgb_to_compressed_msg(bad)


def test_grey_2d_array_is_accepted() -> None:
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(image_msg_to_rgb(rgb_to_image_msg(g))[:, :, 1], g)


# ---- compressed ---------------------------------------------------------------------

def test_compressed_png_is_exact(rgb: np.ndarray) -> None:
    msg = rgb_to_compressed_msg(rgb, "png", header=Header(frame_id="cam"))
    assert msg.format == "rgb8; png compressed bgr8" and msg.header.frame_id == "cam"
    assert bytes(msg.data[:4]) == b"\x89PNG"
    msg = deserialize_message(serialize_message(msg), CompressedImage)
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)


def test_compressed_jpeg_is_close() -> None:
    yy, xx = np.mgrid[0:120, 0:160]
    smooth = np.stack([xx, yy * 2, 255 - xx], axis=2).astype(np.uint8)
    msg = rgb_to_compressed_msg(smooth, "jpg", quality=90)
    assert msg.format == "rgb8; jpeg compressed bgr8" and bytes(msg.data[:2]) == b"\xff\xd8"
    out = compressed_msg_to_rgb(msg)
    assert out.shape == smooth.shape and out.dtype == np.uint8 and out.flags.writeable
    assert np.abs(out.astype(int) - smooth).mean() < 2.0
    # The channel order is right: red stays red.
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    assert tuple(compressed_msg_to_rgb(rgb_to_compressed_msg(red))[16, 16]) == pytest.approx((220, 0, 0), abs=4)


def test_compressed_grey_png_decodes_to_three_channels() -> None:
    import cv2

    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ok, png = cv2.imencode(".png", grey)
    msg = CompressedImage(format="png")
    msg.data = array.array("B", png.tobytes())
    out = compressed_msg_to_rgb(msg)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[:, :, 2], grey)


def test_compressed_garbage_empty_and_depth_are_rejected() -> None:
    garbage = CompressedImage(format="jpeg")
    garbage.data = array.array("B", b"this is not an image" * 10)
    with pytest.raises(ImageConversionError, match="could not be decoded"):
        compressed_msg_to_rgb(garbage)
    truncated = rgb_to_compressed_msg(np.zeros((64, 64, 3), np.uint8), "png")
    truncated.data = truncated.data[:40]
    with pytest.raises(ImageConversionError, match="could not be decoded"):
        compressed_msg_to_rgb(truncated)
    with pytest.raises(ImageConversionError, match="empty"):
        compressed_msg_to_rgb(CompressedImage(format="jpeg"))
    depth = CompressedImage(format="16UC1; compressedDepth png")
    depth.data = array.array("B", b"\x00" * 20)
    with pytest.raises(ImageConversionError, match="depth"):
        compressed_msg_to_rgb(depth)
    with pytest.raises(ImageConversionError, match="unsupported compressed format 'webp'"):
        rgb_to_compressed_msg(np.zeros((4, 4, 3), np.uint8), "webp")


# ---- speed --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(480, 640), (1080, 1920)])
def test_conversion_is_fast(size: tuple[int, int]) -> None:
    """Guards against per-byte Python work (a 1080p frame would take seconds) and copies
    on the decode path; bounds are loose because the test machine is shared."""
    frame = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    start = time.perf_counter()
    msg = received(rgb_to_image_msg(frame))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        out = image_msg_to_rgb(msg)
    decode_s = (time.perf_counter() - start) / 100
    np.testing.assert_array_equal(out, frame)
    assert encode_s < 0.5
    assert decode_s < 0.002  # a view: microseconds, independent of the frame size
