"""Preprocessing time per camera frame against the vision encoder's time, in the same run.

    .venv/bin/python scripts/bench_preprocess.py --model BUNDLE [--precision int8] [--runs 30]

For 640x480 and 1920x1080 BGR frames: the median time of `preprocess` (Pillow bicubic to 384x384,
/255, normalize), of the OpenCV INTER_CUBIC resize it replaced, how far the two resizes are apart
in uint8 levels, and (with --model) the median time of encoding one preprocessed frame on ONNX
Runtime, so the share of preprocessing in encode time is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np
from PIL import Image

from omnivision_ros.model.config import get_preset
from omnivision_ros.model.preprocess import preprocess

SIZES = ((640, 480), (1920, 1080))


def frame(width: int, height: int) -> np.ndarray:
    """A camera-like BGR frame: gradients, a sharp-edged block and sensor noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 127 + 120 * np.sin(x / 9.0) * np.cos(y / 13.0)],
                   axis=2)
    img[height // 3: height // 2, width // 4: width // 2] = (20, 220, 40)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model bundle whose vision encoder is timed (omit: preprocessing only)")
    parser.add_argument("--precision", default=None, help="bundle variant (default: the backend's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    config = get_preset("tiny")  # preprocessing depends only on the image size (384) and mean/std
    backend = None
    if args.model:
        from omnivision_ros.runtime.factory import open_model

        backend, _ = open_model(args.model, "onnxruntime", args.threads, precision=args.precision)
        config = backend.config
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; runs {args.runs} (medians)")
    encode_ms = None
    if backend is not None:
        pixels = preprocess(frame(640, 480), config)[None]
        encode_ms = median_ms(lambda: backend.encode_images(pixels), max(3, args.runs // 6))
        print(f"vision encoder ({backend.name}, {getattr(backend, 'description', '')}): {encode_ms:.1f} ms per frame")
    print("frame       | preprocess (Pillow) ms | OpenCV INTER_CUBIC resize ms | Pillow vs OpenCV |diff| uint8 mean / p95"
          + (" | preprocess / encode" if encode_ms else ""))
    for width, height in SIZES:
        bgr = frame(width, height)
        ours = median_ms(lambda: preprocess(bgr, config), args.runs)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        old = median_ms(lambda: cv2.resize(rgb, (384, 384), interpolation=cv2.INTER_CUBIC), args.runs)
        pillow = np.asarray(Image.fromarray(rgb).resize((384, 384), Image.Resampling.BICUBIC), np.int16)
        diff = np.abs(pillow - cv2.resize(rgb, (384, 384), interpolation=cv2.INTER_CUBIC).astype(np.int16))
        share = f" | {100 * ours / encode_ms:.2f} %" if encode_ms else ""
        print(f"{width}x{height:<5} | {ours:22.2f} | {old:28.2f} | {diff.mean():.2f} / {np.percentile(diff, 95):.0f}{share}")


if __name__ == "__main__":
    main()
