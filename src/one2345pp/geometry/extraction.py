"""Mesh extraction from the fine stage's sparse SDF and colour (METHOD.md, stage 3 "Mesh").

1. :func:`scatter_to_grid`: the sparse cells' SDF goes into a dense ``R^3`` grid. Cells outside the support are empty:
   an empty cell connected to the grid border through empty cells (6-connectivity) is outside and gets
   ``+truncation``; an enclosed empty cell (the inside of the shell) gets ``-truncation``.
2. :func:`marching_cubes` at ``level`` (0) with ``skimage.measure.marching_cubes`` on the grid padded by one cell of
   ``+truncation`` (so surfaces touching the border close). Vertices are mapped to the ``[-0.5, 0.5]^3`` frame with
   the cell-centre convention of :mod:`one2345pp.cameras` (cell ``i`` has its centre at ``-0.5 + (i + 0.5) / R``);
   faces are wound counter-clockwise seen from outside (normals point to positive SDF).
3. :func:`largest_component` keeps the connected component with the most faces.
4. :func:`sample_colors`: vertex colours by trilinear interpolation of the colour volume, using only cells of the
   support (weights renormalised); a vertex with no support cell among its 8 neighbours takes the nearest one's.
5. :func:`cleanup` with pymeshlab: merge close vertices, remove duplicate faces and vertices, remove components
   smaller than a fraction of the faces, optional quadric decimation to a target face count. Where pymeshlab is not
   installed (the GPU machines of ``benchmarks/bench_gpu.py``), the same steps but decimation run in numpy
   (:func:`cleanup_numpy`); decimation then is an error.

:func:`extract_mesh` runs all of it and returns a :class:`~one2345pp.geometry.mesh.Mesh` with per-corner colours,
ready for :func:`one2345pp.geometry.mesh_io.save_mesh` (PLY, OBJ or GLB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..utils.optional import require
from .mesh import Material, Mesh

log = logging.getLogger(__name__)
_warned_numpy = False  # the numpy cleanup's warning is logged once per process

SNAP = 0.01  # grid values closer to the level than SNAP * truncation are pushed off it (see marching_cubes)


@dataclass
class ExtractionConfig:
    resolution: int = 128  # cells per axis of the fine grid covering [-0.5, 0.5]^3
    # SDF value of empty cells, in the units of the given SDF: the fine stage predicts the SDF truncated and scaled to
    # [-1, 1], so 1. Outside empty cells get +truncation, enclosed ones -truncation.
    truncation: float = 1.0
    level: float = 0.0  # iso-value of the surface
    keep_largest_component: bool = True
    merge_distance: float = 0.01  # fine voxels: vertices closer than this are merged
    min_component_fraction: float = 0.01  # components with fewer faces than this fraction of all faces are removed
    target_faces: int | None = None  # quadric edge-collapse decimation to about this many faces (None: keep all)


@dataclass
class Grids:
    sdf: np.ndarray  # float32 [R, R, R], indexed [x, y, z]
    colors: np.ndarray | None  # float32 [R, R, R, 3] in [0, 1] (meaningful where known)
    known: np.ndarray  # bool [R, R, R]: cells of the sparse support


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy() if a.dtype.is_floating_point else a.detach().cpu().numpy()
    return np.asarray(a)


def scatter_to_grid(coords, sdf, resolution: int, truncation: float = 1.0, colors=None) -> Grids:
    """Dense SDF (and colour) grid from sparse cells ``coords`` [N, 3] (fine indices), ``sdf`` [N], ``colors``
    [N, 3] in [0, 1]; empty cells get ``+truncation`` outside and ``-truncation`` where enclosed by the support."""
    coords = _as_numpy(coords).astype(np.int64)
    sdf = _as_numpy(sdf).astype(np.float32).reshape(-1)
    r = int(resolution)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be [N, 3] fine-grid indices, got shape {coords.shape}")
    if len(sdf) != len(coords):
        raise ValueError(f"{len(sdf)} SDF values for {len(coords)} cells")
    if len(coords) and (coords.min() < 0 or coords.max() >= r):
        raise ValueError(f"cell indices span [{coords.min()}, {coords.max()}], outside a {r}^3 grid")
    if truncation <= 0:
        raise ValueError(f"truncation must be positive, got {truncation}")
    known = np.zeros((r, r, r), dtype=bool)
    known[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    grid = np.full((r, r, r), truncation, dtype=np.float32)
    labels, _ = ndimage.label(~known)  # 6-connected components of empty cells
    border = np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])
    enclosed = (labels > 0) & ~np.isin(labels, np.unique(border[border > 0]))
    grid[enclosed] = -truncation
    grid[coords[:, 0], coords[:, 1], coords[:, 2]] = sdf
    col_grid = None
    if colors is not None:
        colors = _as_numpy(colors).astype(np.float32).reshape(len(coords), -1)[:, :3]
        col_grid = np.zeros((r, r, r, 3), dtype=np.float32)
        col_grid[coords[:, 0], coords[:, 1], coords[:, 2]] = np.clip(colors, 0.0, 1.0)
    return Grids(grid, col_grid, known)


def marching_cubes(
    grid: np.ndarray, level: float = 0.0, pad_value: float | None = None, snap: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of ``grid`` [R, R, R] at ``level`` -> (vertices float64 [V, 3] in [-0.5, 0.5]^3, faces int64
    [F, 3]), faces counter-clockwise seen from the side of values above ``level``. Raises ValueError when ``level``
    is not crossed.

    Values closer than ``snap`` to ``level`` are moved to ``level +- snap`` (sign kept, exact hits go outside) so no
    vertex lands on a cell centre: that would make needle triangles which vertex merging can flip."""
    try:
        from skimage import measure
    except ImportError as exc:
        raise ImportError(f"scikit-image is needed for marching cubes ({exc}): `pip install scikit-image`") from exc
    r = grid.shape[0]
    if grid.shape != (r, r, r):
        raise ValueError(f"marching cubes needs a cubic grid, got shape {grid.shape}")
    lo, hi = float(grid.min()), float(grid.max())
    if not lo < level < hi:
        raise ValueError(f"the SDF never crosses level {level} (values in [{lo:.4g}, {hi:.4g}]): no surface")
    pad = max(hi, level + 1.0) if pad_value is None else pad_value
    grid = grid.astype(np.float32)
    if snap > 0:
        near = np.abs(grid - level) < snap
        grid[near] = np.where(grid[near] < level, level - snap, level + snap)
    padded = np.pad(grid, 1, constant_values=pad)
    verts, faces, _, _ = measure.marching_cubes(padded, level=level, gradient_direction="descent")
    verts = -0.5 + (verts.astype(np.float64) - 1.0 + 0.5) / r
    return verts, faces.astype(np.int64)


def largest_component(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The connected component (through shared vertices) with the most faces -> (vertices, faces, kept vertex ids)."""
    n = len(verts)
    if len(faces) == 0:
        return verts, faces, np.arange(n)
    a = np.concatenate([faces[:, 0], faces[:, 1]])
    b = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    best = np.bincount(face_label).argmax()
    keep_faces = faces[face_label == best]
    used = np.unique(keep_faces)
    remap = np.full(n, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return verts[used], remap[keep_faces], used


def sample_colors(grids: Grids, verts: np.ndarray) -> np.ndarray:
    """Trilinear colours [V, 3] of the support cells around each vertex (``verts`` in the [-0.5, 0.5]^3 frame)."""
    if grids.colors is None:
        raise ValueError("no colour volume: pass colors to scatter_to_grid")
    r = grids.known.shape[0]
    p = (verts + 0.5) * r - 0.5  # continuous cell-index coordinates
    i0 = np.floor(p).astype(np.int64)
    t = p - i0
    acc = np.zeros((len(verts), 3))
    wsum = np.zeros(len(verts))
    for corner in np.ndindex(2, 2, 2):
        c = np.asarray(corner)
        idx = i0 + c
        inside = ((idx >= 0) & (idx < r)).all(axis=1)
        idx = np.clip(idx, 0, r - 1)
        w = np.prod(np.where(c == 1, t, 1.0 - t), axis=1) * inside
        w = w * grids.known[idx[:, 0], idx[:, 1], idx[:, 2]]
        acc += w[:, None] * grids.colors[idx[:, 0], idx[:, 1], idx[:, 2]]
        wsum += w
    out = np.zeros((len(verts), 3))
    ok = wsum > 1e-8
    out[ok] = acc[ok] / wsum[ok, None]
    if (~ok).any():
        cells = np.argwhere(grids.known)
        _, nearest = cKDTree(cells).query(p[~ok])
        c = cells[nearest]
        out[~ok] = grids.colors[c[:, 0], c[:, 1], c[:, 2]]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def cleanup(
    verts: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None = None,
    *,
    merge_distance: float = 0.0,
    min_component_fraction: float = 0.0,
    target_faces: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """pymeshlab cleanup -> (vertices, faces, vertex colours or None). ``merge_distance`` is absolute (same units
    as ``verts``); components with fewer than ``min_component_fraction * F`` faces are removed. Without pymeshlab:
    :func:`cleanup_numpy` (a warning, once), unless ``target_faces`` asks for decimation."""
    try:
        ml = require("pymeshlab")
    except ImportError:
        if target_faces is not None:
            raise
        global _warned_numpy
        if not _warned_numpy:
            log.warning("pymeshlab is not installed: mesh cleanup runs in numpy (no decimation)")
            _warned_numpy = True
        return cleanup_numpy(
            verts, faces, colors, merge_distance=merge_distance, min_component_fraction=min_component_fraction
        )
    kwargs = {"vertex_matrix": np.asarray(verts, np.float64), "face_matrix": np.asarray(faces, np.int32)}
    if colors is not None:
        rgba = np.concatenate([colors, np.ones((len(colors), 1), np.float32)], axis=1)
        kwargs["v_color_matrix"] = rgba.astype(np.float64)
    ms = ml.MeshSet()
    ms.add_mesh(ml.Mesh(**kwargs))
    if merge_distance > 0:
        absolute = getattr(ml, "PureValue", None) or ml.AbsoluteValue  # renamed in pymeshlab 2023.12
        ms.meshing_merge_close_vertices(threshold=absolute(float(merge_distance)))
        ms.meshing_remove_null_faces()
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_duplicate_vertices()
    ms.meshing_remove_unreferenced_vertices()
    if min_component_fraction > 0:
        min_faces = int(np.ceil(min_component_fraction * ms.current_mesh().face_number()))
        if min_faces > 1:
            ms.meshing_remove_connected_component_by_face_number(mincomponentsize=min_faces, removeunref=True)
    if target_faces is not None:
        if target_faces < 4:
            raise ValueError(f"target_faces must be at least 4, got {target_faces}")
        if ms.current_mesh().face_number() > target_faces:
            ms.meshing_decimation_quadric_edge_collapse(
                targetfacenum=int(target_faces), preservenormal=True, optimalplacement=True, autoclean=True
            )
            ms.meshing_remove_unreferenced_vertices()
    m = ms.current_mesh()
    out_colors = m.vertex_color_matrix()[:, :3].astype(np.float32) if colors is not None else None
    return m.vertex_matrix().astype(np.float64), m.face_matrix().astype(np.int64), out_colors


def cleanup_numpy(
    verts: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None = None,
    *,
    merge_distance: float = 0.0,
    min_component_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`cleanup` without pymeshlab and without decimation: vertices closer than ``merge_distance`` merge into
    the lowest-numbered one of their cluster, faces that lose a corner and repeated faces (same corners in any order;
    the first is kept) go, then components with fewer than ``min_component_fraction * F`` faces and unreferenced
    vertices."""
    verts = np.asarray(verts, np.float64)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    n = len(verts)
    if merge_distance > 0 and n > 1:
        pairs = cKDTree(verts).query_pairs(float(merge_distance), output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, label = connected_components(graph, directed=False)
        first = np.full(label.max() + 1, n, dtype=np.int64)
        np.minimum.at(first, label, np.arange(n))
        faces = first[label][faces]
        ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        faces = faces[ok]
    _, keep = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    faces = faces[np.sort(keep)]
    if min_component_fraction > 0 and len(faces):
        min_faces = int(np.ceil(min_component_fraction * len(faces)))
        if min_faces > 1:
            a = np.concatenate([faces[:, 0], faces[:, 1]])
            b = np.concatenate([faces[:, 1], faces[:, 2]])
            _, label = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)))
            face_label = label[faces[:, 0]]
            faces = faces[np.bincount(face_label)[face_label] >= min_faces]
    used = np.unique(faces)
    remap = np.full(n, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    out_colors = np.asarray(colors, np.float32)[used] if colors is not None else None
    return verts[used], remap[faces], out_colors


def to_mesh(verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None, source: str = "") -> Mesh:
    """A :class:`Mesh` with vertex colours as corner colours under a white material (grey when uncoloured)."""
    if colors is None:
        return Mesh(verts, faces, source=source)
    rgba = np.concatenate([colors, np.ones((len(colors), 1), np.float32)], axis=1)
    return Mesh(
        verts, faces, corner_colors=rgba[faces], materials=[Material("vertex_colors", [1, 1, 1, 1])], source=source
    )


def extract_mesh(coords, sdf, colors=None, cfg: ExtractionConfig | None = None, source: str = "") -> Mesh:
    """Sparse fine cells (``coords`` [N, 3], ``sdf`` [N], optional ``colors`` [N, 3] in [0, 1]) -> coloured mesh."""
    cfg = cfg or ExtractionConfig()
    if not -cfg.truncation < cfg.level < cfg.truncation:
        raise ValueError(
            f"level {cfg.level} must lie strictly inside (-truncation, truncation) = "
            f"({-cfg.truncation}, {cfg.truncation})"
        )
    grids = scatter_to_grid(coords, sdf, cfg.resolution, cfg.truncation, colors)
    verts, faces = marching_cubes(grids.sdf, cfg.level, pad_value=cfg.truncation, snap=SNAP * cfg.truncation)
    if cfg.keep_largest_component:
        verts, faces, _ = largest_component(verts, faces)
    vcol = sample_colors(grids, verts) if colors is not None else None
    verts, faces, vcol = cleanup(
        verts,
        faces,
        vcol,
        merge_distance=cfg.merge_distance / cfg.resolution,
        min_component_fraction=cfg.min_component_fraction,
        target_faces=cfg.target_faces,
    )
    if len(faces) == 0:
        raise ValueError(f"mesh extraction of {source or 'the volume'} left no faces after cleanup")
    return to_mesh(verts, faces, vcol, source)


def extract_meshes(x, cfg: ExtractionConfig | None = None) -> list[Mesh]:
    """One mesh per sample of a fine-stage output :class:`~one2345pp.sparse.tensor.SparseTensor` at stride 1 with
    features ``[SDF, R, G, B]`` in [-1, 1] (SDF scaled by the truncation; colours map to [0, 1] by ``(c + 1) / 2``).
    Without colour channels the meshes are uncoloured."""
    if x.stride != 1 or x.num_channels < 1:
        raise ValueError(f"extract_meshes needs a stride-1 tensor with SDF (+ RGB) channels, got {x!r}")
    meshes = []
    for i, (coords, feats) in enumerate(x.unbind()):
        colors = (feats[:, 1:4].float().clamp(-1, 1) + 1) / 2 if x.num_channels >= 4 else None
        meshes.append(extract_mesh(coords, feats[:, 0], colors, cfg, source=f"sample {i}"))
    return meshes
