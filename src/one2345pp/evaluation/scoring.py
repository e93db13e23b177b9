"""Scoring one object: a predicted mesh and six generated views against a ground-truth mesh.

:class:`ObjectScorer` holds what every object shares (the renderer, the CLIP encoder and the LPIPS model when
configured) and :meth:`ObjectScorer.score` returns the metrics of one object plus the renderings behind them:

- geometry (:func:`~one2345pp.evaluation.geometry.evaluate_meshes`): ``fscore``, ``precision``, ``recall``,
  ``chamfer`` of the predicted mesh against the ground truth (unit boxes, optional rotation search + ICP);
- the six generated views against ground-truth renderings at the same cameras, both on the pipeline's gray
  background: ``psnr`` (mean over the views of the whole-image PSNR; identical views give ``inf``, which the report
  leaves out of the means), ``lpips`` (mean over the views) and ``mask_iou`` (the generated views' mask is found the
  way the pipeline finds it, by the colour distance from the gray background);
- ``clip``: the mean cosine similarity of the CLIP embeddings of the predicted and ground-truth meshes rendered from
  the evaluation views (the protocol's 24), composited over white.

Both meshes are expected in the prediction's frame (see :mod:`one2345pp.evaluation.config`); nothing is re-framed
for the renderings, only the geometry metrics rescale and align.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cameras import Camera, tile
from ..geometry.mesh import Mesh
from ..pipeline.preprocess import alpha_from_background
from ..rendering.raycast import RaycastRenderer
from .appearance import ClipConfig, as_float_images, clip_similarity, eval_views, load_clip, mask_iou, psnr
from .config import EvalConfig
from .geometry import evaluate_meshes
from .lpips import load_lpips, lpips_distance

log = logging.getLogger(__name__)

__all__ = ["ObjectScorer", "ScoredObject", "grid_image", "render_rgba", "resolve_device", "unavailable_metrics"]

GRAY = 0.5  # background of the generated views (the pipeline composites on 0.5 gray)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


@dataclass
class ScoredObject:
    metrics: dict  # fscore, precision, recall, chamfer, psnr, psnr_views, lpips, mask_iou, clip (None: not measured)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> uint8 image (gt_views, turntable, ...)


def render_rgba(renderer, mesh: Mesh, cameras: list[Camera]) -> np.ndarray:
    """float32 ``[N, H, W, 4]`` straight-alpha renderings of ``mesh``."""
    return np.stack([r.rgba for r in renderer.render_many(mesh, cameras)])


def over(rgba: np.ndarray, background: float) -> np.ndarray:
    """RGBA float -> RGB float composited over a grey level."""
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + background * (1.0 - a)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid_image(images: np.ndarray, columns: int) -> np.ndarray:
    """``[N, H, W, C]`` -> one image, ``columns`` per row, row-major (the last row padded with zeros)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, columns)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return out


def unavailable_metrics(cfg: EvalConfig) -> dict[str, str]:
    """Metric -> why it is not measured with these settings (CLIP / LPIPS without a configured model)."""
    out = {}
    if not cfg.clip.model:
        out["clip"] = "no CLIP model configured (set clip.model to a local transformers CLIP folder or a hub id)"
    if not cfg.lpips.weights:
        out["lpips"] = (
            "no LPIPS weights configured (set lpips.weights to a safetensors file made with "
            "`python -m one2345pp.evaluation.lpips`)"
        )
    return out


class ObjectScorer:
    """See the module doc. ``cfg.clip.model`` / ``cfg.lpips.weights`` set: the models are loaded here and a path
    that is missing or unreadable is an error; unset: :attr:`unavailable` says why the column is empty."""

    def __init__(self, cfg: EvalConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.renderer = RaycastRenderer(cfg.render)
        v = cfg.views
        self.eval_cameras = eval_views(
            v.azimuth_step_deg,
            list(v.elevations_deg),
            start_azimuth_deg=v.start_azimuth_deg,
            fov_deg=v.fov_deg,
            resolution=v.resolution,
            distance=v.distance,
            extent=v.extent,
        )
        self.unavailable = unavailable_metrics(cfg)
        self.clip = None
        if cfg.clip.model:
            self.clip = load_clip(
                ClipConfig(model=cfg.clip.model, subfolder=cfg.clip.subfolder, batch_size=cfg.clip.batch_size),
                self.device,
            )
        self.lpips = None
        if cfg.lpips.weights:
            self.lpips = load_lpips(cfg.lpips.weights, self.device)

    # ---------------------------------------------------------------------------------------------- pieces
    def geometry(self, pred: Mesh, gt: Mesh) -> dict:
        c = self.cfg
        s = evaluate_meshes(
            pred, gt, align_meshes=c.align, num_points=c.points, tau=c.tau, seed=c.seed, align_cfg=c.alignment
        )
        return {"fscore": s.fscore, "precision": s.precision, "recall": s.recall, "chamfer": s.chamfer}

    def view_metrics(self, generated: np.ndarray, gt_rgba: np.ndarray, alpha_threshold: float) -> dict:
        """``generated`` uint8 / float ``[6, H, W, 3]`` on gray against ground-truth renderings ``[6, H, W, 4]``."""
        gen = as_float_images(generated, "generated views")
        if gen.shape[:-1] != gt_rgba.shape[:-1] or gen.shape[-1] != 3:
            raise ValueError(f"generated views {gen.shape} do not match the ground-truth renderings {gt_rgba.shape}")
        gt_rgb = to_uint8(over(gt_rgba, GRAY))  # the ground truth quantised like a saved rendering
        per_view = [psnr(g, t) for g, t in zip(gen, gt_rgb, strict=True)]
        pred_alpha = np.stack([alpha_from_background(g, GRAY, alpha_threshold) for g in gen])
        out = {
            "psnr": float(np.mean(per_view)),
            "psnr_views": per_view,
            "mask_iou": mask_iou(pred_alpha, gt_rgba[..., 3]),
            "lpips": None,
        }
        if self.lpips is not None:
            out["lpips"] = lpips_distance(self.lpips, gen, gt_rgb, self.cfg.lpips.batch_size)
        return out

    # ---------------------------------------------------------------------------------------------- object
    def score(
        self,
        pred_mesh: Mesh,
        gt_mesh: Mesh,
        generated_views: np.ndarray,
        view_cameras: list[Camera],
        *,
        pred_render_mesh: Mesh | None = None,
        alpha_threshold: float = 0.08,
    ) -> ScoredObject:
        """Score one object (see the module doc). ``pred_mesh`` is scored for geometry; ``pred_render_mesh`` (the
        textured output; default ``pred_mesh``) is rendered for CLIP and the turntable."""
        gt_views = render_rgba(self.renderer, gt_mesh, view_cameras)
        metrics = self.geometry(pred_mesh, gt_mesh)
        metrics.update(self.view_metrics(generated_views, gt_views, alpha_threshold))
        pred_turn = render_rgba(self.renderer, pred_render_mesh or pred_mesh, self.eval_cameras)
        gt_turn = render_rgba(self.renderer, gt_mesh, self.eval_cameras)
        bg = self.cfg.clip.background
        metrics["clip"] = None if self.clip is None else clip_similarity(pred_turn, gt_turn, self.clip, bg)
        columns = max(1, round(360.0 / self.cfg.views.azimuth_step_deg))
        images = {
            "gt_views": tile(to_uint8(over(gt_views, GRAY))),
            "turntable": to_uint8(grid_image(over(pred_turn, bg), columns)),
            "gt_turntable": to_uint8(grid_image(over(gt_turn, bg), columns)),
        }
        return ScoredObject(metrics, images)
