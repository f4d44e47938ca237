import cv2
import numpy as np
import pytest
from PIL import Image

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


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A BGR picture with smooth gradients, hard edges and fine texture, like a camera frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    127 + 120 * np.sin(x / 7.0) * np.cos(y / 11.0)], axis=2)
    img[height // 3: height // 2, width // 4: width // 2] = (20, 220, 40)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pillow_reference(bgr: np.ndarray) -> np.ndarray:
    """What the model was trained on: Pillow bicubic straight to 384x384, then /255, mean = std = 0.5."""
    resized = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).resize((384, 384), Image.BICUBIC)
    return ((np.asarray(resized, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


SIZES = [(480, 640), (1080, 1920), (720, 1280), (240, 320), (1000, 300), (384, 384), (500, 384), (31, 2000)]


@pytest.mark.parametrize("height, width", SIZES)
def test_resize_is_pillow_bicubic_without_keeping_aspect(tiny_config, height, width):
    image = photo(height, width)
    px = preprocess(image, tiny_config, "bgr")
    assert px.shape == (3, 384, 384)
    np.testing.assert_allclose(px, pillow_reference(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize("height, width", SIZES[:5])
def test_matches_the_transformers_siglip_processor(tiny_config, height, width):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed in this environment")
    processor = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384})
    image = photo(height, width, seed=1)
    expected = processor(images=Image.fromarray(image[:, :, ::-1].copy()), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, tiny_config, "bgr"), expected, rtol=0, atol=1e-5)


def test_shrinking_is_antialiased(tiny_config):
    # One-pixel stripes shrunk 5x: an antialiased filter averages them to an even grey, a plain
    # bicubic interpolation (OpenCV's INTER_CUBIC) samples them into bands.
    stripes = np.zeros((1920, 1920, 3), np.uint8)
    stripes[:, ::2] = 255
    px = preprocess(stripes, tiny_config, "bgr")
    aliased = cv2.resize(stripes, (384, 384), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 127.5 - 1
    assert float(px.std()) < 0.02 < float(aliased.std())


def test_files_keep_their_exif_rotation(tmp_path):
    # Stored landscape (40 wide, 20 high), left half red; orientation 6 = show rotated 90 degrees
    # clockwise, so the upright picture is portrait with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    bgr = load_image(str(path))
    assert bgr.shape == (40, 20, 3)
    top, bottom = bgr[:15].reshape(-1, 3).mean(0), bgr[25:].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[0] < 50 and bottom.max() < 50  # BGR: red is channel 2
    plain = tmp_path / "plain.png"
    Image.fromarray(stored).save(plain)
    np.testing.assert_array_equal(load_image(str(plain)), stored[:, :, ::-1])


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
