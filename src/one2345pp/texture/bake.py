"""Baking a colour field onto a mesh: a UV texture (xatlas unwrap, UV-space rasterisation) or vertex colours.

The field is queried with the surface normal as the view direction (looking straight at the surface, i.e. the
direction ``-n``), as the method bakes its TensoRF field (METHOD.md, stage 4); a view-independent field ignores it.

Texture mode:

1. xatlas cuts the mesh into charts and packs them into the unit square with ``padding`` texels between charts at
   ``texture_size`` (vertices are split along chart seams; ``vmapping`` maps them back to the input vertices);
2. the charts are rasterised in UV space: every texel centre inside a triangle becomes a surface point (position
   and normal interpolated with the texel's barycentrics) and gets the field's colour there;
3. texels outside the charts within ``dilation`` texels of one take the colour of the nearest chart texel, so
   bilinear lookups and mip levels at chart borders do not pull in the background (no seams); the rest of the
   image takes the mean chart colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.mesh import Mesh
from ..models.color_field import ColorField
from ..rendering.rasterizer import Rasterizer, RasterMesh, interpolate, make_rasterizer
from .export import TexturedMesh
from .refine import vertex_normals

__all__ = ["BAKE_MODES", "BakeConfig", "bake", "bake_texture", "bake_vertex_colors", "dilate", "unwrap"]

BAKE_MODES = ("texture", "vertex")


@dataclass
class BakeConfig:
    mode: str = "texture"  # "texture" (xatlas UV atlas + PNG) or "vertex" (vertex colours)
    texture_size: int = 1024  # texture width and height in texels
    padding: int = 4  # texels between charts in the xatlas packing
    dilation: int = 16  # texels past chart borders filled with the nearest chart colour


def check_config(cfg: BakeConfig) -> None:
    if cfg.mode not in BAKE_MODES:
        raise ValueError(f"bake.mode must be one of {', '.join(BAKE_MODES)}, got {cfg.mode!r}")
    if cfg.texture_size < 8 or cfg.padding < 0 or cfg.dilation < 0:
        raise ValueError(
            f"bake.texture_size must be >= 8 and bake.padding, bake.dilation >= 0, got {cfg.texture_size}, "
            f"{cfg.padding}, {cfg.dilation}"
        )


def _xatlas():
    try:
        import xatlas
    except ImportError as exc:
        raise ImportError(
            f"xatlas could not be imported ({exc}); texture baking needs it for the UV unwrap: `pip install xatlas` "
            "(or bake vertex colours with bake.mode=vertex)"
        ) from exc
    return xatlas


def unwrap(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas of a triangle mesh -> ``(vmapping [V'], faces [F, 3], uvs [V', 2])``.

    Output vertex ``i`` is input vertex ``vmapping[i]``; faces keep their order; uvs lie in [0, 1]^2."""
    xatlas = _xatlas()
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, new_faces, uvs = atlas[0]
    if len(new_faces) != len(faces):
        raise ValueError(f"xatlas returned {len(new_faces)} faces for {len(faces)} input faces")
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float64)


def dilate(colors: np.ndarray, covered: np.ndarray, dilation: int) -> np.ndarray:
    """Fill texels outside ``covered`` [H, W] of ``colors`` [H, W, C]: within ``dilation`` texels (Euclidean) of a
    covered texel with the nearest one's colour, further out with the mean covered colour."""
    if covered.all() or not covered.any():
        return colors
    from scipy import ndimage

    dist, (iy, ix) = ndimage.distance_transform_edt(~covered, return_indices=True)
    out = colors.copy()
    near = ~covered & (dist <= dilation)
    out[near] = colors[iy[near], ix[near]]
    out[~covered & ~near] = colors[covered].mean(axis=0)
    return out


def _prepared(mesh: Mesh | RasterMesh, rasterizer: Rasterizer) -> RasterMesh:
    return mesh if isinstance(mesh, RasterMesh) else rasterizer.prepare(mesh)


def _device(field: ColorField) -> torch.device:
    return next(field.parameters()).device


def _query(field: ColorField, points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    dev = _device(field)
    dirs = -normals.to(dev) if field.cfg.view_dependent else None
    return field.query(points.to(dev), dirs).clamp(0.0, 1.0).cpu()


def bake_vertex_colors(
    field: ColorField, mesh: Mesh | RasterMesh, rasterizer: Rasterizer | None = None
) -> TexturedMesh:
    """Vertex colours: the field at every vertex, looking along the reversed vertex normal."""
    rasterizer = rasterizer if rasterizer is not None else make_rasterizer("auto", _device(field))
    rm = _prepared(mesh, rasterizer)
    normals = vertex_normals(rm)
    colors = _query(field, rm.vertices, normals)
    return TexturedMesh(
        rm.vertices.cpu().numpy(), rm.faces.cpu().numpy(), normals.cpu().numpy(), vertex_colors=colors.numpy()
    )


def bake_texture(
    field: ColorField, mesh: Mesh | RasterMesh, cfg: BakeConfig | None = None, rasterizer: Rasterizer | None = None
) -> TexturedMesh:
    """A UV-textured copy of ``mesh`` whose texture holds the field's colours (see the module docstring)."""
    cfg = cfg if cfg is not None else BakeConfig()
    check_config(cfg)
    rasterizer = rasterizer if rasterizer is not None else make_rasterizer("auto", _device(field))
    rm = _prepared(mesh, rasterizer)
    normals = vertex_normals(rm)
    vertices, faces = rm.vertices.cpu().numpy(), rm.faces.cpu().numpy()
    vmapping, new_faces, uvs = unwrap(vertices, faces, cfg.texture_size, cfg.padding)

    size = cfg.texture_size
    rast = rasterizer.rasterize_uv(uvs[new_faces], size, size)
    vm = torch.as_tensor(vmapping, device=rm.vertices.device)
    # positions and normals per split vertex; faces of the split mesh keep the input's order, so the face id of a
    # texel indexes the input faces too
    attrs = torch.cat([rm.vertices[vm], normals[vm]], dim=1)
    nf = torch.as_tensor(new_faces, device=rm.vertices.device)
    surf = interpolate(attrs, nf, rast)[0].reshape(-1, 6)  # [H*W, 6]
    covered = rast.mask[0].reshape(-1)
    idx = torch.nonzero(covered).squeeze(1)
    pts = surf[idx, :3]
    nrm = torch.nn.functional.normalize(surf[idx, 3:], dim=-1)
    colors = np.zeros((size * size, 3), dtype=np.float32)
    colors[idx.cpu().numpy()] = _query(field, pts, nrm).numpy()
    covered_img = covered.cpu().numpy().reshape(size, size)
    image = dilate(colors.reshape(size, size, 3), covered_img, cfg.dilation)
    texture = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return TexturedMesh(vertices[vmapping], new_faces, normals.cpu().numpy()[vmapping], uvs, texture)


def bake(
    field: ColorField, mesh: Mesh | RasterMesh, cfg: BakeConfig | None = None, rasterizer: Rasterizer | None = None
) -> TexturedMesh:
    """Bake by ``cfg.mode``: a UV texture or vertex colours."""
    cfg = cfg if cfg is not None else BakeConfig()
    check_config(cfg)
    if cfg.mode == "vertex":
        return bake_vertex_colors(field, mesh, rasterizer)
    return bake_texture(field, mesh, cfg, rasterizer)
