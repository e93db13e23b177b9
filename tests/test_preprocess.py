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


def test_opaque_alpha_channel_counts_as_opaque(tmp_path):
    """An RGBA file whose alpha is 255 everywhere (a photo saved as RGBA) goes through background removal."""
    img, inside = _disc_rgba(colour=(40, 90, 200))
    rgba = np.full((200, 200, 4), 255, np.uint8)
    rgba[inside, :3] = [40, 90, 200]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    cfg = PreprocessConfig(size=200, fill=60 / 200, background_removal="plain")
    _, got = preprocess_image(tmp_path / "opaque.png", cfg)
    _, ref = preprocess_image(Image.fromarray(img, "RGBA"), cfg)
    a, b = got[..., 3] > 127, ref[..., 3] > 127
    assert (a & b).sum() / (a | b).sum() > 0.95  # the disc, not the whole square


def test_exif_orientation_is_applied(tmp_path):
    img = np.full((60, 100, 3), 255, np.uint8)
    img[20:40, 10:50] = (200, 30, 30)  # a bar 20 high and 40 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the bar stands upright when shown
    Image.fromarray(img).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    _, rgba = preprocess_image(tmp_path / "photo.jpg", PreprocessConfig(size=100, fill=0.8, background_removal="plain"))
    y0, y1, x0, x1 = _box(rgba[..., 3])
    assert abs((y1 - y0) - 80) <= 2 and abs((x1 - x0) - 40) <= 2


class _FakeRembg:
    """Stands in for the rembg package: alpha = the pixels whose red channel is high."""

    def __init__(self):
        self.sessions = []

    def new_session(self, name):
        self.sessions.append(name)
        return name

    def remove(self, image, session=None):
        a = np.asarray(image.convert("RGB"))
        alpha = np.where(a[..., 0] > 150, 255, 0).astype(np.uint8)
        return Image.fromarray(np.dstack([a, alpha]), "RGBA")


def test_rembg_is_used_when_installed_with_a_local_model(tmp_path, monkeypatch):
    import sys

    img = np.random.default_rng(1).integers(0, 120, (80, 80, 3), dtype=np.uint8)  # busy, dark background
    img[20:60, 30:50] = (230, 40, 40)
    Image.fromarray(img).save(tmp_path / "busy.png")
    fake = _FakeRembg()
    monkeypatch.setitem(sys.modules, "rembg", fake)
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "models"))
    with pytest.raises(ImageError, match="rembg model 'u2net' is not in"):  # installed but no local model
        preprocess_image(tmp_path / "busy.png", PreprocessConfig(background_removal="rembg"))
    with pytest.raises(ImageError, match="non-uniform background"):  # auto: falls back to the plain background
        preprocess_image(tmp_path / "busy.png", PreprocessConfig(background_removal="auto"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "u2net.onnx").write_bytes(b"weights")
    _, rgba = preprocess_image(tmp_path / "busy.png", PreprocessConfig(size=80, fill=0.5))
    assert fake.sessions == ["u2net"]
    y0, y1, x0, x1 = _box(rgba[..., 3])
    assert abs((y1 - y0) - 40) <= 2 and abs((x1 - x0) - 20) <= 2  # the 40 x 20 red box, framed to 0.5 * 80


def test_rembg_requested_but_not_installed(tmp_path, monkeypatch):
    import sys

    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "white.png")
    monkeypatch.setitem(sys.modules, "rembg", None)  # import rembg raises ImportError
    with pytest.raises(ImageError, match="white.png: background removal with rembg failed: rembg is not installed"):
        preprocess_image(tmp_path / "white.png", PreprocessConfig(background_removal="rembg"))
