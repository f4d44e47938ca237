"""Camera image -> SigLIP pixel values: RGB, bicubic resize to 384x384 (aspect not kept), /255, mean=std=0.5.

As the model was trained: the Hugging Face SiglipImageProcessor resizes with Pillow's bicubic
filter, which is antialiased when it shrinks (its support widens with the scale). OpenCV's
INTER_CUBIC is not, and samples another grid: on 1920x1080 frames it is several uint8 levels off
on average. So the resize is Pillow's, for camera frames and files alike.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import OmniVisionConfig

COLOR_ORDERS = ("bgr", "rgb")


def to_rgb(image: np.ndarray, color_order: str = "bgr") -> np.ndarray:
    """Any uint8 image (HxW gray, HxWx1, HxWx3, HxWx4) in BGR(A) or RGB(A) order -> HxWx3 RGB uint8."""
    if color_order not in COLOR_ORDERS:
        raise OmniVisionError(f"unknown color order '{color_order}', expected one of {COLOR_ORDERS}")
    if not isinstance(image, np.ndarray):
        raise OmniVisionError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise OmniVisionError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise OmniVisionError(f"unsupported image shape {image.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise OmniVisionError(f"image is empty: shape {image.shape}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB if color_order == "bgr" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    if color_order == "bgr":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def preprocess(image: np.ndarray, config: OmniVisionConfig, color_order: str = "bgr") -> np.ndarray:
    """Return float32 pixel values [3, S, S] (S = vit_image_size) in [-1, 1]."""
    rgb = resize(to_rgb(image, color_order), config.vit_image_size)
    pixels = rgb.astype(np.float32) * (1.0 / 255.0)
    mean = np.asarray(config.vit_image_mean, dtype=np.float32)
    std = np.asarray(config.vit_image_std, dtype=np.float32)
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [3, S, S]


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 with Pillow's bicubic filter (Pillow returns an image of
    the target size unchanged, so that case is skipped here)."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))


def preprocess_batch(images: list[np.ndarray], config: OmniVisionConfig, color_order: str = "bgr") -> np.ndarray:
    """[B, 3, S, S] float32 for several images (one per camera)."""
    return np.stack([preprocess(img, config, color_order) for img in images])


def load_image(path: str) -> np.ndarray:
    """Read an image file as BGR uint8, upright: the EXIF orientation of a phone or camera photo is
    applied (as its owner sees it, and as transformers' load_image does). Clear errors when the file is
    missing or not an image."""
    import os

    if not os.path.isfile(path):
        raise OmniVisionError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OmniVisionError(f"cannot decode image file {path}: not a readable image (jpg/png/bmp/...): {exc}") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])
