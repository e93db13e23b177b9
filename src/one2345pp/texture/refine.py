"""Texture refinement (METHOD.md, stage 4): fit a colour field to views of a mesh whose geometry stays fixed.

The mesh is rasterised once in every view (the six generated views and the input view at its pose); the visible
surface point of each pixel inside the view's mask, the ray direction through it and the pixel's colour become one
training sample. Adam then minimises the (view-weighted) L2 between the field's colour at the sampled points and the
pixels, ``batch_pixels`` random samples per step, with an exponentially decaying learning rate and an optional
total-variation term on the field's grids.

Views are float images composited on a gray ``background`` with their alpha beside them (the layout of
:mod:`one2345pp.data.decode`). A pixel is inside the mask where the rasteriser sees the mesh and the alpha exceeds
``mask_threshold``; its target colour is un-composited, ``(rgb - (1 - a) * background) / a``, so anti-aliased
silhouette pixels supervise the surface colour rather than a mix with the background.

The same code serves the pipeline (a generated mesh and generated views) and the training stage
(:mod:`one2345pp.stages.texture`: ground-truth meshes and views, PSNR on a held-out view).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cameras import Camera
from ..geometry.mesh import Mesh
from ..models.color_field import ColorField, ColorFieldConfig
from ..rendering.rasterizer import Rasterization, Rasterizer, RasterMesh, interpolate, make_rasterizer

__all__ = [
    "RefineConfig",
    "RefineResult",
    "SurfaceView",
    "View",
    "image_to_view",
    "look",
    "psnr",
    "refine_texture",
    "render_field",
    "vertex_normals",
    "view_psnr",
]

PRECISIONS = ("auto", "fp32", "bf16")
DIRECTIONS = ("view", "normal")


@dataclass
class RefineConfig:
    iterations: int = 300  # Adam steps
    batch_pixels: int = 16384  # random surface samples per step (0 = all of them every step)
    lr: float = 0.03  # learning rate of the planes and lines
    decoder_lr: float = 0.003  # learning rate of the basis and the MLP
    lr_decay: float = 0.1  # learning rates decay exponentially to this fraction at the last step
    tv_weight: float = 0.0  # total variation of the field's grids
    mask_threshold: float = 0.5  # pixels with alpha above this (and seen by the rasteriser) supervise the field
    input_view_weight: float = 1.0  # weight of the input view's pixels relative to the generated views'
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    seed: int = 0  # field initialisation and pixel sampling
    progress: bool = True  # progress bar
    # torch CPU threads while refining on the CPU (restored afterwards; 0 leaves torch's setting). The steps are
    # small (one batch of points through a few grid lookups), so one thread loses little on an idle machine and
    # avoids OpenMP barriers stalling on a busy one: 20 s instead of 153 s per refinement measured on a shared
    # 2-core machine (benchmarks/bench_texture.py).
    threads: int = 1


def check_config(cfg: RefineConfig) -> None:
    if cfg.iterations < 0 or cfg.batch_pixels < 0:
        raise ValueError(
            f"refine.iterations and refine.batch_pixels must be >= 0, got {cfg.iterations}, {cfg.batch_pixels}"
        )
    if cfg.lr <= 0 or cfg.decoder_lr <= 0 or not 0 < cfg.lr_decay <= 1:
        raise ValueError(
            f"refine.lr, refine.decoder_lr must be > 0 and refine.lr_decay in (0, 1], got {cfg.lr}, "
            f"{cfg.decoder_lr}, {cfg.lr_decay}"
        )
    if cfg.tv_weight < 0 or cfg.input_view_weight < 0 or not 0 <= cfg.mask_threshold < 1:
        raise ValueError("refine.tv_weight and refine.input_view_weight must be >= 0, refine.mask_threshold in [0, 1)")
    if cfg.threads < 0:
        raise ValueError(f"refine.threads must be >= 0 (0 = torch's setting), got {cfg.threads}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"refine.precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")


@dataclass
class View:
    """One supervising image: its camera, RGB composited on ``background`` and alpha."""

    camera: Camera
    image: torch.Tensor  # float [3, H, W] in [0, 1]
    alpha: torch.Tensor  # float [1, H, W] in [0, 1]
    background: float = 0.5
    weight: float = 1.0  # relative weight of its pixels in the loss

    def __post_init__(self):
        h, w = self.camera.height, self.camera.width
        if tuple(self.image.shape) != (3, h, w) or tuple(self.alpha.shape) != (1, h, w):
            raise ValueError(
                f"view image {tuple(self.image.shape)} / alpha {tuple(self.alpha.shape)} do not match the camera's "
                f"{w}x{h} pixels (expected [3, {h}, {w}] and [1, {h}, {w}])"
            )


@dataclass
class SurfaceView:
    """What one camera sees of a mesh: its rasterisation and, per visible pixel, the surface sample."""

    rast: Rasterization  # batch of one
    index: torch.Tensor  # int64 [P]: flat pixel indices (row-major) of the visible pixels
    points: torch.Tensor  # float32 [P, 3] surface points
    directions: torch.Tensor  # float32 [P, 3] unit ray directions (camera -> surface)
    normals: torch.Tensor  # float32 [P, 3] unit interpolated vertex normals


@dataclass
class RefineResult:
    field: ColorField
    losses: list[float] = field(default_factory=list)  # training loss every step
    samples: int = 0  # supervising pixels
    seconds: float = 0.0


def vertex_normals(mesh: RasterMesh) -> torch.Tensor:
    """Area-weighted unit vertex normals [V, 3] of the prepared mesh (a zero normal where no face has area)."""
    v, f = mesh.vertices, mesh.faces
    tri = v[f]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = torch.zeros_like(v)
    for k in range(3):
        vn.index_add_(0, f[:, k], n)
    return torch.nn.functional.normalize(vn, dim=-1)


def look(rasterizer: Rasterizer, mesh: RasterMesh, camera: Camera, normals: torch.Tensor | None = None) -> SurfaceView:
    """Rasterise ``mesh`` in ``camera`` and gather the surface sample of every visible pixel."""
    rast = rasterizer.rasterize(mesh, [camera])
    normals = vertex_normals(mesh) if normals is None else normals
    attrs = interpolate(torch.cat([mesh.vertices, normals], dim=1), mesh.faces, rast)[0]  # [H, W, 6]
    hit = rast.mask[0].reshape(-1)
    index = torch.nonzero(hit).squeeze(1)
    flat = attrs.reshape(-1, 6)[index]
    points = flat[:, :3].contiguous()
    origin = torch.as_tensor(camera.position, dtype=points.dtype, device=points.device)
    directions = torch.nn.functional.normalize(points - origin, dim=-1)
    nrm = torch.nn.functional.normalize(flat[:, 3:], dim=-1)
    return SurfaceView(rast, index, points, directions, nrm)


def _unit_or_none(d: torch.Tensor, field: ColorField) -> torch.Tensor | None:
    return d if field.cfg.view_dependent else None


def _targets(view: View, sv: SurfaceView, threshold: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool [P], un-composited target colours [P', 3]) of the visible pixels of ``view``."""
    rgb = view.image.to(device, torch.float32).reshape(3, -1).t()[sv.index]
    a = view.alpha.to(device, torch.float32).reshape(-1)[sv.index]
    keep = a > threshold
    a = a[keep, None]
    target = ((rgb[keep] - (1.0 - a) * float(view.background)) / a).clamp(0.0, 1.0)
    return keep, target


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        use_bf16 = False
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def refine_texture(
    mesh: Mesh | RasterMesh,
    views: Sequence[View],
    field_cfg: ColorFieldConfig | None = None,
    cfg: RefineConfig | None = None,
    rasterizer: Rasterizer | None = None,
    device: torch.device | str | None = None,
) -> RefineResult:
    """Fit a new colour field (flat gray at the start) to ``views`` of the fixed ``mesh``.

    Gradients are enabled inside even when the caller runs under ``torch.no_grad`` / ``torch.inference_mode``
    (Lightning's validation loop), since refinement is an optimisation of its own."""
    cfg = cfg if cfg is not None else RefineConfig()
    check_config(cfg)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = rasterizer.device if rasterizer is not None else torch.device("cpu")
    threads = cfg.threads if dev.type == "cpu" else 0
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _refine(mesh, views, field_cfg, cfg, rasterizer, device)
    finally:
        if threads > 0:
            torch.set_num_threads(previous)


def _refine(
    mesh: Mesh | RasterMesh,
    views: Sequence[View],
    field_cfg: ColorFieldConfig | None,
    cfg: RefineConfig | None,
    rasterizer: Rasterizer | None,
    device: torch.device | str | None,
) -> RefineResult:
    cfg = cfg if cfg is not None else RefineConfig()
    check_config(cfg)
    if not views:
        raise ValueError("texture refinement needs at least one view")
    if rasterizer is None:
        rasterizer = make_rasterizer("auto", device)
    device = torch.device(device) if device is not None else rasterizer.device
    t0 = time.perf_counter()
    rmesh = mesh if isinstance(mesh, RasterMesh) else rasterizer.prepare(mesh)
    normals = vertex_normals(rmesh)

    points, dirs, colors, weights = [], [], [], []
    for view in views:
        sv = look(rasterizer, rmesh, view.camera, normals)
        keep, target = _targets(view, sv, cfg.mask_threshold, device)
        points.append(sv.points[keep].to(device))
        dirs.append(sv.directions[keep].to(device))
        colors.append(target)
        weights.append(torch.full((len(target),), float(view.weight), device=device))
    pts, dirs_t, cols, wts = (torch.cat(x) for x in (points, dirs, colors, weights))
    total = int(pts.shape[0])
    if total == 0:
        raise ValueError("no view sees the mesh inside its mask: check the cameras, the mesh scale and the alphas")
    if float(wts.sum()) <= 0:
        raise ValueError("every supervising pixel has weight 0: check refine.input_view_weight and the view weights")

    gen = torch.Generator().manual_seed(cfg.seed)
    fld = ColorField(field_cfg, generator=gen).to(device)
    opt = torch.optim.Adam(
        [{"params": fld.grid_parameters(), "lr": cfg.lr}, {"params": fld.decoder_parameters(), "lr": cfg.decoder_lr}],
        betas=(0.9, 0.99),
    )
    steps = max(cfg.iterations, 1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay ** (1.0 / steps))
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    batch = total if cfg.batch_pixels == 0 else min(cfg.batch_pixels, total)
    result = RefineResult(fld, samples=total)

    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.iterations), desc="texture refine", disable=not cfg.progress, leave=False)
    for it in bar:
        idx = torch.randint(total, (batch,), generator=sample_gen, device=device) if batch < total else None
        p, d, c, w = (x if idx is None else x[idx] for x in (pts, dirs_t, cols, wts))
        with _autocast(device, cfg.precision):
            pred = fld(p, _unit_or_none(d, fld))
        loss = (w * (pred.float() - c).square().mean(-1)).sum() / w.sum()
        if cfg.tv_weight > 0:
            loss = loss + cfg.tv_weight * fld.tv_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"texture refinement diverged at step {it} (loss {value}); lower refine.lr")
        result.losses.append(value)
        if cfg.progress and it % 10 == 0:
            bar.set_postfix(loss=f"{value:.5f}", psnr=f"{psnr_from_mse(value):.2f}")
    bar.close()
    fld.eval()
    result.seconds = time.perf_counter() - t0
    return result


def psnr_from_mse(mse: float) -> float:
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of colours in [0, 1] (any matching shapes)."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr of shapes {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("psnr of no pixels")
    return psnr_from_mse(float((pred.float() - target.float()).square().mean()))


def render_field(
    fld: ColorField,
    rasterizer: Rasterizer,
    mesh: RasterMesh,
    camera: Camera,
    direction: str = "view",
    background: float = 0.5,
    normals: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The field's colours on the visible surface: RGB [3, H, W] on ``background`` and the hit mask [1, H, W].

    ``direction="view"`` queries with the camera rays' directions (what refinement fits); ``"normal"`` with the
    reversed surface normal, i.e. looking straight at the surface (what baking stores)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    sv = look(rasterizer, mesh, camera, normals)
    dirs = sv.directions if direction == "view" else -sv.normals
    dev = next(fld.parameters()).device
    rgb = fld.query(sv.points.to(dev), _unit_or_none(dirs.to(dev), fld)).to(sv.points.device)
    h, w = camera.height, camera.width
    img = torch.full((h * w, 3), float(background), device=rgb.device)
    img[sv.index] = rgb
    return img.t().reshape(3, h, w), sv.rast.mask[0][None]


def view_psnr(
    fld: ColorField,
    rasterizer: Rasterizer,
    mesh: RasterMesh,
    view: View,
    mask_threshold: float = 0.5,
    direction: str = "view",
) -> float:
    """PSNR of the field against ``view`` over the pixels that would supervise it (hit and alpha > threshold)."""
    sv = look(rasterizer, mesh, view.camera)
    dev = next(fld.parameters()).device
    keep, target = _targets(view, sv, mask_threshold, dev)
    if not bool(keep.any()):
        raise ValueError("the view sees none of the mesh inside its mask")
    dirs = sv.directions if direction == "view" else -sv.normals
    pred = fld.query(sv.points[keep].to(dev), _unit_or_none(dirs[keep].to(dev), fld))
    return psnr(pred, target)


def image_to_view(rgba: np.ndarray, camera: Camera, background: float = 0.5, weight: float = 1.0) -> View:
    """A :class:`View` from a straight-alpha RGBA float image [H, W, 4] (e.g. a ``RenderOutput.rgba``)."""
    x = torch.as_tensor(np.asarray(rgba, dtype=np.float32)).permute(2, 0, 1)
    a = x[3:4]
    rgb = x[:3] * a + float(background) * (1.0 - a)
    return View(camera, rgb.contiguous(), a.contiguous(), background, weight)
