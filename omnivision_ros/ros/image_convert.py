"""sensor_msgs Image / CompressedImage -> uint8 array [H, W, 3] (RGB or BGR), with strict validation.

The one adapter between ROS image messages and the model. Works on the message's fields only
(no rclpy), so it is the same for real ROS 2 installs and the PyPI wheels. Raw images go
through ROS 2 `cv_bridge` when it is installed (a ROS 2 distribution), else through the NumPy
code below; compressed images are decoded with OpenCV. Every malformed message raises
OmniVisionError naming the problem.
"""
from __future__ import annotations

import functools
import struct

import cv2
import numpy as np

from omnivision_ros.errors import OmniVisionError

DEFAULT_MAX_PIXELS = 4096 * 4096

# encoding -> (channels, bytes per channel); aliases of the generic OpenCV encodings included.
RAW_ENCODINGS = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "8UC1": (1, 1),
    "8UC3": (3, 1),  # treated as bgr8, as cv_bridge does
    "mono16": (1, 2),
    "16UC1": (1, 2),
}
# Converted by cv_bridge when available (its generic 8UC*/16UC* types do not convert to bgr8, and
# its mono16 -> bgr8 scales the whole 0..65535 range, which leaves a depth image in millimetres black).
BRIDGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")


# Raw encodings kept in RGB order by to_pixels (the model wants RGB: no RGB -> BGR -> RGB round trip).
RGB_ENCODINGS = ("rgb8", "rgba8")


def _is_compressed(msg) -> bool:
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def color_order(msg) -> str:
    """Channel order of `to_pixels(msg)`: "rgb" for rgb8/rgba8 images, else "bgr"."""
    return "rgb" if not _is_compressed(msg) and str(msg.encoding) in RGB_ENCODINGS else "bgr"


def to_pixels(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A sensor_msgs/Image or CompressedImage as uint8 [H, W, 3] in `color_order(msg)`, with as
    few copies as the encoding allows (a bgr8 or rgb8 image without row padding is a view of
    the message's data)."""
    if _is_compressed(msg):
        return compressed_to_bgr(msg, max_pixels)
    return _raw_to_pixels(msg, max_pixels)


def to_bgr(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A sensor_msgs/Image or sensor_msgs/CompressedImage as a BGR uint8 array [H, W, 3]."""
    pixels = to_pixels(msg, max_pixels)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if color_order(msg) == "rgb" else pixels


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise OmniVisionError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise OmniVisionError(
            f"image is too large: {width}x{height} = {width * height} pixels, more than max_image_pixels "
            f"({max_pixels}); lower the camera resolution or raise max_image_pixels")


def _raw_to_pixels(msg, max_pixels: int) -> np.ndarray:
    """A raw sensor_msgs/Image as uint8 [H, W, 3] in color_order(msg). mono16 is scaled min..max -> 0..255."""
    width, height, step, encoding = int(msg.width), int(msg.height), int(msg.step), str(msg.encoding)
    check_size(width, height, max_pixels)
    if encoding not in RAW_ENCODINGS:
        raise OmniVisionError(
            f"unsupported image encoding '{encoding}'; supported: {', '.join(RAW_ENCODINGS)} "
            "(or send a CompressedImage)")
    channels, depth = RAW_ENCODINGS[encoding]
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise OmniVisionError(
            f"image step {step} is smaller than width x bytes per pixel = {width} x {channels * depth} = {row_bytes}")
    data = msg.data
    size = len(data)
    if size < step * height:
        raise OmniVisionError(
            f"image data has {size} bytes, less than step x height = {step} x {height} = {step * height}")
    bridge = _ros2_cv_bridge()
    if bridge is not None and encoding in BRIDGE_ENCODINGS:
        wanted = "rgb8" if encoding in RGB_ENCODINGS else "bgr8"
        try:
            return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding=wanted))
        except Exception as exc:  # CvBridgeError and whatever OpenCV raises inside it
            raise OmniVisionError(f"cannot convert the {encoding} image: {exc}") from exc

    buf = np.frombuffer(_as_bytes(data), dtype=np.uint8, count=step * height).reshape(height, step)
    rows = buf[:, :row_bytes]
    if depth == 2:
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        mono = np.ascontiguousarray(rows).view(dtype).reshape(height, width).astype(np.float32)
        low, high = float(mono.min()), float(mono.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((mono - low) * scale + 0.5).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    pixels = rows.reshape(height, width, channels)
    if encoding in ("bgr8", "8UC3", "rgb8"):
        return np.ascontiguousarray(pixels)
    if encoding == "rgba8":
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGBA2RGB)
    if encoding == "bgra8":
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0]), cv2.COLOR_GRAY2BGR)  # mono8, 8UC1


def compressed_to_bgr(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A sensor_msgs/CompressedImage (jpeg, png, ...) as BGR uint8 [H, W, 3]."""
    data = _as_bytes(msg.data)
    fmt = str(msg.format) or "unknown format"
    if not data:
        raise OmniVisionError(f"compressed image ({fmt}) has no data")
    # Check the size the header announces before decoding, so a small file cannot make the
    # decoder allocate an absurd image.
    size = _announced_size(data)
    if size is not None:
        check_size(size[0], size[1], max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise OmniVisionError(f"cannot decode the compressed image ({fmt}, {len(data)} bytes): {exc}") from exc
    if image is None:
        raise OmniVisionError(
            f"cannot decode the compressed image ({fmt}, {len(data)} bytes): not a valid JPEG/PNG/... file")
    check_size(image.shape[1], image.shape[0], max_pixels)
    return image


def _as_bytes(data) -> bytes | memoryview:
    # rclpy gives uint8[] fields as array.array('B') (or bytes / a list when built by hand);
    # a memoryview of the array avoids copying a whole frame.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    try:
        return memoryview(data).cast("B")
    except TypeError:
        return bytes(data)


def _announced_size(data) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, None for other formats or unreadable headers."""
    head = bytes(data[:24])
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head.startswith(b"\xff\xd8"):
        pos, end = 2, min(len(data), 1 << 20)
        while pos + 9 <= end:
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            length = (data[pos + 2] << 8) | data[pos + 3]
            # SOF0..SOF15 carry the frame size (C4, C8, CC are other segments).
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", bytes(data[pos + 5:pos + 9]))
                return width, height
            pos += 2 + length
    return None


@functools.lru_cache(maxsize=1)
def _ros2_cv_bridge():
    """ROS 2's cv_bridge when this is a ROS 2 install, else None. The PyPI `cv-bridge` is a ROS 1
    port that fails on ROS 2 messages: only a cv_bridge registered in the ament index is used."""
    try:
        from ament_index_python.packages import get_package_prefix

        get_package_prefix("cv_bridge")  # raises when cv_bridge is not a ROS 2 package here
        from cv_bridge import CvBridge
    except Exception:  # not installed, not registered, no ament index (AMENT_PREFIX_PATH unset)
        return None
    return CvBridge()
