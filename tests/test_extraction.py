"""Mesh extraction from sparse SDF + colour cells: analytic spheres against their known radius and colours."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from one2345pp.geometry.extraction import (
    ExtractionConfig,
    cleanup,
    cleanup_numpy,
    extract_mesh,
    extract_meshes,
    marching_cubes,
    sample_colors,
    scatter_to_grid,
)
from one2345pp.geometry.mesh_io import load_mesh, save_mesh
from one2345pp.sparse import SparseTensor

R = 64
TRUNC_VOXELS = 2.0  # the SDF is truncated at 2 voxels and scaled to [-1, 1], as the fine stage predicts it


def cell_centres(res=R):
    idx = np.argwhere(np.ones((res, res, res), dtype=bool))
    return idx, -0.5 + (idx + 0.5) / res


def sphere_cells(radius, centre=(0.0, 0.0, 0.0), res=R):
    """Sparse cells within TRUNC_VOXELS of a sphere: (coords [N, 3], scaled SDF [N], colours [N, 3])."""
    idx, p = cell_centres(res)
    d = np.linalg.norm(p - np.asarray(centre), axis=1) - radius
    sel = np.abs(d) < TRUNC_VOXELS / res
    colors = np.clip(p[sel] + 0.5, 0.0, 1.0)  # colour = position: trilinear interpolation reproduces it
    return idx[sel], np.clip(d[sel] / (TRUNC_VOXELS / res), -1.0, 1.0), colors


def components(mesh) -> int:
    f = mesh.faces
    a, b = np.concatenate([f[:, 0], f[:, 1]]), np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(mesh.num_vertices, mesh.num_vertices))
    return connected_components(graph, directed=False)[0] - (mesh.num_vertices - len(np.unique(f)))


def vertex_colors(mesh):
    """(positions [3F, 3], colours [3F, 3]) per face corner."""
    return mesh.vertices[mesh.faces].reshape(-1, 3), mesh.corner_colors.reshape(-1, 4)[:, :3]


def test_scatter_fills_outside_and_enclosed_cells():
    coords, sdf, _ = sphere_cells(0.3)
    grids = scatter_to_grid(coords, sdf, R, truncation=1.0)
    c = R // 2
    assert grids.sdf[c, c, c] == -1.0  # inside the shell, not in the support: enclosed
    assert grids.sdf[0, 0, 0] == 1.0 and grids.sdf[c, c, 2] == 1.0  # outside, connected to the border
    assert np.array_equal(grids.sdf[coords[:, 0], coords[:, 1], coords[:, 2]], sdf.astype(np.float32))
    assert grids.known.sum() == len(coords)
    # every empty cell inside the sphere is enclosed, every empty cell outside is not
    idx, p = cell_centres()
    inside = (np.linalg.norm(p, axis=1) < 0.3).reshape(R, R, R) & ~grids.known
    assert (grids.sdf[inside] == -1.0).all() and (grids.sdf[~inside & ~grids.known] == 1.0).all()
    with pytest.raises(ValueError, match="outside a 32\\^3 grid"):
        scatter_to_grid(coords, sdf, 32)


def test_marching_cubes_recovers_the_sphere_radius_and_colours():
    radius = 0.3
    coords, sdf, colors = sphere_cells(radius)
    mesh = extract_mesh(coords, sdf, colors, ExtractionConfig(resolution=R))
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - radius).max() < 1.0 / R  # within one voxel everywhere
    assert abs(r.mean() - radius) < 0.1 / R
    assert components(mesh) == 1
    centres = mesh.vertices[mesh.faces].mean(axis=1)
    assert ((mesh.face_normals() * centres).sum(axis=1) > 0).all()  # outward normals
    pos, col = vertex_colors(mesh)
    assert np.abs(col - (pos + 0.5)).max() < 1.0 / R  # colour volume transferred (colour = position)


def test_off_centre_sphere_and_torch_input():
    centre = (0.1, -0.05, 0.02)
    coords, sdf, colors = sphere_cells(0.2, centre)
    mesh = extract_mesh(
        torch.from_numpy(coords), torch.from_numpy(sdf), torch.from_numpy(colors), ExtractionConfig(resolution=R)
    )
    r = np.linalg.norm(mesh.vertices - np.asarray(centre), axis=1)
    assert np.abs(r - 0.2).max() < 1.0 / R


def test_cleanup_removes_a_tiny_component_and_decimates():
    big, big_sdf, big_col = sphere_cells(0.3)
    small, small_sdf, small_col = sphere_cells(0.04, (0.42, 0.42, 0.42))
    keys = np.concatenate([big, small])  # far apart: no cell in both
    assert len(np.unique(keys, axis=0)) == len(keys)
    sdf, colors = np.concatenate([big_sdf, small_sdf]), np.concatenate([big_col, small_col])
    keep_all = ExtractionConfig(resolution=R, keep_largest_component=False, min_component_fraction=0.0)
    both = extract_mesh(keys, sdf, colors, keep_all)
    assert components(both) == 2
    cleaned = extract_mesh(
        keys, sdf, colors, ExtractionConfig(resolution=R, keep_largest_component=False, min_component_fraction=0.05)
    )
    assert components(cleaned) == 1 and np.linalg.norm(cleaned.vertices, axis=1).max() < 0.3 + 1.0 / R
    largest = extract_mesh(keys, sdf, colors, ExtractionConfig(resolution=R))
    assert components(largest) == 1 and largest.num_faces == cleaned.num_faces
    small_mesh = extract_mesh(keys, sdf, colors, ExtractionConfig(resolution=R, target_faces=2000))
    assert 1000 < small_mesh.num_faces <= 2000
    assert np.abs(np.linalg.norm(small_mesh.vertices, axis=1) - 0.3).max() < 1.0 / R


def test_numpy_cleanup_matches_pymeshlab_and_replaces_it_when_absent(monkeypatch):
    big, big_sdf, big_col = sphere_cells(0.3)
    small, small_sdf, small_col = sphere_cells(0.04, (0.42, 0.42, 0.42))
    keys, sdf = np.concatenate([big, small]), np.concatenate([big_sdf, small_sdf])
    grids = scatter_to_grid(keys, sdf, R, 1.0, np.concatenate([big_col, small_col]))
    verts, faces = marching_cubes(grids.sdf, 0.0, pad_value=1.0, snap=0.01)
    colors = sample_colors(grids, verts)
    kw = {"merge_distance": 0.01 / R, "min_component_fraction": 0.05}  # the pipeline's defaults
    ref, ours = cleanup(verts, faces, colors, **kw), cleanup_numpy(verts, faces, colors, **kw)
    assert len(ours[1]) == len(ref[1]) < len(faces)  # the small sphere is removed by both
    assert np.allclose(np.sort(ours[0], axis=0), np.sort(ref[0], axis=0), atol=1e-6)
    assert np.allclose(np.sort(ours[2], axis=0), np.sort(ref[2], axis=0), atol=1.01 / 255)  # pymeshlab: 8 bit
    corners = [np.sort(v[f].reshape(len(f), -1), axis=0) for v, f, _ in (ours, ref)]
    assert np.allclose(*corners, atol=1e-6)
    merged = cleanup_numpy(verts, faces, colors, merge_distance=0.5 / R)  # coarser merging: fewer, valid faces
    assert len(merged[0]) < len(verts) and (merged[1][:, 0] != merged[1][:, 1]).all()
    assert merged[1].max() == len(merged[0]) - 1 and len(merged[2]) == len(merged[0])

    monkeypatch.setitem(sys.modules, "pymeshlab", None)  # a machine without pymeshlab (the GPU benchmark's)
    mesh = extract_mesh(keys, sdf, None, ExtractionConfig(resolution=R, min_component_fraction=0.05))
    assert mesh.num_faces == len(ref[1])
    with pytest.raises(ImportError, match="pymeshlab"):
        extract_mesh(keys, sdf, None, ExtractionConfig(resolution=R, target_faces=2000))


def test_extract_meshes_from_a_sparse_batch(tmp_path):
    per_sample = [sphere_cells(0.3), sphere_cells(0.2)]
    x = SparseTensor.from_samples(
        [torch.from_numpy(c) for c, _, _ in per_sample],
        [torch.from_numpy(np.concatenate([s[:, None], col * 2 - 1], axis=1)).float() for _, s, col in per_sample],
    )
    meshes = extract_meshes(x, ExtractionConfig(resolution=R))
    for mesh, radius in zip(meshes, (0.3, 0.2), strict=True):
        assert abs(np.linalg.norm(mesh.vertices, axis=1).mean() - radius) < 0.5 / R
    mesh = meshes[0]
    for suffix in (".ply", ".glb", ".obj"):
        path = save_mesh(mesh, tmp_path / f"sphere{suffix}")
        back = load_mesh(path)
        assert np.allclose(back.bounds, mesh.bounds, atol=1e-5)
        assert back.corner_colors is not None
        pos, col = vertex_colors(back)
        assert np.abs(col - (pos + 0.5)).max() < 1.0 / R + 1.0 / 255  # colours survive the file (8 bit)
        assert abs(back.face_areas().sum() - mesh.face_areas().sum()) < 1e-4


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="never crosses level 0"):
        marching_cubes(np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"coords must be \[N, 3\]"):
        scatter_to_grid(np.zeros((3, 4)), np.zeros(3), 8)
    with pytest.raises(ValueError, match="level 2.0 must lie strictly inside"):
        extract_mesh(*sphere_cells(0.3)[:2], cfg=ExtractionConfig(resolution=R, level=2.0))
