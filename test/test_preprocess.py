import cv2
import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.preprocess import load_image, preprocess, preprocess_batch


def test_shape_dtype_range(tiny_config, scene_image):
    px = preprocess(scene_image, tiny_config)
    assert px.shape == (3, 384, 384)
    assert px.dtype == np.float32
    assert px.min() >= -1.0 and px.max() <= 1.0
    # Pure colours map to the ends of the range exactly.
    assert px.max() == pytest.approx(1.0) and px.min() == pytest.approx(-1.0)


def test_normalisation_is_mean_std_half(tiny_config):
    img = np.full((384, 384, 3), 51, np.uint8)  # no resize at 384: exact arithmetic
    px = preprocess(img, tiny_config, "rgb")
    np.testing.assert_allclose(px, (51 / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_bgr_and_rgb_give_the_same_pixels(tiny_config, scene_image):
    rgb = scene_image[:, :, ::-1].copy()
    np.testing.assert_array_equal(preprocess(scene_image, tiny_config, "bgr"), preprocess(rgb, tiny_config, "rgb"))


def test_channel_order_is_rgb(tiny_config):
    blue_bgr = np.zeros((384, 384, 3), np.uint8)
    blue_bgr[:, :, 0] = 255  # blue in OpenCV's BGR order
    px = preprocess(blue_bgr, tiny_config, "bgr")
    assert px[2].min() == pytest.approx(1.0)  # channel 2 = blue in RGB
    assert px[0].max() == pytest.approx(-1.0) and px[1].max() == pytest.approx(-1.0)


def test_resize_is_bicubic_without_keeping_aspect(tiny_config, scene_image):
    px = preprocess(scene_image, tiny_config, "bgr")
    expected = cv2.resize(scene_image[:, :, ::-1], (384, 384), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(px, (expected.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 1001, 3), (383, 385, 3), (2000, 31, 3)])
def test_odd_sizes(tiny_config, shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert preprocess(img, tiny_config).shape == (3, 384, 384)


def test_grayscale_2d_and_1_channel(tiny_config):
    gray = np.random.default_rng(1).integers(0, 256, (300, 200), dtype=np.uint8)
    a = preprocess(gray, tiny_config)
    b = preprocess(gray[:, :, None], tiny_config)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[1], a[2])


def test_rgba_and_bgra_drop_alpha(tiny_config, scene_image):
    alpha = np.full(scene_image.shape[:2] + (1,), 17, np.uint8)
    bgra = np.concatenate([scene_image, alpha], axis=2)
    rgba = np.concatenate([scene_image[:, :, ::-1], alpha], axis=2)
    ref = preprocess(scene_image, tiny_config, "bgr")
    np.testing.assert_array_equal(preprocess(bgra, tiny_config, "bgr"), ref)
    np.testing.assert_array_equal(preprocess(rgba, tiny_config, "rgb"), ref)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 2), np.uint8), "unsupported image shape"),
        (np.zeros((10,), np.uint8), "unsupported image shape"),
        ([[1, 2]], "numpy array"),
    ],
)
def test_bad_images_are_refused(tiny_config, image, message):
    with pytest.raises(OmniVisionError, match=message):
        preprocess(image, tiny_config)


def test_unknown_color_order(tiny_config, scene_image):
    with pytest.raises(OmniVisionError, match="color order"):
        preprocess(scene_image, tiny_config, "yuv")


def test_batch(tiny_config, scene_image):
    batch = preprocess_batch([scene_image, scene_image[:100]], tiny_config)
    assert batch.shape == (2, 3, 384, 384)


def test_load_image_errors(tmp_path):
    with pytest.raises(OmniVisionError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(OmniVisionError, match="cannot decode"):
        load_image(str(junk))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(OmniVisionError, match="cannot decode"):
        load_image(str(empty))
