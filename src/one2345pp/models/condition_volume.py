"""Condition volumes of the 3D stages: per-view 2D features projected to 3D points, pooled over the views.

METHOD.md, stage 2: features of each of the six views are sampled at the projection of every voxel centre, passed
through a shared MLP and max-pooled over the views; a small 3D CNN turns the pooled volume into one condition
volume per UNet level (dense here for the coarse stage; the fine stage runs its own sparse CNN on the pooled
features of its sparse points, :meth:`ConditionVolume.features_at` with ``batch_index``).

Conventions (``one2345pp.cameras``): world +Z up; ``c2w`` OpenCV (x right, y down, z forward); pixel ``(i, j)`` has
its centre at ``(i + 0.5, j + 0.5)``; the intrinsics ``K`` belong to the view images as given (``W x H``). A
continuous pixel position ``(u, v)`` maps to the ``grid_sample`` position (``align_corners=False``, where -1 and +1
are the outer edges of the border pixels) ``(2 u / W - 1, 2 v / H - 1)``; a feature map of any size covering the
whole image is sampled with the same position. Cell ``i`` of an ``R^3`` grid has its centre at
``-0.5 + (i + 0.5) / R`` and dense volumes are indexed ``[x, y, z]``.

A projection is invalid when the point is not in front of the camera (depth <= ``NEAR``) or falls outside the
image; invalid views take no part in the max-pooling, and a point seen by no view gets zero features.

The shared MLP is two layers. Its first layer is linear in the sampled feature, so it is applied to the feature
maps as a 1x1 convolution before sampling (identical to applying it after bilinear sampling, and it keeps memory
at the hidden width instead of the backbone's); the unit viewing direction (camera centre -> point, world frame)
is added through its own linear term so the MLP knows where each feature was seen from (a choice; not published).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .image_features import ImageFeatureConfig, build_backbone

__all__ = [
    "NEAR",
    "ConditionConfig",
    "ConditionVolume",
    "DenseConditionPyramid",
    "ViewFeatures",
    "camera_tensors",
    "grid_centres",
    "look_at",
    "masked_view_max",
    "perturb_cameras",
    "pixel_to_grid",
    "project_points",
    "sample_views_at",
    "valid_projection",
]

NEAR = 1e-4  # points closer than this in front of a camera (or behind it) are invalid for that view


@dataclass
class ConditionConfig:
    image_features: ImageFeatureConfig = field(default_factory=ImageFeatureConfig)
    mlp_hidden: int = 64  # width of the shared MLP's hidden layer
    feature_channels: int = 32  # pooled features per point (input of the 3D CNN)
    level_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64, 64])  # condition volume per level


# -------------------------------------------------------------------------------------------------------- geometry
def grid_centres(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centres of the cells of an ``R^3`` grid, ``[R^3, 3]`` in [x, y, z] index order (reshape to ``[R, R, R]``)."""
    c = -0.5 + (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


def _expand_k(K: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:  # noqa: N803 - the usual name
    """Intrinsics [3, 3] / [B, 3, 3] / [B, V, 3, 3] -> [B, V, 3, 3] matching ``c2w`` [B, V, 4, 4]."""
    b, v = c2w.shape[:2]
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must end in 3x3, got shape {tuple(K.shape)}")
    if K.dim() == 2:
        return K.expand(b, v, 3, 3)
    if K.dim() == 3:
        return K[:, None].expand(b, v, 3, 3)
    return K.expand(b, v, 3, 3)


def project_points(
    points: torch.Tensor,
    c2w: torch.Tensor,
    K: torch.Tensor,  # noqa: N803
) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``[B, N, 3]`` -> pixel positions ``[B, V, N, 2]`` (u right, v down) and depths ``[B, V, N]``.

    ``c2w`` ``[B, V, 4, 4]`` (OpenCV), ``K`` ``[3, 3]`` / ``[B, 3, 3]`` / ``[B, V, 3, 3]``. Computed in float32 with
    autocast off, so mixed precision does not move pixels.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, N, 3], got shape {tuple(points.shape)}")
    if c2w.dim() != 4 or c2w.shape[-2:] != (4, 4) or c2w.shape[0] != points.shape[0]:
        raise ValueError(f"c2w must be [B, V, 4, 4] with B={points.shape[0]}, got shape {tuple(c2w.shape)}")
    with torch.autocast(points.device.type, enabled=False):
        c2w = c2w.float()
        k = _expand_k(K.to(c2w.device).float(), c2w)
        rot, pos = c2w[..., :3, :3], c2w[..., :3, 3]  # camera axes (columns) and centre in world
        rel = points.float()[:, None] - pos[:, :, None]  # [B, V, N, 3]
        cam = rel @ rot  # world -> camera: R^T (p - c), as row vectors
        z = cam[..., 2]
        zs = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
        u = k[..., 0, 0, None] * cam[..., 0] / zs + k[..., 0, 2, None]
        v = k[..., 1, 1, None] * cam[..., 1] / zs + k[..., 1, 2, None]
        return torch.stack([u, v], dim=-1), z


def pixel_to_grid(uv: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Continuous pixel positions (pixel centres at +0.5) -> ``grid_sample`` positions for ``align_corners=False``."""
    scale = uv.new_tensor([2.0 / width, 2.0 / height])
    return uv * scale - 1.0


def valid_projection(uv: torch.Tensor, depth: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """True where the point is in front of the camera and inside the image ``[0, W] x [0, H]``."""
    u, v = uv[..., 0], uv[..., 1]
    return (depth > NEAR) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height) & torch.isfinite(uv).all(-1)


def sample_views_at(
    points: torch.Tensor,
    images: torch.Tensor,
    c2w: torch.Tensor,
    K: torch.Tensor,  # noqa: N803
    image_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear samples of per-view maps at the projections of ``points``.

    ``points`` ``[B, N, 3]``; ``images`` ``[B, V, C, h, w]`` (views, or feature maps covering the views); ``K`` is
    for images of ``image_size = (W, H)`` (default: the maps' own size). Returns values ``[B, V, N, C]`` (zero where
    invalid), validity ``[B, V, N]`` and pixel positions ``[B, V, N, 2]``.
    """
    b, nv, c, h, w = images.shape
    width, height = image_size if image_size is not None else (w, h)
    uv, depth = project_points(points, c2w, K)
    valid = valid_projection(uv, depth, width, height)
    grid = pixel_to_grid(uv, width, height).nan_to_num(0.0).clamp(-2.0, 2.0)  # [B, V, N, 2]
    grid = torch.where(valid[..., None], grid, torch.full_like(grid, -2.0))  # outside: reads zero padding
    flat = images.reshape(b * nv, c, h, w)
    out = F.grid_sample(
        flat, grid.reshape(b * nv, 1, -1, 2).to(flat.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [B*V, C, 1, N]
    values = out[:, :, 0].reshape(b, nv, c, -1).transpose(2, 3)
    return values * valid[..., None].to(values.dtype), valid, uv


def masked_view_max(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max over views (dim 1) of ``[B, V, N, C]`` counting only valid views ``[B, V, N]``; zero where none is valid."""
    neg = torch.finfo(values.dtype).min
    masked = values.masked_fill(~valid[..., None], neg)
    pooled = masked.amax(dim=1)
    return torch.where(valid.any(dim=1)[..., None], pooled, torch.zeros_like(pooled))


# --------------------------------------------------------------------------------------------------------- cameras
def look_at(position: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV ``c2w`` ``[..., 4, 4]`` of cameras at ``position`` ``[..., 3]`` looking at the origin (as cameras.py)."""
    forward = F.normalize(-position, dim=-1)
    up_t = position.new_tensor(up).expand_as(forward)
    right = F.normalize(torch.linalg.cross(forward, up_t, dim=-1), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.zeros(*position.shape[:-1], 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, down, forward, position
    c2w[..., 3, 3] = 1.0
    return c2w


def perturb_cameras(
    c2w: torch.Tensor,
    azimuth_deg: float,
    elevation_deg: float,
    distance_frac: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Jitter every camera ``[..., 4, 4]`` (OpenCV c2w) on its viewing sphere around the origin.

    Azimuth and elevation move by ``U(-a, a)`` degrees, the distance is scaled by ``1 + U(-f, f)``, independently
    per camera. A camera's offset from an exact look-at-origin pose (roll, off-centre aim) is kept:
    ``c2w' = look_at(p') @ look_at(p)^-1 @ c2w``. Elevations are kept inside (-89, 89) degrees.
    """
    if azimuth_deg == 0 and elevation_deg == 0 and distance_frac == 0:
        return c2w
    c2w64 = c2w.double()
    pos = c2w64[..., :3, 3]
    dist = pos.norm(dim=-1)
    az = torch.atan2(pos[..., 1], pos[..., 0])
    el = torch.asin((pos[..., 2] / dist).clamp(-1.0, 1.0))
    dev = generator.device if generator is not None else c2w.device

    def u(scale: float) -> torch.Tensor:
        r = torch.rand(pos.shape[:-1], generator=generator, device=dev, dtype=torch.float64).to(c2w.device)
        return (2.0 * r - 1.0) * scale

    az = az + torch.deg2rad(u(azimuth_deg))
    lim = math.radians(89.0)
    el = (el + torch.deg2rad(u(elevation_deg))).clamp(-lim, lim)
    dist = dist * (1.0 + u(distance_frac))
    new_pos = torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1)
    new_pos = new_pos * dist[..., None]
    offset = torch.linalg.solve(look_at(pos), c2w64)
    return (look_at(new_pos) @ offset).to(c2w.dtype)


def camera_tensors(cameras, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cameras.Camera`` objects (a list of V, or a list of B lists of V) -> ``c2w`` ``[B, V, 4, 4]``, ``K``
    ``[B, V, 3, 3]`` (float32); a ``(c2w, K)`` pair of tensors passes through with a batch dim added if missing."""
    if isinstance(cameras, (tuple, list)) and len(cameras) == 2 and all(torch.is_tensor(c) for c in cameras):
        c2w, k = cameras
        if c2w.dim() == 3:
            c2w, k = c2w[None], (k[None] if k.dim() >= 3 else k)
        return c2w.to(device=device, dtype=torch.float32), k.to(device=device, dtype=torch.float32)
    groups = cameras if isinstance(cameras[0], (list, tuple)) else [cameras]
    c2w = torch.as_tensor(np.array([[c.c2w for c in g] for g in groups]), dtype=torch.float32, device=device)
    k = torch.as_tensor(np.array([[c.K for c in g] for g in groups]), dtype=torch.float32, device=device)
    return c2w, k


# ------------------------------------------------------------------------------------------------------- features
@dataclass
class ViewFeatures:
    """Per-view feature maps ``[B, V, C, h, w]`` covering view images of ``width x height`` pixels."""

    maps: torch.Tensor
    width: int
    height: int


class ConditionVolume(nn.Module):
    """2D backbone per view + projection + shared MLP + masked max over views: features for any 3D points.

    Typical use: ``vf = cv.encode_views(views)`` once, then ``cv.features_at(points, vf, c2w, K)`` for dense
    ``[B, N, 3]`` points (-> ``[B, N, F]``) or packed ``[N, 3]`` points with ``batch_index`` (-> ``[N, F]``), or
    ``cv.dense(vf, c2w, K, R)`` (-> ``[B, F, R, R, R]``, indexed [x, y, z]).
    """

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.image_features)
        c = self.backbone.out_channels
        self.feature_proj = nn.Conv2d(c, cfg.mlp_hidden, 1)  # the MLP's first layer on the feature term
        self.dir_proj = nn.Linear(3, cfg.mlp_hidden, bias=False)  # ... and on the viewing direction
        self.mlp_out = nn.Linear(cfg.mlp_hidden, cfg.feature_channels)
        self.out_channels = cfg.feature_channels

    def encode_views(self, views: torch.Tensor) -> ViewFeatures:
        """Views ``[B, V, 3, H, W]`` in [0, 1] -> hidden-width maps (backbone + the MLP's first linear layer)."""
        if views.dim() != 5 or views.shape[2] != 3:
            raise ValueError(f"views must be [B, V, 3, H, W], got shape {tuple(views.shape)}")
        b, v, _, h, w = views.shape
        maps = self.feature_proj(self.backbone(views.reshape(b * v, 3, h, w)))
        return ViewFeatures(maps.reshape(b, v, *maps.shape[1:]), w, h)

    def _dense_points(self, points: torch.Tensor, vf: ViewFeatures, c2w: torch.Tensor, K) -> torch.Tensor:  # noqa: N803
        values, valid, _ = sample_views_at(points, vf.maps, c2w, K, (vf.width, vf.height))
        centres = c2w[..., :3, 3].to(points.dtype)  # [B, V, 3]
        dirs = F.normalize(points[:, None] - centres[:, :, None], dim=-1)  # [B, V, N, 3]
        hidden = F.silu(values + self.dir_proj(dirs.to(values.dtype)))
        return masked_view_max(self.mlp_out(hidden), valid)

    def features_at(
        self,
        points: torch.Tensor,
        vf: ViewFeatures,
        c2w: torch.Tensor,
        K: torch.Tensor,  # noqa: N803
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features of world points: ``[B, N, 3]`` -> ``[B, N, F]``; packed ``[N, 3]`` + ``batch_index``
        ``[N]`` -> ``[N, F]``. ``c2w`` ``[B, V, 4, 4]``, ``K`` ``[3, 3]`` / ``[B, 3, 3]`` / ``[B, V, 3, 3]``."""
        if batch_index is None:
            return self._dense_points(points, vf, c2w, K)
        if points.dim() != 2 or points.shape[-1] != 3 or batch_index.shape != points.shape[:1]:
            raise ValueError(
                f"packed points must be [N, 3] with batch_index [N], got {tuple(points.shape)}, "
                f"{tuple(batch_index.shape)}"
            )
        k = _expand_k(K, c2w)
        out = points.new_zeros(points.shape[0], self.out_channels)
        for b in range(c2w.shape[0]):
            rows = (batch_index == b).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            vf_b = ViewFeatures(vf.maps[b : b + 1], vf.width, vf.height)
            feats = self._dense_points(points[rows][None], vf_b, c2w[b : b + 1], k[b : b + 1])[0]
            out = out.index_copy(0, rows, feats.to(out.dtype))
        return out

    def dense(self, vf: ViewFeatures, c2w: torch.Tensor, K: torch.Tensor, resolution: int) -> torch.Tensor:  # noqa: N803
        """Pooled features at every cell centre of an ``R^3`` grid: ``[B, F, R, R, R]`` indexed [x, y, z]."""
        b = c2w.shape[0]
        pts = grid_centres(resolution, device=c2w.device)[None].expand(b, -1, -1)
        feats = self._dense_points(pts, vf, c2w, K)  # [B, R^3, F]
        r = resolution
        return feats.transpose(1, 2).reshape(b, self.out_channels, r, r, r)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        g = next(g for g in (8, 4, 2, 1) if c_out % g == 0)
        super().__init__(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(g, c_out), nn.SiLU())


class DenseConditionPyramid(nn.Module):
    """Small 3D CNN: pooled volume ``[B, F, R, R, R]`` -> one volume per level, ``level_channels[l]`` channels at
    ``R / 2^l`` (level 0 at full resolution; each further level one stride-2 convolution down)."""

    def __init__(self, in_channels: int, level_channels: list[int]):
        super().__init__()
        if not level_channels:
            raise ValueError("condition.level_channels must list one width per UNet level")
        self.levels = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(level_channels):
            self.levels.append(nn.Sequential(_ConvBlock(c_prev, c, 1 if i == 0 else 2), _ConvBlock(c, c, 1)))
            c_prev = c
        self.out_channels = list(level_channels)

    def forward(self, volume: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], volume
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out
