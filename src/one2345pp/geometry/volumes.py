"""Ground-truth volumes of a normalised mesh: the coarse occupancy shell (stage 2) and the fine SDF + colour support
(stage 3).

Grids cover the cube [-0.5, 0.5]^3. At resolution R, cell ``i`` has its centre at ``-0.5 + (i + 0.5) / R`` on each
axis and arrays are indexed ``[x, y, z]``. The coarse grid has ``R = cfg.coarse_resolution`` (64) and the fine grid
``F = R * cfg.fine_factor`` (128).

* Coarse occupancy SHELL: a coarse cell is occupied when ``|SDF(centre)| < cfg.shell_threshold / R`` (the threshold is
  in coarse voxels; at least sqrt(3)/2 guarantees that every surface point lies in an occupied cell).
* Fine support: the ``fine_factor^3`` children of every occupied coarse cell, each with its signed distance (negative
  inside, normalised units, not truncated) and the RGB of the nearest surface point.

How it is computed
------------------
1. Distances, coarse to fine. Unsigned distances (open3d ``RaycastingScene``) are queried at the centres of an 8^3 grid,
   and a cell is split into its 8 children only when some coarse-grid centre inside it could still be near the surface
   (Lipschitz bound: ``udf(descendant) >= udf(centre) - |offset|``). At the coarse resolution this leaves the
   candidate cells (a superset of the shell), whose fine children are then queried once (closest point, face,
   barycentrics). Only cells near the surface are ever queried.
2. Sign by flood fill (in the spirit of ``mesh2sdf``'s "fix" mode; it does not need a watertight or consistently
   oriented mesh). Fine cells whose centre is within ``WALL_VOXELS`` (0.87 > sqrt(3)/2) fine voxels of a triangle are
   "walls": every cell a surface passes through is one, so every other cell is free of surface. Free cells are labelled
   into 6-connected components (``scipy.ndimage.label``); components that touch the grid border are exterior, the others
   interior. A free cell's sign is its component's. A wall cell's sign comes from probes: walk from its centre along
   a direction and take the label of the first free cell reached before the ray meets any triangle (checked by ray
   casting), which is therefore on the same side. The direction is straight away from the closest surface point; where
   that finds no free cell within 4 fine voxels (just inside an edge, in thin parts) the 26 grid directions vote; what
   is still unresolved takes the majority of its free 26-neighbours, else exterior.
3. Internal faces. Parts that were simply concatenated (a union of overlapping primitives) leave faces inside the solid.
   Triangles are sampled on a lattice about one fine voxel apart; a sample is "outer" when an exterior free cell lies
   within ``NEAR_EXTERIOR_VOXELS`` (2) fine voxels of its cell. Triangles with every sample outer are kept, triangles
   with none are dropped, and mixed ones are split along the lattice, keeping the sub-triangles that touch an outer
   sample. When anything was dropped, distances, closest points and colours are taken against the kept surface only
   (a second ``RaycastingScene``), and only for the points whose closest triangle was not kept whole. The shell and the
   fine support come from those distances; the signs stay those of step 2.

Properties and limitations
--------------------------
* Face orientation is never used: flipped or inconsistently oriented faces give the same volumes.
* Holes are sealed by construction when every point of them lies within 0.87 fine voxels of their rim (slits up to
  ~1.7 fine voxels wide, triangular holes with sides up to ~3 fine voxels); through wider holes the exterior flows in,
  so the inside of such an object is exterior (positive SDF) and the volume describes the visible surface only.
* Closed cavities (a hollow ball) are filled: they are interior and their faces count as internal.
* Parts thinner than about 2.5 fine voxels (2 to 3 depending on how they sit on the grid) hold no free interior cell:
  their cells are exterior (positive SDF) while the shell still follows them; the same holds for thin wedges of solid
  between an internal face and the outer surface next to a crease. Open surfaces (a single plane) are exterior on both
  sides.
* Internal faces within about two fine voxels of the exterior (near the crease where two parts meet) are kept, so the
  shell may bulge by a voxel or two there; at very sharp concave creases a sliver of outer surface may be dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..utils.optional import require
from .mesh import Mesh
from .raycasting import build_scene, to_o3d

WALL_VOXELS = 0.87  # fine voxels; > sqrt(3)/2, so every cell a surface passes through is a wall
NEAR_EXTERIOR_VOXELS = 2  # a face sample is outer when an exterior free cell lies within this many fine cells
PROBE_STEPS = np.arange(1, 9) * 0.5  # fine voxels walked from a wall cell's centre, away from its closest point


@dataclass
class VolumeConfig:
    coarse_resolution: int = 64  # occupancy shell grid; cell i has centre -0.5 + (i + 0.5) / R
    fine_factor: int = 2  # fine support = children of occupied coarse cells at R * fine_factor (128^3)
    # A coarse cell is occupied when |SDF| at its centre < shell_threshold coarse voxels. Any threshold of at least
    # sqrt(3)/2 = 0.866 guarantees every surface point lies in an occupied cell; 1.0 is close to LAS-Diffusion's
    # |SDF_128| < 1/32 in a [-1, 1] frame max-pooled to 64^3.
    shell_threshold: float = 1.0
    # SDF truncation used by the fine stage, in normalised units (LAS-Diffusion clips at 0.05 in [-1, 1]^3, which is
    # 0.025 in our [-0.5, 0.5]^3). Stored SDF values are not clipped; the value is recorded in meta.json.
    sdf_truncation: float = 0.025


_HALF_DIAG = math.sqrt(3.0) / 2.0
_EPS = 1e-6  # slack for open3d's float32 distances
_CHUNK = 1 << 20  # lattice points per batch when sampling faces


@dataclass
class Volumes:
    """Ground truth of one object: coarse occupancy shell and fine sparse SDF + colour."""

    occ: np.ndarray  # uint8 [R, R, R], 1 = occupied shell cell
    coords: np.ndarray  # int16 [M, 3] fine indices, lexicographically sorted: children of the occupied cells
    sdf: np.ndarray  # float32 [M], normalised units, negative inside, not truncated
    rgb: np.ndarray  # uint8 [M, 3], colour of the nearest surface point
    shell_threshold: float  # normalised units (cfg.shell_threshold / R)
    coarse_resolution: int
    fine_resolution: int


def grid_centers(resolution: int, indices: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """Cell centres ``-0.5 + (i + 0.5) / resolution``.

    [N, 3] for integer ``indices`` [N, 3] (any resolution's indices, e.g. fine coords), else the full grid [R, R, R, 3]
    indexed ``[x, y, z]``.
    """
    if indices is None:
        r = np.arange(resolution)
        indices = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1)
    return (-0.5 + (np.asarray(indices, dtype=np.float64) + 0.5) / resolution).astype(dtype)


def _full_grid(resolution: int) -> np.ndarray:
    r = np.arange(resolution)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)


def _children(indices: np.ndarray, factor: int) -> np.ndarray:
    """The ``factor^3`` children of each cell, grouped by parent ([N * factor^3, 3])."""
    return (indices[:, None, :] * factor + _full_grid(factor)[None]).reshape(-1, 3)


class _Surface:
    """A RaycastingScene with a thread count."""

    def __init__(self, mesh: Mesh, threads: int):
        self.scene = build_scene(mesh)
        self.threads = int(threads)

    def distance(self, points: np.ndarray) -> np.ndarray:
        if len(points) == 0:
            return np.zeros(0)
        return self.scene.compute_distance(to_o3d(points), nthreads=self.threads).numpy().astype(np.float64)

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unsigned distance, closest point, triangle id and barycentrics (b1, b2) for each point."""
        if len(points) == 0:
            return np.zeros(0), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros((0, 2), np.float32)
        res = self.scene.compute_closest_points(to_o3d(points), nthreads=self.threads)
        q = res["points"].numpy().astype(np.float64)
        prim = res["primitive_ids"].numpy().astype(np.int64)
        uv = res["primitive_uvs"].numpy().astype(np.float32)
        return np.linalg.norm(points - q, axis=1), q, prim, uv

    def first_hit(self, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        rays = np.concatenate([origins, directions], axis=1)
        return self.scene.cast_rays(to_o3d(rays), nthreads=self.threads)["t_hit"].numpy()


def _candidate_cells(surface: _Surface, resolution: int, threshold: float) -> tuple[np.ndarray, ...]:
    """Coarse cells whose centre is within ``threshold`` of the surface, found coarse to fine.

    Returns their indices, unsigned distances and closest triangle ids.
    """
    r = resolution
    while r % 2 == 0 and r // 2 >= 8:
        r //= 2
    idx = _full_grid(r)
    while r < resolution:
        d = surface.distance(grid_centers(r, idx))
        reach = _HALF_DIAG * (1.0 / r - 1.0 / resolution)  # farthest descendant centre at the target resolution
        idx = _children(idx[d - reach < threshold + _EPS], 2)
        r *= 2
    d, _, prim, _ = surface.closest(grid_centers(resolution, idx, np.float64))
    keep = d < threshold
    return idx[keep], d[keep], prim[keep]


class _SideGrid:
    """Flood-fill labels of the fine grid, stored on the bounding box of the walls plus a free margin.

    ``side``: 0 wall, +1 exterior free cell, -1 interior free cell; everything outside the box is exterior.
    """

    def __init__(self, wall_indices: np.ndarray, resolution: int):
        self.resolution = resolution
        if len(wall_indices) == 0:
            self.lo = np.zeros(3, np.int64)
            self.side = np.ones((1, 1, 1), np.int8)
            return
        self.lo = np.maximum(wall_indices.min(0) - 1, 0)
        hi = np.minimum(wall_indices.max(0) + 2, resolution)
        wall = np.zeros(tuple(hi - self.lo), dtype=bool)
        wall[tuple((wall_indices - self.lo).T)] = True
        labels, count = ndimage.label(~wall)
        border = np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])
        exterior = np.zeros(count + 1, dtype=bool)
        exterior[border] = True
        exterior[0] = False
        self.side = np.where(wall, 0, np.where(exterior[labels], 1, -1)).astype(np.int8)

    def _lookup(self, grid: np.ndarray, indices: np.ndarray, outside) -> np.ndarray:
        x, y, z = (indices - self.lo).T
        sx, sy, sz = grid.shape
        inside = (x >= 0) & (x < sx) & (y >= 0) & (y < sy) & (z >= 0) & (z < sz)
        out = np.full(len(indices), outside, dtype=grid.dtype)
        out[inside] = grid[x[inside], y[inside], z[inside]]
        return out

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """Side (0 / +1 / -1) of fine cells given by integer indices [N, 3] (any, even outside the grid)."""
        return self._lookup(self.side, indices, 1)

    def near_exterior(self, radius: int):
        """A lookup telling, for fine cells [N, 3], whether an exterior free cell lies within ``radius`` cells."""
        near = ndimage.maximum_filter((self.side == 1).view(np.uint8), size=2 * radius + 1, mode="constant", cval=1)
        return lambda indices: self._lookup(near.view(bool), indices, True)


def _cells_of(points: np.ndarray, resolution: int) -> np.ndarray:
    return np.clip(np.floor((points + 0.5) * resolution), 0, resolution - 1).astype(np.int64)


def _lattice(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric weights [P, 3] of the points (a, b) / n, a + b <= n, and the n^2 sub-triangles [T, 3] they form."""
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = (a + b) <= n
    a, b = a[keep], b[keep]
    weights = np.stack([n - a - b, a, b], axis=1) / n
    lookup = -np.ones((n + 1, n + 1), np.int64)
    lookup[a, b] = np.arange(len(a))
    up = (a + b) <= n - 1
    down = (a + b) <= n - 2
    ua, ub, da, db = a[up], b[up], a[down], b[down]
    tris = np.concatenate(
        [
            np.stack([lookup[ua, ub], lookup[ua + 1, ub], lookup[ua, ub + 1]], axis=1),
            np.stack([lookup[da + 1, db], lookup[da + 1, db + 1], lookup[da, db + 1]], axis=1),
        ]
    )
    return weights, tris


@dataclass
class _OuterSurface:
    """The kept (outer) triangles: whole original faces first, then sub-triangles of split faces."""

    surface: _Surface
    whole: np.ndarray  # bool [F]: original face kept whole
    parent: np.ndarray  # int64 [P]: original face of each outer triangle
    corner_weights: np.ndarray  # float64 [S, 3, 3]: parent barycentric weights of each sub-triangle's corners
    n_whole: int

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distance, original face id and original-face barycentrics (b1, b2) of the closest outer point."""
        d, _, prim, uv = self.surface.closest(points)
        face = self.parent[prim]
        bary = uv.astype(np.float64)
        sub = prim >= self.n_whole
        if sub.any():
            w = np.stack([1.0 - uv[sub, 0] - uv[sub, 1], uv[sub, 0], uv[sub, 1]], axis=1)
            bary[sub] = np.einsum("nk,nkc->nc", w, self.corner_weights[prim[sub] - self.n_whole])[:, 1:]
        return d, face, bary.astype(np.float32)


def _outer_surface(mesh: Mesh, grid: _SideGrid, resolution: int, threads: int) -> _OuterSurface | None:
    """Drop internal faces (see the module docstring); None when every face is outer."""
    near = grid.near_exterior(NEAR_EXTERIOR_VOXELS)
    tri = mesh.vertices[mesh.faces]
    edges = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(axis=1)
    n_per_face = np.maximum(np.ceil(edges * resolution), 1).astype(np.int64)
    any_near = np.zeros(mesh.num_faces, dtype=bool)
    all_near = np.zeros(mesh.num_faces, dtype=bool)
    sub_verts, sub_parent, sub_weights = [], [], []
    vertex_near = near(_cells_of(mesh.vertices, resolution))
    for n in np.unique(n_per_face):
        weights, sub_tris = _lattice(int(n))
        sub_w = weights[sub_tris]  # [T, 3, 3]
        samples = np.concatenate([weights, sub_w.mean(axis=1)])  # lattice points, then sub-triangle centroids
        faces = np.nonzero(n_per_face == n)[0]
        step = max(1, _CHUNK // len(samples))
        for start in range(0, len(faces), step):
            ids = faces[start : start + step]
            if n == 1:  # small faces (most meshes): corners from the per-vertex flags, plus the centroid
                centroid = near(_cells_of(tri[ids].mean(axis=1), resolution))
                corners = vertex_near[mesh.faces[ids]][:, np.argmax(weights, axis=1)]
                is_near = np.concatenate([corners, centroid[:, None]], axis=1)
            else:
                pts = np.einsum("pk,fkc->fpc", samples, tri[ids])
                is_near = near(_cells_of(pts.reshape(-1, 3), resolution)).reshape(len(ids), len(samples))
            any_near[ids] = is_near.any(axis=1)
            all_near[ids] = is_near.all(axis=1)
            mixed = np.nonzero(any_near[ids] & ~all_near[ids])[0]
            if len(mixed) == 0:
                continue
            corner_near = is_near[mixed][:, : len(weights)][:, sub_tris].any(axis=2)  # [m, T]
            keep = corner_near | is_near[mixed][:, len(weights) :]
            fi, ti = np.nonzero(keep)
            sub_verts.append(np.einsum("nkj,njc->nkc", sub_w[ti], tri[ids[mixed[fi]]]))
            sub_parent.append(ids[mixed[fi]])
            sub_weights.append(sub_w[ti])
    if all_near.all() or not any_near.any():
        return None
    whole_ids = np.nonzero(all_near)[0]
    verts = [mesh.vertices]
    faces = [mesh.faces[whole_ids]]
    parent = [whole_ids]
    weights = np.zeros((0, 3, 3))
    if sub_verts:
        sv = np.concatenate(sub_verts).reshape(-1, 3)
        verts.append(sv)
        faces.append(mesh.num_vertices + np.arange(len(sv)).reshape(-1, 3))
        parent.extend(sub_parent)
        weights = np.concatenate(sub_weights)
    outer = Mesh(np.concatenate(verts), np.concatenate(faces))
    return _OuterSurface(_Surface(outer, threads), all_near, np.concatenate(parent), weights, len(whole_ids))


def _probe(surface: _Surface, grid: _SideGrid, points: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Side (+1 / -1) of the first free cell met walking from each point along its direction before the ray hits any
    triangle (so on the point's own side), or 0 when the walk finds none."""
    resolution = grid.resolution
    t_hit = surface.first_hit(points, directions)
    steps = PROBE_STEPS / resolution
    probes = points[:, None, :] + steps[None, :, None] * directions[:, None, :]
    cells = np.floor((probes + 0.5) * resolution).astype(np.int64)
    side = grid.lookup(cells.reshape(-1, 3)).reshape(len(points), len(steps))
    valid = (side != 0) & (steps[None, :] < t_hit[:, None])
    first = np.argmax(valid, axis=1)
    return np.where(valid.any(axis=1), side[np.arange(len(points)), first], 0).astype(np.int8)


def _wall_signs(
    surface: _Surface, grid: _SideGrid, points: np.ndarray, closest: np.ndarray, indices: np.ndarray
) -> np.ndarray:
    """Signs (+1 / -1) of wall cells.

    A probe directly away from the closest surface point; where it finds no free cell (near edges, in thin parts) the
    majority of probes along the 26 grid directions; then the majority of free 26-neighbours; else exterior.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, np.int8)
    away = points - closest
    length = np.linalg.norm(away, axis=1)
    away = np.divide(away, length[:, None], out=np.zeros_like(away), where=length[:, None] > 0)
    away[length <= 0] = (1.0, 0.0, 0.0)  # on the surface: any direction is as good
    sign = _probe(surface, grid, points, away)
    offsets = _full_grid(3) - 1
    offsets = offsets[np.any(offsets != 0, axis=1)]
    todo = np.nonzero(sign == 0)[0]
    if len(todo):
        dirs = offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
        pts = np.repeat(points[todo], len(dirs), axis=0)
        votes = _probe(surface, grid, pts, np.tile(dirs, (len(todo), 1))).reshape(len(todo), -1)
        sign[todo] = np.sign(votes.astype(np.int64).sum(axis=1))
    todo = np.nonzero(sign == 0)[0]
    if len(todo):
        votes = grid.lookup((indices[todo, None, :] + offsets[None]).reshape(-1, 3)).reshape(len(todo), -1)
        sign[todo] = np.where(votes.astype(np.int64).sum(axis=1) < 0, -1, 1)
    return sign


def _check(mesh: Mesh) -> None:
    if mesh.num_faces == 0:
        raise ValueError(f"{mesh.source or '<mesh>'}: no faces to compute volumes from")
    lo, hi = mesh.bounds
    if lo.min() < -0.5 - 1e-6 or hi.max() > 0.5 + 1e-6:
        raise ValueError(
            f"{mesh.source or '<mesh>'}: vertices must lie inside [-0.5, 0.5]^3 (normalise the mesh first), "
            f"got bounds {lo.round(4).tolist()} .. {hi.round(4).tolist()}"
        )


def compute_volumes(mesh: Mesh, cfg: VolumeConfig, threads: int = 0) -> Volumes:
    """Coarse occupancy shell and fine SDF + colour support of a normalised mesh (see the module docstring).

    ``threads`` is open3d's thread count (0 = all cores).
    """
    require("open3d")
    _check(mesh)
    coarse = int(cfg.coarse_resolution)
    factor = int(cfg.fine_factor)
    fine = coarse * factor
    shell = float(cfg.shell_threshold) / coarse
    wall = WALL_VOXELS / fine
    surface = _Surface(mesh, threads)

    # 1. candidates: coarse cells holding either a shell centre or a wall cell among their children
    reach = wall + _HALF_DIAG * (1.0 / coarse - 1.0 / fine)
    cand, cand_dist, cand_face = _candidate_cells(surface, coarse, max(shell, reach) + _EPS)
    n_child = factor**3
    fine_idx = _children(cand, factor)
    points = grid_centers(fine, fine_idx, np.float64)
    dist_all, closest_all, face_all, bary_all = surface.closest(points)

    # 2. flood fill on the fine grid
    grid = _SideGrid(fine_idx[dist_all <= wall], fine)

    # 3. internal faces: distances against the outer surface where the closest face was not kept whole
    outer = _outer_surface(mesh, grid, fine, threads)
    if outer is not None:
        redo = ~outer.whole[cand_face]
        cand_dist[redo] = outer.closest(grid_centers(coarse, cand[redo], np.float64))[0]
    occupied = cand_dist < shell
    rows = (np.nonzero(occupied)[0][:, None] * n_child + np.arange(n_child)).reshape(-1)
    idx, pts = fine_idx[rows], points[rows]
    dist, face, bary = dist_all[rows], face_all[rows], bary_all[rows]
    if outer is not None:
        redo = np.nonzero(~outer.whole[face])[0]
        dist[redo], face[redo], bary[redo] = outer.closest(pts[redo])

    # signs: flood-fill label for free cells, probes for walls
    sign = grid.lookup(idx)
    walls = np.nonzero(sign == 0)[0]
    sign[walls] = _wall_signs(surface, grid, pts[walls], closest_all[rows][walls], idx[walls])
    rgb = np.clip(np.round(mesh.display_color(face, bary) * 255.0), 0, 255).astype(np.uint8)

    order = np.argsort((idx[:, 0] * fine + idx[:, 1]) * fine + idx[:, 2], kind="stable")
    occ = np.zeros((coarse,) * 3, dtype=np.uint8)
    occ[tuple(cand[occupied].T)] = 1
    return Volumes(
        occ=occ,
        coords=idx[order].astype(np.int16),
        sdf=(sign[order] * dist[order]).astype(np.float32),
        rgb=rgb[order],
        shell_threshold=shell,
        coarse_resolution=coarse,
        fine_resolution=fine,
    )
