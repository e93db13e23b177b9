"""Ground-truth volumes against analytic signed distances of spheres, boxes and their unions."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from one2345pp.data.config import VolumeConfig
from one2345pp.geometry.mesh import Material, Mesh, concatenate
from one2345pp.geometry.volumes import Volumes, compute_volumes, grid_centers

R, F = 64, 128
RADIUS = 0.35
EXTENTS = np.array([0.6, 0.4, 0.5])
UNION_CENTER, UNION_RADIUS = np.array([0.3, 0.05, 0.0]), 0.18
BASE_COLOR = np.array([0.2, 0.5, 0.8])


def sphere_sdf(p: np.ndarray, center=(0.0, 0.0, 0.0), radius: float = RADIUS) -> np.ndarray:
    return np.linalg.norm(p - np.asarray(center), axis=1) - radius


def box_sdf(p: np.ndarray, extents=EXTENTS) -> np.ndarray:
    q = np.abs(p) - np.asarray(extents) / 2
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)


def union_sdf(p: np.ndarray) -> np.ndarray:
    return np.minimum(box_sdf(p), sphere_sdf(p, UNION_CENTER, UNION_RADIUS))


def _colored_sphere() -> Mesh:
    """Icosphere whose corner colours are 0.5 + position (linear, so the expected colour is analytic)."""
    tm = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    corners = 0.5 + tm.vertices[tm.faces]
    return Mesh(tm.vertices, tm.faces, corner_colors=corners, materials=[Material(base_color=[1.0, 1.0, 1.0, 1.0])])


def _flat_box() -> Mesh:
    tm = trimesh.creation.box(extents=EXTENTS)
    return Mesh(tm.vertices, tm.faces, materials=[Material(base_color=BASE_COLOR)])


def _union() -> tuple[Mesh, trimesh.Trimesh, trimesh.Trimesh]:
    box = trimesh.creation.box(extents=EXTENTS)
    ball = trimesh.creation.icosphere(subdivisions=5, radius=UNION_RADIUS)  # edges < 1 fine voxel
    ball.apply_translation(UNION_CENTER)
    return concatenate([Mesh(box.vertices, box.faces), Mesh(ball.vertices, ball.faces)]), box, ball


def _box_with_hole(n: int = 40) -> Mesh:
    """The box, its +x face tessellated as an n x n grid, with one small triangle of that grid removed."""
    hx, hy, hz = EXTENTS / 2
    tm = trimesh.creation.box(extents=EXTENTS)
    keep = ~np.all(np.isclose(tm.vertices[tm.faces][:, :, 0], hx), axis=1)
    verts, faces = [tm.vertices], [tm.faces[keep]]
    y, z = np.meshgrid(np.linspace(-hy, hy, n + 1), np.linspace(-hz, hz, n + 1), indexing="ij")
    grid = np.stack([np.full(y.size, hx), y.ravel(), z.ravel()], axis=1)
    ids = np.arange(y.size).reshape(n + 1, n + 1) + len(tm.vertices)
    a, b, c, d = ids[:-1, :-1].ravel(), ids[1:, :-1].ravel(), ids[1:, 1:].ravel(), ids[:-1, 1:].ravel()
    quads = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    verts.append(grid)
    faces.append(np.delete(quads, (n // 2) * n + n // 2, axis=0))  # the hole: a triangle near the face centre
    return Mesh(np.concatenate(verts), np.concatenate(faces))


@pytest.fixture(scope="module")
def cfg() -> VolumeConfig:
    return VolumeConfig()


@pytest.fixture(scope="module")
def sphere(cfg) -> tuple[Mesh, Volumes]:
    mesh = _colored_sphere()
    return mesh, compute_volumes(mesh, cfg, threads=1)


@pytest.fixture(scope="module")
def box(cfg) -> tuple[Mesh, Volumes]:
    mesh = _flat_box()
    return mesh, compute_volumes(mesh, cfg)


@pytest.fixture(scope="module")
def union(cfg):
    mesh, box_tm, ball_tm = _union()
    return mesh, box_tm, ball_tm, compute_volumes(mesh, cfg)


CASES = [("sphere", sphere_sdf), ("box", box_sdf)]


def test_grid_centers():
    full = grid_centers(4)
    assert full.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(full[1, 2, 3], [-0.125, 0.125, 0.375])
    expected = [[-0.5 + 0.5 / 128, 0.5 - 0.5 / 128, 0.5 / 128]]
    np.testing.assert_allclose(grid_centers(128, np.array([[0, 127, 64]])), expected)


@pytest.mark.parametrize("name,sdf_fn", CASES)
def test_fine_sdf_matches_analytic(request, name, sdf_fn):
    _, vol = request.getfixturevalue(name)
    assert vol.sdf.dtype == np.float32 and vol.fine_resolution == F and vol.coarse_resolution == R
    expected = sdf_fn(grid_centers(F, vol.coords, np.float64))
    assert np.abs(vol.sdf - expected).max() <= 0.5 / F
    assert (vol.sdf < 0).any() and (vol.sdf > 0).any()


@pytest.mark.parametrize("name,sdf_fn", CASES)
def test_shell_matches_analytic_threshold(request, cfg, name, sdf_fn):
    _, vol = request.getfixturevalue(name)
    assert vol.occ.dtype == np.uint8 and vol.occ.shape == (R, R, R)
    assert vol.shell_threshold == pytest.approx(cfg.shell_threshold / R)
    dist = np.abs(sdf_fn(grid_centers(R).reshape(-1, 3).astype(np.float64))).reshape(R, R, R)
    margin = 0.01 / R  # icosphere(5) lies up to ~0.004 coarse voxels inside the true sphere
    assert vol.occ[dist < vol.shell_threshold - margin].all()
    assert not vol.occ[dist > vol.shell_threshold + margin].any()


@pytest.mark.parametrize("name", ["sphere", "box"])
def test_shell_covers_surface(request, name):
    mesh, vol = request.getfixturevalue(name)
    points, _ = trimesh.sample.sample_surface(trimesh.Trimesh(mesh.vertices, mesh.faces), 20000, seed=0)
    cells = np.floor((points + 0.5) * R).astype(int)
    assert vol.occ[tuple(cells.T)].all()


@pytest.mark.parametrize("name", ["sphere", "box"])
def test_support_is_all_children_of_shell(request, name):
    _, vol = request.getfixturevalue(name)
    c = vol.coords.astype(np.int64)
    assert vol.coords.dtype == np.int16 and vol.rgb.dtype == np.uint8
    assert len(c) == len(vol.sdf) == len(vol.rgb) == 8 * int(vol.occ.sum())
    assert vol.occ[tuple((c // 2).T)].all()
    linear = (c[:, 0] * F + c[:, 1]) * F + c[:, 2]
    assert (np.diff(linear) > 0).all()  # lexicographically sorted, no duplicates


def test_flat_base_color(box):
    _, vol = box
    assert (vol.rgb == np.round(BASE_COLOR * 255).astype(np.uint8)).all()


def test_vertex_colors_of_nearest_point(sphere):
    _, vol = sphere
    p = grid_centers(F, vol.coords, np.float64)
    nearest = p / np.linalg.norm(p, axis=1, keepdims=True) * RADIUS
    expected = np.round((0.5 + nearest) * 255)
    assert np.abs(vol.rgb.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("flip", ["all", "random"])
def test_face_orientation_does_not_matter(sphere, cfg, flip):
    mesh, ref = sphere
    rng = np.random.default_rng(0)
    flipped = np.ones(mesh.num_faces, bool) if flip == "all" else rng.random(mesh.num_faces) < 0.5
    faces, corners = mesh.faces.copy(), mesh.corner_colors.copy()
    faces[flipped] = faces[flipped][:, ::-1]
    corners[flipped] = corners[flipped][:, ::-1]
    vol = compute_volumes(Mesh(mesh.vertices, faces, corner_colors=corners, materials=mesh.materials), cfg)
    assert (vol.occ == ref.occ).all()
    assert (vol.coords == ref.coords).all()
    np.testing.assert_allclose(vol.sdf, ref.sdf, atol=1e-6)
    assert np.abs(vol.rgb.astype(int) - ref.rgb).max() <= 1


def test_thin_tilted_slab(cfg):
    """Three fine voxels thick and tilted: signs near its edges come from probes, not from a neighbour vote."""
    extents = (0.6, 3.0 / F, 0.5)
    rot = trimesh.transformations.rotation_matrix(0.5, [1.0, 1.0, 0.0])[:3, :3]
    tm = trimesh.creation.box(extents=extents)
    vol = compute_volumes(Mesh(tm.vertices @ rot.T, tm.faces), cfg)
    expected = box_sdf(grid_centers(F, vol.coords, np.float64) @ rot, extents)
    assert (expected < -0.25 / F).sum() > 5000
    assert np.abs(vol.sdf - expected).max() <= 0.5 / F


def test_small_hole_is_sealed(cfg):
    vol = compute_volumes(_box_with_hole(), cfg)
    expected = box_sdf(grid_centers(F, vol.coords, np.float64))
    assert (expected < -1.0 / F).sum() > 10000
    assert (vol.sdf[expected < -0.5 / F] < 0).all()
    assert (vol.sdf[expected > 0.5 / F] > 0).all()


def test_union_of_overlapping_parts(union):
    _, box_tm, ball_tm, vol = union
    # internal surfaces: the box inside the ball and the ball inside the box
    box_pts, _ = trimesh.sample.sample_surface(box_tm, 150000, seed=0)
    ball_pts, _ = trimesh.sample.sample_surface(ball_tm, 60000, seed=0)
    internal = np.concatenate(
        [box_pts[sphere_sdf(box_pts, UNION_CENTER, UNION_RADIUS) < 0], ball_pts[box_sdf(ball_pts) < 0]]
    )
    tree = cKDTree(internal)

    p = grid_centers(F, vol.coords, np.float64)
    expected = union_sdf(p)
    away = tree.query(p, distance_upper_bound=4.0 / F)[0]  # inf beyond 4 fine voxels
    signed = np.abs(expected) > 0.5 / F
    assert (np.sign(vol.sdf) == np.sign(expected))[signed].all()  # the sign holds even beside internal faces
    assert np.abs(vol.sdf - expected)[away > 3.0 / F].max() <= 0.5 / F

    centers = grid_centers(R).reshape(-1, 3).astype(np.float64)
    dist = union_sdf(centers).reshape(R, R, R)
    occupied = grid_centers(R, np.argwhere(vol.occ), np.float64)
    assert union_sdf(occupied).min() > -3.0 / R  # no shell deep inside the union
    margin = 0.01 / R  # the tessellated ball lies up to ~0.002 coarse voxels inside the true one
    assert vol.occ[np.abs(dist) < vol.shell_threshold - margin].all()
    extra = (np.abs(dist) > vol.shell_threshold + margin).ravel() & vol.occ.ravel().astype(bool)
    # the only extra shell cells sit a voxel or two beside the crease, where internal faces near the exterior are kept
    assert (tree.query(centers[extra], distance_upper_bound=4.0 / F)[0] < 3.0 / F).all()

    outer = np.concatenate(
        [box_pts[sphere_sdf(box_pts, UNION_CENTER, UNION_RADIUS) > 0][::10], ball_pts[box_sdf(ball_pts) > 0][::5]]
    )
    assert vol.occ[tuple(np.floor((outer + 0.5) * R).astype(int).T)].all()


def test_open_plane_is_exterior(cfg):
    s = 0.3
    verts = np.array([[-s, -s, 0.01], [s, -s, 0.01], [s, s, 0.01], [-s, s, 0.01]])
    mesh = Mesh(verts, np.array([[0, 1, 2], [0, 2, 3]]))
    vol = compute_volumes(mesh, cfg)
    p = grid_centers(F, vol.coords, np.float64)
    q = np.abs(p[:, :2]) - s
    expected = np.sqrt(np.sum(np.maximum(q, 0) ** 2, axis=1) + (p[:, 2] - 0.01) ** 2)
    np.testing.assert_allclose(vol.sdf, expected, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.6, 1.4])
def test_shell_threshold_option(threshold):
    cfg = VolumeConfig(shell_threshold=threshold)
    vol = compute_volumes(_flat_box(), cfg)
    dist = np.abs(box_sdf(grid_centers(R).reshape(-1, 3).astype(np.float64))).reshape(R, R, R)
    assert vol.shell_threshold == pytest.approx(threshold / R)
    assert (vol.occ.astype(bool) == (dist < threshold / R)).all()
    assert len(vol.coords) == 8 * int(vol.occ.sum())
    assert np.abs(vol.sdf - box_sdf(grid_centers(F, vol.coords, np.float64))).max() <= 0.5 / F


def test_rejects_mesh_outside_the_cube(cfg):
    tm = trimesh.creation.box(extents=(1.2, 0.4, 0.4))
    with pytest.raises(ValueError, match="inside"):
        compute_volumes(Mesh(tm.vertices, tm.faces), cfg)
