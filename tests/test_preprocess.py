"""Input preprocessing: alpha / plain-background masks, framing, and clear errors for bad images."""

import numpy as np
import pytest
from PIL import Image

from one2345pp.pipeline.preprocess import ImageError, PreprocessConfig, preprocess_image


def _disc_rgba(size=200, centre=(60, 130), radius=30, colour=(200, 30, 30)):
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    img = np.zeros((size, size, 4), np.uint8)
    img[inside] = [*colour, 255]
    return img, inside


def _box(alpha):
    ys, xs = np.nonzero(alpha > 127)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_rgba_uses_alpha_and_is_framed(tmp_path):
    img, _ = _disc_rgba()
    img[..., :3][img[..., 3] == 0] = [0, 255, 0]  # colour under zero alpha must not leak
    Image.fromarray(img, "RGBA").save(tmp_path / "in.png")
    cfg = PreprocessConfig(size=160, fill=0.5)
    rgb, rgba = preprocess_image(tmp_path / "in.png", cfg)
    assert rgb.shape == (160, 160, 3) and rgba.shape == (160, 160, 4)
    y0, y1, x0, x1 = _box(rgba[..., 3])
    assert abs((y1 - y0) - 80) <= 2 and abs((x1 - x0) - 80) <= 2  # 0.5 * 160
    assert abs((y0 + y1) / 2 - 80) <= 1.5 and abs((x0 + x1) / 2 - 80) <= 1.5  # centred
    assert np.all(rgb[0, 0] == 128)  # gray background
    inner = rgb[75:85, 75:85].reshape(-1, 3)
    assert np.abs(inner.astype(int) - [200, 30, 30]).max() <= 2
    assert rgb[..., 1].max() < 140  # no green bleeding from under the transparent pixels


def test_rgb_on_plain_background_matches_the_true_mask(tmp_path):
    img, inside = _disc_rgba(colour=(40, 90, 200))
    rgb_in = np.full((200, 200, 3), 255, np.uint8)
    rgb_in[inside] = [40, 90, 200]
    Image.fromarray(rgb_in, "RGB").save(tmp_path / "in.jpg", quality=95)
    cfg = PreprocessConfig(size=200, fill=60 / 200, background_removal="plain")
    _, rgba = preprocess_image(tmp_path / "in.jpg", cfg)
    ref_cfg = PreprocessConfig(size=200, fill=60 / 200)
    _, ref = preprocess_image(Image.fromarray(img, "RGBA"), ref_cfg)
    a, b = rgba[..., 3] > 127, ref[..., 3] > 127
    assert (a & b).sum() / (a | b).sum() > 0.95


def test_busy_background_without_rembg_is_a_clear_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(tmp_path / "busy.png")
    with pytest.raises(ImageError, match="busy.png: opaque image on a non-uniform background"):
        preprocess_image(tmp_path / "busy.png", PreprocessConfig(background_removal="plain"))


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("corrupt.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "not a readable image"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("tiny.png", lambda p: Image.new("RGBA", (1, 1), (255, 0, 0, 255)).save(p), "1x1"),
        ("clear.png", lambda p: Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(p), "no object"),
    ],
)
def test_bad_images(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError, match=message) as err:
        preprocess_image(path)
    assert name in str(err.value)


def test_missing_file_and_unsupported_mode(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        preprocess_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="unsupported image mode 'HSV'"):
        preprocess_image(Image.new("HSV", (16, 16)))


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300), (255, 255, 255)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 300^2 > 2 x limit: PIL refuses
    with pytest.raises(ImageError, match="decompression-bomb"):
        preprocess_image(tmp_path / "big.png")
