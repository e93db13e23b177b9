"""Appearance metrics of the evaluation protocol (METHOD.md): CLIP similarity over 24 views, PSNR and mask IoU of
the generated views (LPIPS lives in :mod:`one2345pp.evaluation.lpips`).

Definitions used here:

- Images are arrays ``[H, W, C]`` or batches ``[N, H, W, C]``, float in [0, 1] or uint8 (divided by 255).
- PSNR of one image = ``10 log10(1 / MSE)`` with the MSE over all pixels and channels, or over the pixels of a mask
  (all channels of each masked pixel); identical images give ``inf``. A batch gives the mean of the per-image PSNRs.
- Mask IoU of two alpha maps ``[H, W]`` (or ``[N, H, W]``): both thresholded at 0.5, |A and B| / |A or B|; two empty
  masks count as 1. A batch gives the mean over images. For RGBA renderings pass ``rgba[..., 3]``.
- CLIP similarity of two sets of N renderings (same cameras, same order): the cosine similarity between the projected
  CLIP image embeddings of view i of each set, averaged over the N views; in [-1, 1] (the paper's tables print it
  x 100). RGBA inputs are composited over a background colour first (white by default).
- :func:`eval_views`: the 24 evaluation cameras: every 30 degrees of azimuth at elevation 30, then at elevation 0.

The CLIP encoder is a ``transformers`` ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder or hub id
(:class:`ClipConfig`); its ``preprocessor_config.json`` gives the resize / crop / normalisation (without one, the
standard CLIP preprocessing at the encoder's input size is used). The paper does not name its CLIP encoder; the
default is OpenAI's ViT-L/14.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cameras import Camera, framing_distance

log = logging.getLogger(__name__)

__all__ = [
    "ClipConfig",
    "ClipEmbedder",
    "EvalViewsConfig",
    "as_float_images",
    "clip_similarity",
    "eval_views",
    "load_clip",
    "mask_iou",
    "psnr",
]


# ------------------------------------------------------------------------------------------------------- images
def as_float_images(images, name: str = "images") -> np.ndarray:
    """uint8 or float images in [0, 1] -> float64 array (same shape); values outside [0, 1] are an error."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain non-finite values")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(f"{name} must lie in [0, 1] (or be uint8), got values in [{arr.min():.4g}, {arr.max():.4g}]")
    return np.clip(arr, 0.0, 1.0)


def _batched(arr: np.ndarray, image_ndim: int, name: str) -> np.ndarray:
    if arr.ndim == image_ndim:
        return arr[None]
    if arr.ndim == image_ndim + 1:
        return arr
    kind = "[H, W, C] or [N, H, W, C]" if image_ndim == 3 else "[H, W] or [N, H, W]"
    raise ValueError(f"{name} must have shape {kind}, got {arr.shape}")


# --------------------------------------------------------------------------------------------------------- PSNR
def psnr(pred, target, mask=None) -> float:
    """PSNR in dB of ``pred`` against ``target`` (see the module doc); ``mask`` [H, W] or [N, H, W] (bool or alpha,
    > 0.5 counts) restricts the error to the masked pixels."""
    p = _batched(as_float_images(pred, "pred"), 3, "pred")
    t = _batched(as_float_images(target, "target"), 3, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    err = ((p - t) ** 2).mean(axis=-1)  # [N, H, W]
    if mask is None:
        mse = err.reshape(len(err), -1).mean(axis=1)
    else:
        m = _batched(_alpha(mask, "mask"), 2, "mask") > 0.5
        if m.shape[1:] != err.shape[1:] or len(m) not in (1, len(err)):
            raise ValueError(f"mask shape {np.asarray(mask).shape} does not match the images {p.shape[:-1]}")
        m = np.broadcast_to(m, err.shape)
        counts = m.reshape(len(m), -1).sum(axis=1)
        if (counts == 0).any():
            raise ValueError("PSNR mask is empty for at least one image")
        mse = (err * m).reshape(len(err), -1).sum(axis=1) / counts
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(1.0 / mse)
    return float(values.mean())


# ----------------------------------------------------------------------------------------------------- mask IoU
def mask_iou(pred_alpha, target_alpha, threshold: float = 0.5) -> float:
    """Mean IoU of alpha maps ``[H, W]`` / ``[N, H, W]`` (bool, uint8 or float in [0, 1]) thresholded at
    ``threshold``; two empty masks count as 1."""
    a = _batched(_alpha(pred_alpha, "pred_alpha"), 2, "pred_alpha") > threshold
    b = _batched(_alpha(target_alpha, "target_alpha"), 2, "target_alpha") > threshold
    if a.shape != b.shape:
        raise ValueError(f"alpha shapes differ: {a.shape} vs {b.shape}")
    inter = (a & b).reshape(len(a), -1).sum(axis=1)
    union = (a | b).reshape(len(a), -1).sum(axis=1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(iou.mean())


def _alpha(alpha, name: str) -> np.ndarray:
    arr = np.asarray(alpha)
    return arr.astype(np.float64) if arr.dtype == np.bool_ else as_float_images(arr, name)


# ----------------------------------------------------------------------------------------------- evaluation views
@dataclass
class EvalViewsConfig:
    """The cameras the prediction and the ground truth are rendered from for CLIP similarity."""

    azimuth_step_deg: float = 30.0
    elevations_deg: list[float] = field(default_factory=lambda: [30.0, 0.0])
    start_azimuth_deg: float = 0.0
    fov_deg: float = 30.0
    resolution: int = 256
    distance: float | None = None  # None: cameras.framing_distance(fov_deg, extent)
    extent: float = 0.9  # longest bounding-box side of the (normalised) objects, used for the framing distance


def eval_views(
    azimuth_step_deg: float = 30.0,
    elevations_deg: Sequence[float] = (30.0, 0.0),
    *,
    start_azimuth_deg: float = 0.0,
    fov_deg: float = 30.0,
    resolution: int = 256,
    distance: float | None = None,
    extent: float = 0.9,
) -> list[Camera]:
    """Cameras every ``azimuth_step_deg`` degrees at each elevation, elevation-major (defaults: 12 at elevation 30,
    then 12 at 0 = the protocol's 24 views). ``eval_views(**asdict(EvalViewsConfig(...)))`` takes a config."""
    if azimuth_step_deg <= 0 or azimuth_step_deg > 360:
        raise ValueError(f"azimuth_step_deg must lie in (0, 360], got {azimuth_step_deg}")
    count = 360.0 / azimuth_step_deg
    if abs(count - round(count)) > 1e-6:
        raise ValueError(f"azimuth_step_deg={azimuth_step_deg} does not divide 360 degrees")
    if not elevations_deg:
        raise ValueError("elevations_deg is empty")
    if any(not -90.0 < e < 90.0 for e in elevations_deg):
        raise ValueError(f"elevations must lie in (-90, 90) degrees, got {list(elevations_deg)}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    d = framing_distance(fov_deg, extent) if distance is None else float(distance)
    if d <= 0:
        raise ValueError(f"camera distance must be > 0, got {d}")
    return [
        Camera((start_azimuth_deg + k * azimuth_step_deg) % 360.0, float(el), d, float(fov_deg), resolution, resolution)
        for el in elevations_deg
        for k in range(round(count))
    ]


# ---------------------------------------------------------------------------------------------------------- CLIP
@dataclass
class ClipConfig:
    model: str = "openai/clip-vit-large-patch14"  # CLIPModel / CLIPVisionModelWithProjection folder or hub id
    subfolder: str | None = None
    batch_size: int = 8


def _processor_class():
    """CLIP's image processor; the PIL backend where transformers has one (no torchvision needed)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _looks_like_path(source: str) -> bool:
    """A folder rather than a hub id ("org/name"): absolute, ./ ../ ~ prefixed, deeper than one slash, or existing."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).expanduser().exists()


def load_clip(cfg: ClipConfig | str, device: str | torch.device = "cpu") -> ClipEmbedder:
    """Load the CLIP image encoder and its preprocessing from a folder or hub id; a missing folder, a folder without
    ``config.json``, an unreachable / uncached hub id or a non-CLIP model is an error naming the source."""
    cfg = ClipConfig(model=cfg) if isinstance(cfg, str) else cfg
    if cfg.batch_size < 1:
        raise ValueError(f"clip.batch_size must be >= 1, got {cfg.batch_size}")
    source = str(cfg.model)
    kw = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    local = _looks_like_path(source)
    if local:
        folder = Path(source).expanduser() / (cfg.subfolder or "")
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model folder {folder} has no config.json (expected a transformers folder)")
        source = str(Path(source).expanduser())
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError) as exc:
        if local:
            raise ValueError(f"CLIP model folder {source}: cannot read its config ({exc})") from exc
        raise OSError(
            f"CLIP model {source!r} could not be loaded: it is not a local folder and the hub id is neither cached "
            f"nor reachable ({exc}). Set the CLIP model path in the config to a local transformers folder."
        ) from exc
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}
    if config.model_type not in classes:
        raise ValueError(
            f"CLIP model {source!r} has model_type {config.model_type!r}; expected a CLIPModel ('clip') or a "
            "CLIPVisionModelWithProjection ('clip_vision_model')"
        )
    model = classes[config.model_type].from_pretrained(source, **kw).eval().to(device)
    image_size = model.config.vision_config.image_size if config.model_type == "clip" else model.config.image_size
    try:
        processor = _processor_class().from_pretrained(source, **kw)
    except OSError:
        log.info("%s has no preprocessor config; using CLIP's standard preprocessing at %d px", source, image_size)
        processor = _processor_class()(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return ClipEmbedder(model, processor, torch.device(device), cfg.batch_size)


class ClipEmbedder:
    """A loaded CLIP image encoder: images -> unit-length projected embeddings."""

    def __init__(self, model, processor, device: torch.device, batch_size: int = 8):
        self.model, self.processor, self.device, self.batch_size = model, processor, device, batch_size

    @torch.inference_mode()
    def embed(self, images, background: float | Sequence[float] = 1.0) -> torch.Tensor:
        """``[N, H, W, 3|4]`` images (uint8 or float in [0, 1]; RGBA composited over ``background``) ->
        ``[N, D]`` unit-length float32 embeddings on the CPU."""
        arr = _batched(as_float_images(images, "images"), 3, "images")
        if arr.shape[-1] == 4:
            a = arr[..., 3:4]
            arr = arr[..., :3] * a + np.asarray(background, dtype=np.float64) * (1.0 - a)
        elif arr.shape[-1] != 3:
            raise ValueError(f"CLIP needs RGB or RGBA images, got {arr.shape[-1]} channels")
        u8 = np.round(arr * 255.0).astype(np.uint8)
        out = []
        for i in range(0, len(u8), self.batch_size):
            pixels = self.processor(images=list(u8[i : i + self.batch_size]), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_similarity(pred, target, embedder: ClipEmbedder, background: float | Sequence[float] = 1.0) -> float:
    """Mean over views of the cosine similarity between the CLIP embeddings of ``pred[i]`` and ``target[i]``."""
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape[:1] != t.shape[:1] or p.ndim != 4 or t.ndim != 4:
        raise ValueError(f"CLIP similarity needs two [N, H, W, C] sets with the same N, got {p.shape} and {t.shape}")
    cos = (embedder.embed(p, background) * embedder.embed(t, background)).sum(dim=-1)
    value = float(cos.mean())
    if not math.isfinite(value):
        raise ValueError("CLIP similarity is not finite")
    return value
