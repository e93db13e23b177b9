"""Input image -> the condition image the multi-view stage was trained on.

1. Read and check the file (corrupt, empty, 1x1, over PIL's decompression-bomb limit, unsupported mode -> an
   :class:`ImageError` naming the file and the problem); an EXIF orientation is applied.
2. Foreground mask: an RGBA / LA / palette-with-transparency image uses its alpha (an alpha channel without a
   single transparent pixel counts as opaque). An opaque image goes through
   background removal: ``rembg`` when ``background_removal`` is ``"rembg"`` or ``"auto"`` and rembg with its model is
   available locally; otherwise (``"auto"`` / ``"plain"``) a plain-background fallback: the background colour is the
   median of the border pixels, which must be uniform (their spread under ``plain_tolerance``); pixels farther than
   ``plain_threshold`` from it are foreground, holes enclosed by the foreground are filled. A busy background with no
   rembg is an error that says what to install.
3. Framing: the object (its alpha bounding box) is centred and scaled so that the longer side of the box is ``fill``
   of the output side. The default 0.53 is the median of that ratio over the condition views of the embedded dataset
   (objects normalised to 0.9, camera at the framing distance, FoV 30); pass the value measured on your own data.
4. Composited over gray (0.5), returned as RGB uint8 of ``size`` x ``size``, plus the RGBA version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from one2345pp.data.framing import ALPHA_THRESHOLD, frame_object

MODES = ("1", "RGB", "RGBA", "L", "LA", "P", "PA", "I;16", "I", "F", "CMYK", "YCbCr")
REMOVERS = ("auto", "rembg", "plain")


class ImageError(ValueError):
    """A bad input image; the message names the file and the problem."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


@dataclass
class PreprocessConfig:
    size: int = 320  # output side in pixels (the condition resolution of the shards)
    fill: float = 0.53  # longer side of the object's box / output side
    background: float = 0.5  # gray level of the output background
    background_removal: str = "auto"  # "auto" (rembg if usable, else plain), "rembg", "plain"
    rembg_model: str = "u2net"  # rembg session name; its weights must be in rembg's local model folder (U2NET_HOME)
    alpha_threshold: int = ALPHA_THRESHOLD  # alpha at or below this is background (0..255)
    plain_threshold: float = 0.12  # colour distance (0..sqrt(3)) from the background colour that counts as object
    plain_tolerance: float = 0.06  # largest allowed spread (std per channel) of the border for a "plain" background
    min_pixels: int = 16  # fewer foreground pixels than this is an empty image


def check_config(cfg: PreprocessConfig) -> None:
    if cfg.size < 8:
        raise ValueError(f"preprocess.size must be >= 8, got {cfg.size}")
    if not 0.05 <= cfg.fill <= 1.0:
        raise ValueError(f"preprocess.fill must lie in [0.05, 1], got {cfg.fill}")
    if cfg.background_removal not in REMOVERS:
        raise ValueError(f"preprocess.background_removal must be one of {REMOVERS}, got {cfg.background_removal!r}")


def open_image(path: str | os.PathLike | Image.Image) -> Image.Image:
    """Open and fully decode an image, turning every PIL failure into an :class:`ImageError` naming the file."""
    if isinstance(path, Image.Image):
        return path
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ImageError(source, "no such file")
    if p.stat().st_size == 0:
        raise ImageError(source, "empty file (0 bytes)")
    try:
        with Image.open(p) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # camera photos: apply the EXIF orientation (a copy)
    except Image.DecompressionBombError as exc:
        raise ImageError(source, f"image is larger than PIL's decompression-bomb limit ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(source, f"not a readable image ({exc})") from exc


def _to_rgba_array(im: Image.Image, source: str) -> tuple[np.ndarray, bool]:
    """float RGBA in [0, 1] and whether the image carried real transparency."""
    if im.mode not in MODES:
        raise ImageError(source, f"unsupported image mode {im.mode!r} (supported: {', '.join(MODES)})")
    if im.width < 2 or im.height < 2:
        raise ImageError(source, f"image is {im.width}x{im.height}; at least 2x2 pixels are needed")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if im.mode in ("I;16", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max()
        im = Image.fromarray(np.uint8(np.clip(a / (hi if hi > 0 else 1.0), 0, 1) * 255), "L")
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    # an alpha channel that is opaque everywhere says nothing about the object: treat the image as opaque
    return rgba, has_alpha and bool((rgba[..., 3] < 1.0).any())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask)


def plain_background_alpha(rgb: np.ndarray, cfg: PreprocessConfig, source: str) -> np.ndarray:
    """Alpha of an image on a plain background (see the module doc); an error when the border is not uniform."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    spread = float(border.std(0).max())
    if spread > cfg.plain_tolerance:
        raise ImageError(
            source,
            f"opaque image on a non-uniform background (border spread {spread:.3f} > "
            f"preprocess.plain_tolerance={cfg.plain_tolerance}); give an RGBA image with the object cut out, or "
            "install rembg with its model available locally (preprocess.background_removal=rembg)",
        )
    return alpha_from_background(rgb, np.median(border, axis=0), cfg.plain_threshold)


def alpha_from_background(rgb: np.ndarray, colour, threshold: float) -> np.ndarray:
    """Alpha (0/1 float32) of the pixels farther than ``threshold`` from the background ``colour`` (a gray level or an
    RGB triple), with holes enclosed by the foreground filled."""
    mask = np.linalg.norm(np.asarray(rgb, np.float32) - np.asarray(colour, np.float32), axis=-1) > threshold
    return _fill_holes(mask).astype(np.float32)


def rembg_alpha(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Alpha from rembg; raises ImportError / RuntimeError when rembg or its local model is missing."""
    try:
        import rembg
    except ImportError as exc:
        raise ImportError("rembg is not installed (pip install rembg)") from exc
    home = Path(os.environ.get("U2NET_HOME", Path.home() / ".u2net"))
    if not (home / f"{cfg.rembg_model}.onnx").is_file():
        raise RuntimeError(f"rembg model {cfg.rembg_model!r} is not in {home} (set U2NET_HOME or download it there)")
    session = rembg.new_session(cfg.rembg_model)
    out = rembg.remove(Image.fromarray(np.uint8(rgb * 255)), session=session)
    return np.asarray(out.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0


def foreground_alpha(rgba: np.ndarray, has_alpha: bool, cfg: PreprocessConfig, source: str) -> np.ndarray:
    if has_alpha:
        return rgba[..., 3]
    rgb = rgba[..., :3]
    if cfg.background_removal in ("auto", "rembg"):
        try:
            return rembg_alpha(rgb, cfg)
        except (ImportError, RuntimeError) as exc:
            if cfg.background_removal == "rembg":
                raise ImageError(source, f"background removal with rembg failed: {exc}") from exc
    return plain_background_alpha(rgb, cfg, source)


def frame(rgba: np.ndarray, cfg: PreprocessConfig, source: str) -> np.ndarray:
    """Centre the object's alpha box and scale its longer side to ``cfg.fill`` of a ``cfg.size`` square (RGBA)."""
    on = rgba[..., 3] > cfg.alpha_threshold / 255.0
    if on.sum() < cfg.min_pixels:
        raise ImageError(source, f"no object: {int(on.sum())} pixels are not transparent/background")
    return frame_object(rgba, on, cfg.size, cfg.fill)


def preprocess_image(image: str | os.PathLike | Image.Image, cfg: PreprocessConfig | None = None):
    """Path or PIL image -> (RGB uint8 [size, size, 3] on gray, RGBA uint8 [size, size, 4])."""
    cfg = cfg or PreprocessConfig()
    check_config(cfg)
    source = "<image>" if isinstance(image, Image.Image) else str(image)
    im = open_image(image)
    rgba, has_alpha = _to_rgba_array(im, source)
    rgba[..., 3] = foreground_alpha(rgba, has_alpha, cfg, source)
    framed = frame(rgba, cfg, source)
    a = framed[..., 3:]
    rgb = framed[..., :3] * a + cfg.background * (1 - a)
    return np.uint8(np.round(rgb * 255)), np.uint8(np.round(framed * 255))
