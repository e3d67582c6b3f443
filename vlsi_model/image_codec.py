"""Pixels of ROS image messages <-> numpy RGB arrays, without ROS and without cv_bridge.

One decoder for every place that reads camera frames: the ROS node (live messages), the
bag reader (`rosbags` messages read from rosbag2 / MCAP / ROS 1 bags) and the data tools.
The functions take any object with the `sensor_msgs/Image` or `sensor_msgs/CompressedImage`
field names, so they need no ROS types; `vlsi_ros.image_conversion` builds the messages.

Why not cv_bridge: the PyPI `cv-bridge` is a 2020 ROS 1 copy that breaks with numpy 2
and OpenCV 5, and on a robot the apt one pins OpenCV versions that fight with the ML
stack. Everything here is plain numpy (OpenCV only for Bayer demosaicing, YUV 4:2:2
and compressed images), so it works the same on a laptop venv and on a Jetson.

The model side wants one thing: an H x W x 3 uint8 RGB array. Decoding is on the hot
path of every request, so for the common encodings the result is a *view* of the
message's buffer (no copy): `rgb8` is a plain view, `bgr8` a reversed-channel view,
`rgba8`/`bgra8` channel-slice views, `mono8` a broadcast view (channel stride 0), and
the 16-bit encodings views of the high byte of each value; all of them respect row
padding (`step`). Views are returned read-only so that a consumer cannot silently
modify the message it came from; pass `copy=True` for an owned, C-contiguous, writable
array (made with OpenCV, several times faster than `np.array(view)` for reordered
channels). Bayer and YUV 4:2:2 always produce a new array.

Size bound: every decoder refuses images above `max_pixels` before touching a pixel; a
compressed image's dimensions are read from its header first (Pillow parses only the
header), so a 1 MB PNG of 16384 x 16384 pixels never becomes a 768 MB array.

Malformed input never raises anything but `ImageConversionError` (a `ValueError`), with
a message that says what was wrong, so a caller can report it and carry on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

try:  # OpenCV is only needed for Bayer/YUV and compressed images.
    import cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is missing
    cv2 = None

__all__ = [
    "COMPRESSED_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ENCODABLE_ENCODINGS",
    "SUPPORTED_ENCODINGS",
    "EncodedImage",
    "ImageConversionError",
    "check_pixel_count",
    "compressed_dimensions",
    "decode_compressed",
    "decode_image",
    "decode_image_message",
    "encode_compressed",
    "encode_image",
    "encoding_info",
    "normalize_compressed_format",
]

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image decoded by default (16.8 MP; a 4K frame is 8.3 MP). 0 disables the bound."""


class ImageConversionError(ValueError):
    """An image message that cannot be turned into RGB (or an array that cannot be encoded).

    A ValueError subclass so that generic input validation (`except ValueError`) also
    catches it; the message always names the offending field.
    """


@dataclass(frozen=True)
class EncodingInfo:
    """Memory layout of one ROS image encoding.

    `channels` and `bytes_per_channel` give the bytes per pixel that `step` is checked
    against; `kind` selects the decoder.
    """

    name: str
    channels: int
    bytes_per_channel: int
    kind: str  # "rgb", "bgr", "rgba", "bgra", "mono", "bayer", "yuv422"
    cv_code: str = ""  # OpenCV colour-conversion constant name, for bayer/yuv

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.bytes_per_channel


def _info_table() -> dict[str, EncodingInfo]:
    infos = [
        EncodingInfo("rgb8", 3, 1, "rgb"),
        EncodingInfo("bgr8", 3, 1, "bgr"),
        EncodingInfo("rgba8", 4, 1, "rgba"),
        EncodingInfo("bgra8", 4, 1, "bgra"),
        EncodingInfo("rgb16", 3, 2, "rgb"),
        EncodingInfo("bgr16", 3, 2, "bgr"),
        EncodingInfo("rgba16", 4, 2, "rgba"),
        EncodingInfo("bgra16", 4, 2, "bgra"),
        EncodingInfo("mono8", 1, 1, "mono"),
        EncodingInfo("mono16", 1, 2, "mono"),
        # OpenCV-style type names: cv_bridge treats 8UC3 as bgr8 and 8UC4 as bgra8.
        EncodingInfo("8UC1", 1, 1, "mono"),
        EncodingInfo("8UC3", 3, 1, "bgr"),
        EncodingInfo("8UC4", 4, 1, "bgra"),
        EncodingInfo("16UC1", 1, 2, "mono"),
        # ROS names the pattern by its first two rows; OpenCV's legacy names by the
        # second row, second/third pixel (so ROS rggb == OpenCV BayerBG). These legacy
        # constants mean the same in OpenCV 3, 4 and 5; test_image_conversion checks it.
        EncodingInfo("bayer_rggb8", 1, 1, "bayer", "COLOR_BayerBG2RGB"),
        EncodingInfo("bayer_bggr8", 1, 1, "bayer", "COLOR_BayerRG2RGB"),
        EncodingInfo("bayer_gbrg8", 1, 1, "bayer", "COLOR_BayerGR2RGB"),
        EncodingInfo("bayer_grbg8", 1, 1, "bayer", "COLOR_BayerGB2RGB"),
        EncodingInfo("bayer_rggb16", 1, 2, "bayer", "COLOR_BayerBG2RGB"),
        EncodingInfo("bayer_bggr16", 1, 2, "bayer", "COLOR_BayerRG2RGB"),
        EncodingInfo("bayer_gbrg16", 1, 2, "bayer", "COLOR_BayerGR2RGB"),
        EncodingInfo("bayer_grbg16", 1, 2, "bayer", "COLOR_BayerGB2RGB"),
        # sensor_msgs: "yuv422" is UYVY byte order (as "uyvy"), "yuv422_yuy2" is YUYV.
        EncodingInfo("yuv422", 2, 1, "yuv422", "COLOR_YUV2RGB_UYVY"),
        EncodingInfo("uyvy", 2, 1, "yuv422", "COLOR_YUV2RGB_UYVY"),
        EncodingInfo("yuv422_yuy2", 2, 1, "yuv422", "COLOR_YUV2RGB_YUYV"),
        EncodingInfo("yuyv", 2, 1, "yuv422", "COLOR_YUV2RGB_YUYV"),
    ]
    return {info.name: info for info in infos}


_INFOS = _info_table()
# Encoding strings are case-sensitive in ROS, but "RGB8" or "8uc3" are common typos
# from other stacks that are unambiguous, so lookups are case-insensitive.
_INFOS_LOWER = {name.lower(): info for name, info in _INFOS.items()}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_INFOS)
"""Every `sensor_msgs/Image.encoding` that `decode_image` decodes."""

ENCODABLE_ENCODINGS: tuple[str, ...] = SUPPORTED_ENCODINGS
"""Every encoding `encode_image` can produce (the same set, so each one round-trips)."""

COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")
"""Formats `encode_compressed` writes (`decode_compressed` reads anything OpenCV can)."""


def encoding_info(encoding: str) -> EncodingInfo:
    """Layout of `encoding`, or ImageConversionError listing what is supported."""
    info = _INFOS_LOWER.get(str(encoding).strip().lower())
    if info is None:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    return info


def _require_cv2(what: str):
    if cv2 is None:
        raise ImageConversionError(f"{what} needs OpenCV (pip install opencv-python-headless)")
    return cv2


def _buffer_of(data) -> np.ndarray:
    """A flat uint8 view of a message's `data` field, copying only if it has no buffer.

    rclpy delivers `uint8[]` as array.array('B') (received messages) or whatever the
    user assigned (bytes, bytearray, memoryview, numpy); all of those export the buffer
    protocol and are wrapped without a copy. A plain list is the one slow case.
    """
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ImageConversionError(f"image data of type {type(data).__name__} is not bytes") from exc


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Refuse images above `max_pixels` (0: no bound) before any pixel is touched."""
    if max_pixels > 0 and width * height > max_pixels:
        raise ImageConversionError(
            f"image of {width}x{height} = {width * height:,} pixels is larger than the limit of "
            f"{max_pixels:,} pixels (max_image_pixels)"
        )


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def decode_image(msg, *, copy: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a `sensor_msgs/Image` into an H x W x 3 uint8 RGB array.

    `msg` is anything with the message's fields (`encoding`, `height`, `width`, `step`,
    `is_bigendian`, `data`): an rclpy message, a `rosbags` message read from a bag, or a
    plain namespace.

    rgb/bgr/rgba/bgra/mono encodings (8 and 16 bit) return a read-only view of
    `msg.data` (no copy, row padding honoured); 16-bit values are scaled to 8 bit by
    keeping their high byte (so v*257 maps back to exactly v), honouring `is_bigendian`.
    Bayer and YUV 4:2:2 are converted with OpenCV. `copy=True` always returns a new
    C-contiguous writable array.

    Raises ImageConversionError for an unsupported encoding (the message lists the
    supported ones), zero width or height, a `step` smaller than one row, data shorter
    than `step * height`, an odd width for YUV 4:2:2, or more than `max_pixels` pixels.
    """
    info = encoding_info(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if width <= 0 or height <= 0:
        raise ImageConversionError(f"image has zero size ({width}x{height}, encoding {msg.encoding!r})")
    check_pixel_count(width, height, max_pixels)
    row_bytes = width * info.bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            f"image step {step} is smaller than one row of {width} px x {info.bytes_per_pixel} bytes "
            f"= {row_bytes} ({info.name})"
        )
    buf = _buffer_of(msg.data)
    need = step * height
    if buf.size < need:
        raise ImageConversionError(
            f"image data is truncated: {buf.size} bytes for {width}x{height} {info.name} with step "
            f"{step} (needs step*height = {need})"
        )
    if info.kind == "yuv422" and width % 2:
        raise ImageConversionError(f"{info.name} needs an even width, got {width}")

    bpc = info.bytes_per_channel
    # One strided uint8 view over the whole image: rows `step` bytes apart (padding is
    # skipped), and for 16-bit data only the high byte of each value (offset 0 when
    # big-endian, 1 when little-endian), which is the 16 -> 8 bit scaling at no cost.
    pixels = np.ndarray(
        shape=(height, width, info.channels),
        dtype=np.uint8,
        buffer=buf,
        offset=(0 if msg.is_bigendian else 1) if bpc == 2 else 0,
        strides=(step, info.bytes_per_pixel, bpc),
    )
    if copy:
        return _owned_rgb(pixels, info)
    rgb = _view_rgb(pixels, info)
    return _readonly(rgb) if np.may_share_memory(rgb, buf) else rgb


# OpenCV conversions to RGB for the layouts numpy can only view, used when a copy is due
# anyway: a numpy copy of a reversed-channel or broadcast view is ~10x slower.
_CV_TO_RGB = {"bgr": "COLOR_BGR2RGB", "rgba": "COLOR_RGBA2RGB", "bgra": "COLOR_BGRA2RGB", "mono": "COLOR_GRAY2RGB"}


def _cv_input(pixels: np.ndarray) -> np.ndarray:
    """`pixels` in a layout OpenCV accepts: channels (and 2-D pixels) adjacent within a row.

    Row padding is fine for OpenCV; 16-bit high-byte views (stride 2) need a compact copy.
    """
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
        return pixels if pixels.strides[1] == 1 else np.ascontiguousarray(pixels)
    compact = pixels.strides[2] == 1 and pixels.strides[1] == pixels.shape[2]
    return pixels if compact else np.ascontiguousarray(pixels)


def _view_rgb(pixels: np.ndarray, info: EncodingInfo) -> np.ndarray:
    """Map H x W x C uint8 pixels in `info`'s channel order to RGB, as a view where possible."""
    kind = info.kind
    if kind == "rgb":
        return pixels
    if kind == "bgr":
        return pixels[:, :, ::-1]
    if kind == "rgba":
        return pixels[:, :, :3]
    if kind == "bgra":
        return pixels[:, :, 2::-1]
    if kind == "mono":
        return np.broadcast_to(pixels, (pixels.shape[0], pixels.shape[1], 3))
    cv = _require_cv2(f"decoding {info.name}")
    return cv.cvtColor(_cv_input(pixels), getattr(cv, info.cv_code))


def _owned_rgb(pixels: np.ndarray, info: EncodingInfo) -> np.ndarray:
    """Like _view_rgb, but always a new C-contiguous writable array."""
    if info.kind == "rgb":
        return np.array(pixels, dtype=np.uint8, order="C")
    code = info.cv_code or _CV_TO_RGB[info.kind]
    if cv2 is None:
        if info.cv_code:
            _require_cv2(f"decoding {info.name}")
        return np.array(_view_rgb(pixels, info), dtype=np.uint8, order="C")
    return cv2.cvtColor(_cv_input(pixels), getattr(cv2, code))


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Validate an input frame: H x W x 3 uint8 (H x W grey is accepted and expanded)."""
    if not isinstance(rgb, np.ndarray):
        raise ImageConversionError(f"expected a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ImageConversionError(f"expected a uint8 image, got dtype {rgb.dtype}")
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageConversionError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageConversionError(f"image has zero size ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma; exact for grey input (R == G == B), which the tests rely on."""
    if cv2 is not None:
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(rgb.astype(np.float32) @ weights), 0, 255).astype(np.uint8)


def _bayer_mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image through a Bayer colour filter (`pattern` like "rggb")."""
    channel = {"r": 0, "g": 1, "b": 2}
    out = np.empty(rgb.shape[:2], dtype=rgb.dtype)
    for (dy, dx), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern, strict=True):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[colour]]
    return out


def _encode_pixels(rgb: np.ndarray, info: EncodingInfo) -> np.ndarray:
    """H x W x 3 RGB -> the pixel array (uint8 or native uint16) of `info`'s encoding."""
    kind = info.kind
    if kind == "rgb":
        out = rgb
    elif kind in ("bgr", "rgba", "bgra") and cv2 is not None:
        code = {"bgr": cv2.COLOR_RGB2BGR, "rgba": cv2.COLOR_RGB2RGBA, "bgra": cv2.COLOR_RGB2BGRA}[kind]
        out = cv2.cvtColor(np.ascontiguousarray(rgb), code)  # alpha 255; ~10x a numpy reorder
    elif kind == "bgr":
        out = rgb[:, :, ::-1]
    elif kind in ("rgba", "bgra"):
        colour = rgb if kind == "rgba" else rgb[:, :, ::-1]
        alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
        out = np.concatenate([colour, alpha], axis=2)
    elif kind == "mono":
        out = _grey(rgb)
    elif kind == "bayer":
        out = _bayer_mosaic(rgb, info.name.split("_")[1][:4])
    elif kind == "yuv422":
        if rgb.shape[1] % 2:
            raise ImageConversionError(f"{info.name} needs an even width, got {rgb.shape[1]}")
        cv = _require_cv2(f"encoding {info.name}")
        name = "COLOR_RGB2YUV_UYVY" if info.cv_code.endswith("UYVY") else "COLOR_RGB2YUV_YUYV"
        if not hasattr(cv, name):
            raise ImageConversionError(f"this OpenCV ({cv.__version__}) cannot encode {info.name}")
        out = cv.cvtColor(np.ascontiguousarray(rgb), getattr(cv, name))
    else:  # pragma: no cover - the table has no other kinds
        raise ImageConversionError(f"cannot encode {info.name}")
    if info.bytes_per_channel == 2:
        out = out.astype(np.uint16) * np.uint16(257)  # 0..255 -> 0..65535, exact inverse of >> 8
    return out


@dataclass(frozen=True)
class EncodedImage:
    """The pixel fields of a `sensor_msgs/Image` holding an encoded RGB array (rows unpadded)."""

    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: np.ndarray  # flat uint8


def encode_image(rgb: np.ndarray, encoding: str = "rgb8", *, is_bigendian: bool = False) -> EncodedImage:
    """Encode an H x W x 3 uint8 RGB array as the pixel fields of a `sensor_msgs/Image`.

    Any of ENCODABLE_ENCODINGS: alpha is 255, mono is BT.601 luma (exact for grey
    pixels), 16-bit values are v*257 so that decoding returns v, Bayer is the mosaic of
    the RGB image, YUV 4:2:2 uses OpenCV. Rows are unpadded (`step = width * bpp`).
    """
    rgb = _check_rgb(rgb)
    info = encoding_info(encoding)
    pixels = _encode_pixels(rgb, info)
    if info.bytes_per_channel == 2:
        pixels = pixels.astype(">u2" if is_bigendian else "<u2", copy=False)
    width = int(rgb.shape[1])
    return EncodedImage(
        height=int(rgb.shape[0]), width=width, encoding=info.name,
        is_bigendian=int(bool(is_bigendian and info.bytes_per_channel == 2)),
        step=width * info.bytes_per_pixel,
        data=np.ascontiguousarray(pixels).reshape(-1).view(np.uint8))


_IMWRITE: dict[str, tuple[str, Callable[[int], list[int]]]] = {
    # PNG ignores `quality`: it is lossless; a low zlib level keeps encoding fast.
    "jpeg": (".jpg", lambda q: [cv2.IMWRITE_JPEG_QUALITY, int(q)]),
    "png": (".png", lambda q: [cv2.IMWRITE_PNG_COMPRESSION, 1]),
}


def normalize_compressed_format(fmt: str) -> str:
    """Canonical name of a compressed format ("jpg" -> "jpeg"), or ImageConversionError."""
    name = str(fmt).strip().lower()
    name = {"jpg": "jpeg"}.get(name, name)
    if name not in COMPRESSED_FORMATS:
        raise ImageConversionError(
            f"unsupported compressed format {fmt!r}; supported: {', '.join(COMPRESSED_FORMATS)}"
        )
    return name


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> tuple[str, np.ndarray]:
    """(format field, flat uint8 data) of a `sensor_msgs/CompressedImage` holding `rgb`.

    The format string follows compressed_image_transport ("rgb8; jpeg compressed bgr8"), so
    image_transport republishers and rqt decode it back to rgb8 as well.
    """
    rgb = _check_rgb(rgb)
    name = normalize_compressed_format(fmt)
    cv = _require_cv2("compressing images")
    if not 1 <= int(quality) <= 100:
        raise ImageConversionError(f"jpeg quality must be in 1..100, got {quality}")
    ext, params = _IMWRITE[name]
    ok, encoded = cv.imencode(ext, cv.cvtColor(np.ascontiguousarray(rgb), cv.COLOR_RGB2BGR), params(quality))
    if not ok:  # pragma: no cover - OpenCV fails only on impossible inputs
        raise ImageConversionError(f"OpenCV could not encode a {rgb.shape} image as {name}")
    return f"rgb8; {name} compressed bgr8", encoded.reshape(-1)


def compressed_dimensions(data) -> tuple[int, int, str]:
    """(width, height, format name) from a compressed image's header, without decoding it.

    Pillow parses only the header on open; data it cannot identify is refused, so no image
    of unknown size ever reaches a decoder.
    """
    from PIL import Image as PILImage

    buf = _buffer_of(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the caller's bound decides
            with PILImage.open(io.BytesIO(buf)) as image:
                width, height = image.size
                name = str(image.format or "unknown").lower()
    except PILImage.DecompressionBombError as exc:  # Pillow's own bound (179 MP) also holds with max_pixels 0
        raise ImageConversionError(f"compressed image is larger than the limit: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for garbage; all mean "not an image"
        raise ImageConversionError(
            f"compressed image of {buf.size} bytes could not be decoded: no image header found ({type(exc).__name__})"
        ) from exc
    return int(width), int(height), name


def decode_compressed(msg, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a `sensor_msgs/CompressedImage` (JPEG, PNG, any format whose header Pillow
    reads and OpenCV decodes) to RGB; `msg` is anything with `format` and `data` fields.

    Returns a new C-contiguous H x W x 3 uint8 array (grey images are expanded, alpha is
    dropped). Raises ImageConversionError for empty or undecodable data, for images above
    `max_pixels` (checked on the header, before decoding) and for compressedDepth images,
    which hold depth, not a picture.
    """
    fmt = str(msg.format)
    if "compresseddepth" in fmt.replace(" ", "").lower():
        raise ImageConversionError(f"compressed depth images are not supported (format {fmt!r})")
    buf = _buffer_of(msg.data)
    if buf.size == 0:
        raise ImageConversionError(f"compressed image is empty (format {fmt!r})")
    width, height, _ = compressed_dimensions(buf)
    check_pixel_count(width, height, max_pixels)
    cv = _require_cv2("decoding compressed images")
    try:
        bgr = cv.imdecode(buf, cv.IMREAD_COLOR)
    except cv.error as exc:
        bgr = None
        detail = f": {str(exc).strip().splitlines()[-1]}"
    else:
        detail = ""
    if bgr is None or bgr.size == 0:
        raise ImageConversionError(
            f"compressed image of {buf.size} bytes (format {fmt!r}) could not be decoded{detail}"
        )
    return cv.cvtColor(bgr, cv.COLOR_BGR2RGB)


def decode_image_message(msg, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Owned RGB of an Image or a CompressedImage message, told apart by their fields.

    For readers that meet both kinds (a bag with raw and compressed image topics)."""
    if hasattr(msg, "encoding"):
        return decode_image(msg, copy=True, max_pixels=max_pixels)
    if hasattr(msg, "format"):
        return decode_compressed(msg, max_pixels=max_pixels)
    raise ImageConversionError(f"{type(msg).__name__} is neither a sensor_msgs/Image nor a CompressedImage")
