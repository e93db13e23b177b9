"""Framing an object in a square image: its alpha box centred, its longer side a given share of the side.

One rule for both ends of the multi-view stage: the product's preprocessing frames every input image with it
(``pipeline.preprocess``), and with ``data.cond_fill`` the training loader frames every rendered condition view with
it, so that the model trains on the images it will be given.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ALPHA_THRESHOLD", "frame_object"]

ALPHA_THRESHOLD = 8  # alpha (0..255) at or below which a pixel is background, for the product and the loader alike


def frame_object(rgba: np.ndarray, on: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Float straight-alpha RGBA ``[H, W, 4]`` in [0, 1] and its object mask ``on`` (non-empty) -> ``[size, size, 4]``
    with the mask's bounding box centred and its longer side ``round(fill * size)`` pixels."""
    ys, xs = np.nonzero(on)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgba[y0:y1, x0:x1].astype(np.float32, copy=True)
    crop[..., :3] *= crop[..., 3:]  # premultiply so resampling does not bleed background colour
    side = max(y1 - y0, x1 - x0)
    scale = max(1, round(fill * size)) / side
    h, w = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
    channels = [Image.fromarray(crop[..., c], "F").resize((w, h), Image.LANCZOS) for c in range(4)]
    small = np.clip(np.stack([np.asarray(c) for c in channels], -1), 0.0, 1.0)
    out = np.zeros((size, size, 4), np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = small
    a = out[..., 3:]
    out[..., :3] = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
    return np.clip(out, 0.0, 1.0)
