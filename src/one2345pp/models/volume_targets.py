"""Ground-truth targets of the 3D stages at the model's resolution, from the volumes stored in the shards.

Shards store the occupancy shell at ``R_d`` (64) and the fine SDF / colour of the ``2^3`` children of every shell
cell at ``F_d = 2 R_d`` (128), see :mod:`one2345pp.geometry.volumes`. A model may run at a coarser grid (the tiny
preset: 32^3 / 64^3); then

* :func:`reduce_occupancy` max-pools the shell by ``R_d / R`` (a cell is occupied when any of its sub-cells is; every
  surface point still lies in an occupied cell, as LAS-Diffusion builds its 64^3 shell from 128^3);
* :func:`reduce_fine` averages the SDF and colour of the ``f^3`` children of every fine cell (``f = F_d / F``): the
  cell centre of the coarser grid is the common corner of those children, where the trilinear interpolation of their
  values is their mean. Cells whose children are not all stored stay unknown.

The fine stage's support is the children of occupied coarse cells. In training it is built from the ground truth
with the shell threshold jittered per coarse cell (METHOD.md, stage 3: +-30%), which needs the SDF of cells the
shards do not store (neighbours of the shell, and at a reduced resolution the children of occupied cells that are not
themselves shell cells). :func:`extend_sdf` fills them ring by ring from their face neighbours with the first-order
upwind solution of the eikonal equation ``|grad d| = 1`` (the update of fast marching), the sign taken from those
neighbours. The sign propagates exactly: every cell the shards do not store has ``|SDF|`` above one fine voxel (at
the stored resolution its coarse parent is outside the shell, ``|SDF(parent centre)| >= 1`` coarse voxel, and the
child's centre is ``sqrt(3)/4`` coarse voxel from it; at a reduced resolution the cell itself is outside the stored
shell), while two face neighbours on opposite sides of the surface have ``|SDF|`` summing to at most one voxel. The
magnitudes are estimates (exact for planes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "children_coords",
    "extend_sdf",
    "fine_targets",
    "reduce_factor",
    "reduce_fine",
    "reduce_occupancy",
    "training_support",
]

_FAR = 1e3  # magnitude given to cells the extension could not reach (only possible in degenerate inputs)


def reduce_factor(data_resolution: int, model_resolution: int, what: str) -> int:
    """Integer factor ``data_resolution / model_resolution`` or a ValueError naming ``what``."""
    if model_resolution < 1 or data_resolution % model_resolution:
        raise ValueError(
            f"{what}: the shards hold {data_resolution}^3 grids, which cannot be reduced to {model_resolution}^3 "
            f"(the model's resolution must divide the data's); rebuild the shards or change the model resolution"
        )
    return data_resolution // model_resolution


def reduce_occupancy(occ: torch.Tensor, resolution: int) -> torch.Tensor:
    """Occupancy ``[B, 1, R_d, R_d, R_d]`` in {-1, +1} -> ``[B, 1, R, R, R]`` (max-pooled by ``R_d / R``)."""
    f = reduce_factor(occ.shape[-1], resolution, "occupancy (occ.npz)")
    return occ if f == 1 else F.max_pool3d(occ, f)


def reduce_fine(
    coords: torch.Tensor, sdf: torch.Tensor, rgb: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed fine cells ``coords`` int [N, 4] (batch first), ``sdf`` [N], ``rgb`` [N, 3] -> the cells of the grid
    ``factor`` times coarser whose ``factor^3`` children are all given, with the children's mean SDF and colour."""
    if factor == 1:
        return coords, sdf, rgb
    c = coords.long()
    parent = torch.cat([c[:, :1], c[:, 1:] // factor], dim=1)
    size = int(parent[:, 1:].max()) + 1 if len(parent) else 1
    key = ((parent[:, 0] * size + parent[:, 1]) * size + parent[:, 2]) * size + parent[:, 3]
    ukey, inverse = torch.unique(key, return_inverse=True)
    uniq = torch.stack([ukey // size**3, (ukey // size**2) % size, (ukey // size) % size, ukey % size], dim=1)
    count = torch.zeros(len(uniq), device=sdf.device).index_add_(0, inverse, torch.ones_like(sdf))
    s = torch.zeros(len(uniq), device=sdf.device, dtype=sdf.dtype).index_add_(0, inverse, sdf) / count.clamp(min=1)
    col = torch.zeros(len(uniq), 3, device=rgb.device, dtype=rgb.dtype).index_add_(0, inverse, rgb)
    col = col / count.clamp(min=1)[:, None]
    full = count == factor**3
    return uniq[full].to(coords.dtype), s[full], col[full]


def children_coords(coarse: torch.Tensor, factor: int) -> torch.Tensor:
    """Coarse cells ``[M, 4]`` (batch first) -> their ``factor^3`` children ``[M * factor^3, 4]``, grouped by parent."""
    r = torch.arange(factor, device=coarse.device)
    off = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    ch = coarse[:, None, 1:].long() * factor + off[None]
    b = coarse[:, None, :1].long().expand(-1, off.shape[0], 1)
    return torch.cat([b, ch], dim=-1).reshape(-1, 4).to(coarse.dtype)


def _eikonal(a: torch.Tensor, h: float) -> torch.Tensor:
    """First-order upwind solution of ``sum_i ((d - a_i)^+)^2 = h^2`` for per-axis neighbour values ``a`` [..., 3]
    (``inf`` where an axis has no known neighbour)."""
    a, _ = torch.sort(a, dim=-1)
    a1, a2, a3 = a.unbind(-1)
    d = a1 + h
    two = d > a2
    s2 = a1 + a2
    disc2 = (2 * h * h - (a1 - a2) ** 2).clamp(min=0)
    d = torch.where(two, (s2 + disc2.sqrt()) / 2, d)
    three = two & (d > a3)
    s3 = s2 + a3
    disc3 = (s3 * s3 - 3 * (a1 * a1 + a2 * a2 + a3 * a3 - h * h)).clamp(min=0)
    return torch.where(three, (s3 + disc3.sqrt()) / 3, d)


def extend_sdf(
    known: torch.Tensor,
    sdf: torch.Tensor,
    rgb: torch.Tensor,
    region: torch.Tensor,
    voxel: float,
    max_rings: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill the SDF and colour of the ``region`` cells not ``known`` (dense ``[R, R, R]`` grids, ``rgb``
    ``[R, R, R, 3]``), ring by ring from their face neighbours: magnitude from the upwind eikonal update with cell
    size ``voxel``, sign of the neighbours' SDF sum, colour the neighbours' mean. Returns ``(sdf, rgb, assigned)``;
    region cells that no ring reached keep ``assigned`` False.

    Works on flat indices of the grid padded by one cell, touching only the cells still to fill."""
    r = known.shape[0]
    p = r + 2
    pad = (1, 1, 1, 1, 1, 1)
    assigned = F.pad(known, pad).reshape(-1).clone()
    s = F.pad(torch.where(known, sdf, torch.zeros_like(sdf)), pad).reshape(-1).clone()
    col = F.pad(torch.where(known[..., None], rgb, torch.zeros_like(rgb)).movedim(-1, 0), pad).reshape(3, -1).clone()
    todo = torch.nonzero((F.pad(region, pad) & ~F.pad(known, pad)).reshape(-1)).squeeze(1)
    offsets = torch.tensor([1, -1, p, -p, p * p, -p * p], device=known.device)
    for _ in range(max_rings):
        if todo.numel() == 0:
            break
        nb = todo[:, None] + offsets[None]  # [T, 6]: x+-, y+-, z+- neighbours (never outside the padded grid)
        ok = assigned[nb]
        n = ok.sum(1)
        ring = n > 0
        if not ring.any():
            break
        idx, nb, ok, n = todo[ring], nb[ring], ok[ring], n[ring]
        mag = torch.where(ok, s[nb].abs(), torch.full_like(s[nb], float("inf")))
        per_axis = torch.minimum(mag[:, 0::2], mag[:, 1::2])  # [T, 3]
        d = _eikonal(per_axis, voxel)
        sign_sum = torch.where(ok, s[nb], torch.zeros_like(mag)).sum(1)
        w = ok.to(col.dtype)
        c = (col[:, nb] * w[None]).sum(-1) / n.to(col.dtype)[None]  # [3, T]
        s[idx] = torch.where(sign_sum < 0, -d, d)
        col[:, idx] = c
        assigned[idx] = True
        todo = todo[~ring]
    inner = (slice(1, -1),) * 3
    return (
        s.reshape(p, p, p)[inner],
        col.reshape(3, p, p, p)[(slice(None), *inner)].movedim(0, -1),
        assigned.reshape(p, p, p)[inner],
    )


def _dense(coords: torch.Tensor, values: torch.Tensor, resolution: int, fill: float = 0.0) -> torch.Tensor:
    shape = (resolution,) * 3 + tuple(values.shape[1:])
    out = values.new_full(shape, fill)
    c = coords.long()
    out[c[:, 0], c[:, 1], c[:, 2]] = values
    return out


def training_support(
    occ: torch.Tensor,
    coords: torch.Tensor,
    sdf: torch.Tensor,
    rgb: torch.Tensor,
    factor: int,
    shell_threshold: float,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support and ground truth of the fine stage for a batch, at the model's resolutions.

    ``occ`` ``[B, 1, C, C, C]`` in {-1, +1} (the shell at the model's coarse resolution); ``coords`` int ``[N, 4]``
    (batch first), ``sdf`` ``[N]`` (normalised units), ``rgb`` ``[N, 3]``: the known fine cells at ``F = factor * C``.
    With ``jitter`` j > 0 every coarse cell draws ``u ~ U(-j, j)`` and its threshold is
    ``shell_threshold * (1 + u) / C``: a shell cell is dropped when ``u < 0`` and its (estimated) ``|SDF|`` at the
    centre, the mean of its children's, reaches the threshold; a neighbour of the shell is added when ``u > 0`` and
    its ``|SDF|`` is below it. ``jitter = 0`` gives the children of the shell cells. Returns the children of the
    selected cells ``[M, 4]`` (grouped by parent, parents in ``(batch, x, y, z)`` order), their SDF ``[M]`` and
    colour ``[M, 3]`` (stored or extended, see :func:`extend_sdf`).
    """
    b, c = occ.shape[0], occ.shape[-1]
    fine = c * factor
    voxel = 1.0 / fine
    out_c, out_s, out_rgb = [], [], []
    cube = torch.ones(1, 1, 3, 3, 3, device=occ.device)
    for i in range(b):
        occupied = occ[i, 0] > 0
        rows = coords[:, 0] == i
        known = _dense(coords[rows, 1:], torch.ones(int(rows.sum()), dtype=torch.bool, device=occ.device), fine, 0)
        s = _dense(coords[rows, 1:], sdf[rows].float(), fine)
        col = _dense(coords[rows, 1:], rgb[rows].float(), fine)
        if jitter > 0:
            cand = F.conv3d(occupied[None, None].float(), cube, padding=1)[0, 0] > 0
        else:
            cand = occupied
        region = cand.repeat_interleave(factor, 0).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        s, col, assigned = extend_sdf(known, s, col, region, voxel, max_rings=4 * factor)
        s = torch.where(assigned, s, torch.full_like(s, _FAR))
        centre = s.reshape(c, factor, c, factor, c, factor).mean(dim=(1, 3, 5)).abs()
        if jitter > 0:
            u = (
                torch.rand(cand.shape, generator=generator, device="cpu" if generator is None else generator.device).to(
                    occ.device
                )
                * 2
                - 1
            ) * jitter
            thr = shell_threshold * (1 + u) / c
            below = centre < thr
            selected = cand & torch.where(occupied, (u >= 0) | below, (u > 0) & below)
        else:
            selected = occupied
        parents = torch.nonzero(selected)
        parents = torch.cat([torch.full_like(parents[:, :1], i), parents], dim=1)
        ch = children_coords(parents, factor)
        x, y, z = ch[:, 1], ch[:, 2], ch[:, 3]
        out_c.append(ch.to(torch.int32))
        out_s.append(s[x, y, z])
        out_rgb.append(col[x, y, z])
    return torch.cat(out_c), torch.cat(out_s), torch.cat(out_rgb)


def fine_targets(sdf: torch.Tensor, rgb: torch.Tensor, truncation: float) -> torch.Tensor:
    """x0 of the fine diffusion ``[N, 4]``: SDF scaled by the truncation and clipped to [-1, 1], RGB in [-1, 1]."""
    return torch.cat([(sdf / truncation).clamp(-1.0, 1.0)[:, None], rgb.clamp(-1.0, 1.0)], dim=1)
