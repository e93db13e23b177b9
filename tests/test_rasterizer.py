"""Rasteriser interface (one2345pp.rendering.rasterizer) against analytic cases and a brute-force ray caster."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from helpers.meshes import icosphere
from one2345pp.cameras import Camera
from one2345pp.geometry.mesh import Mesh
from one2345pp.models.color_field import ColorField, ColorFieldConfig
from one2345pp.rendering.rasterizer import (
    ENV_VAR,
    CpuRasterizer,
    NvdiffrastRasterizer,
    interpolate,
    make_rasterizer,
    pixel_agreement,
    resolve_backend,
)

RES = 48
DIST = 2.5
FOV = 30.0


def _ray_dirs(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Origin [3] and unnormalised directions [H, W, 3] with camera-space z = 1 through the pixel centres."""
    K, c2w = camera.K, camera.c2w
    vv, uu = np.mgrid[0 : camera.height, 0 : camera.width] + 0.5
    d_cam = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], axis=-1)
    return c2w[:3, 3], d_cam @ c2w[:3, :3].T


def _brute_force(vertices: np.ndarray, faces: np.ndarray, origin: np.ndarray, dirs: np.ndarray):
    """Moller-Trumbore against every triangle: nearest hit's (face id, t) per ray, (-1, inf) on a miss."""
    tri = vertices[faces]  # [F, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    d = dirs.reshape(-1, 3)
    p = np.cross(d[:, None, :], e2[None])  # [R, F, 3]
    det = np.einsum("fk,rfk->rf", e1, p)
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin[None, None, :] - tri[None, :, 0]
    u = np.einsum("rfk,rfk->rf", s, p) * inv
    q = np.cross(s, e1[None])
    v = np.einsum("rk,rfk->rf", d, q) * inv
    t = np.einsum("fk,rfk->rf", e2, q) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    t = np.where(hit, t, np.inf)
    face = np.where(np.isfinite(t.min(1)), t.argmin(1), -1)
    return face.reshape(dirs.shape[:-1]), t.min(1).reshape(dirs.shape[:-1])


@pytest.fixture(scope="module")
def rasterizer() -> CpuRasterizer:
    return make_rasterizer("cpu")


# ------------------------------------------------------------------------------------------------------- plane
def test_plane_ids_barycentrics_and_depth(rasterizer):
    """A square facing the camera: exact depth, the triangle on the right side of the diagonal, exact points."""
    a = 0.3
    vertices = np.array([[0.0, -a, -a], [0.0, a, -a], [0.0, a, a], [0.0, -a, a]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    camera = Camera(0.0, 0.0, DIST, FOV, RES, RES)  # at (DIST, 0, 0) looking along -x
    rm = rasterizer.prepare(Mesh(vertices, faces))
    rast = rasterizer.rasterize(rm, [camera])
    assert rast.shape == (1, RES, RES)

    origin, dirs = _ray_dirs(camera)
    t = (0.0 - origin[0]) / dirs[..., 0]  # ray parameter at the plane x = 0 (= camera z-depth)
    p = origin + t[..., None] * dirs
    inside = (np.abs(p[..., 1]) < a) & (np.abs(p[..., 2]) < a)
    margin = (np.abs(np.abs(p[..., 1]) - a) > 1e-6) & (np.abs(np.abs(p[..., 2]) - a) > 1e-6)
    mask = rast.mask[0].numpy()
    assert inside.sum() > 0.2 * RES * RES
    np.testing.assert_array_equal(mask[margin], inside[margin])

    # face 0 holds the corner (y, z) = (+a, -a): points with y > z; face 1 the others
    expected = np.where(p[..., 1] > p[..., 2], 0, 1)
    off_diagonal = np.abs(p[..., 1] - p[..., 2]) > 1e-6
    sel = inside & margin & off_diagonal
    np.testing.assert_array_equal(rast.face_ids[0].numpy()[sel], expected[sel])
    np.testing.assert_allclose(rast.depth[0].numpy()[inside & margin], DIST, rtol=1e-5)
    assert (rast.depth[0].numpy()[~mask] == 0).all() and (rast.face_ids[0].numpy()[~mask] == -1).all()

    bary = rast.bary[0].numpy()[mask]
    w = np.concatenate([1.0 - bary.sum(-1, keepdims=True), bary], axis=-1)
    assert (w > -1e-5).all() and (w < 1 + 1e-5).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    points = interpolate(rm.vertices, rm.faces, rast)[0].numpy()
    np.testing.assert_allclose(points[inside & margin], p[inside & margin], atol=1e-5)


# ------------------------------------------------------------------------------------------------------ sphere
def test_sphere_against_analytic_and_brute_force(rasterizer):
    r = 0.4
    mesh = icosphere(r, 3)
    camera = Camera(35.0, 20.0, DIST, FOV, RES, RES)
    rm = rasterizer.prepare(mesh)
    rast = rasterizer.rasterize(rm, [camera, Camera(200.0, -10.0, DIST, FOV, RES, RES)])
    assert rast.shape == (2, RES, RES)

    origin, dirs = _ray_dirs(camera)
    # analytic sphere: |o + t d|^2 = r^2, nearest root
    a = (dirs**2).sum(-1)
    b = 2.0 * (dirs @ origin)
    c = origin @ origin - r * r
    disc = b * b - 4 * a * c
    unit = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    miss_dist = np.linalg.norm(np.cross(-origin[None, None, :], unit), axis=-1)  # distance of the ray to the centre
    mask = rast.mask[0].numpy()
    # the inscribed polyhedron lies between the circumscribed sphere and its inner radius
    inner = r * math.cos(math.radians(12.0))  # edge angle of a level-3 icosphere is ~ 4.8 deg, face radius well inside
    assert mask[miss_dist < inner - 1e-3].all()
    assert not mask[miss_dist > r + 1e-6].any()
    t_sphere = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    depth = rast.depth[0].numpy()
    core = miss_dist < 0.8 * r
    # polyhedron points lie behind the sphere by at most the sagitta of a face
    gap = depth[core] - t_sphere[core]
    assert (gap > -1e-5).all() and (gap < 0.02 * r).all()

    # exact triangle ids and depths from a brute-force ray caster
    face_bf, t_bf = _brute_force(mesh.vertices, mesh.faces, origin, dirs)
    np.testing.assert_array_equal(mask, face_bf >= 0)
    fid = rast.face_ids[0].numpy()
    agree = (fid == face_bf)[mask].mean()
    assert agree > 0.995, agree  # ties on shared edges may pick either face
    np.testing.assert_allclose(depth[mask], t_bf[mask], rtol=1e-5, atol=1e-6)

    bary = rast.bary.numpy()[rast.mask.numpy()]
    w = np.concatenate([1.0 - bary.sum(-1, keepdims=True), bary], axis=-1)
    assert (w > -1e-5).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # the interpolated point is on the ray at the reported depth
    points = interpolate(rm.vertices, rm.faces, rast)[0].numpy()
    np.testing.assert_allclose(points[mask], (origin + depth[..., None] * dirs)[mask], atol=1e-4)
    # the visible face looks at the camera
    n = mesh.face_normals()[fid[mask]]
    assert ((n * dirs[mask]).sum(-1) < 0).all()


def test_uv_rasterisation_rows_and_texels(rasterizer):
    """A UV triangle covering the lower-left half of the unit square: row 0 is the top of the texture (v ~ 1)."""
    size = 16
    uv = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    rast = rasterizer.rasterize_uv(uv, size, size)
    jj, ii = np.mgrid[0:size, 0:size]
    u, v = (ii + 0.5) / size, 1.0 - (jj + 0.5) / size
    expected = u + v < 1.0
    diag = np.abs(u + v - 1.0) > 1e-9
    np.testing.assert_array_equal(rast.mask[0].numpy()[diag], expected[diag])
    bary = rast.bary[0].numpy()
    np.testing.assert_allclose(bary[expected][:, 0], u[expected], atol=1e-5)  # b1 weights corner (1, 0)
    np.testing.assert_allclose(bary[expected][:, 1], v[expected], atol=1e-5)


# ------------------------------------------------------------------------------------------------------ gradients
def test_interpolation_and_field_gradients(rasterizer):
    mesh = icosphere(0.35, 2)
    rm = rasterizer.prepare(mesh)
    rast = rasterizer.rasterize(rm, [Camera(10.0, 15.0, DIST, FOV, 32, 32)])
    attr = torch.randn(mesh.num_vertices, 2, requires_grad=True)
    out = interpolate(attr, rm.faces, rast)
    out.sum().backward()
    # d(sum of pixels)/d(vertex attribute) = total barycentric weight of the vertex over the visible pixels
    m = rast.mask[0]
    fid = rast.face_ids[0][m]
    b = rast.bary[0][m]
    w = torch.cat([1 - b.sum(-1, keepdim=True), b], -1)
    expected = torch.zeros(mesh.num_vertices).index_add_(0, rm.faces[fid].reshape(-1), w.reshape(-1))
    torch.testing.assert_close(attr.grad[:, 0], expected)
    torch.testing.assert_close(attr.grad[:, 1], expected)

    field = ColorField(ColorFieldConfig(resolution=16, components=4, feature_dim=8, hidden=16))
    points = interpolate(rm.vertices, rm.faces, rast)[0][m]
    torch.nn.init.normal_(field.head.weight, std=0.1)  # a fresh field's output layer is zero (flat gray)
    loss = (field(points) - torch.rand(points.shape[0], 3)).square().mean()
    loss.backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------------- backends
def test_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nvdiffrast"
    assert resolve_backend("cpu", torch.device("cuda", 0)) == "cpu"
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_backend("auto", torch.device("cuda", 0)) == "cpu"
    monkeypatch.setenv(ENV_VAR, "opengl")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", "cpu")
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="unknown rasteriser backend 'vulkan'"):
        resolve_backend("vulkan")
    assert isinstance(make_rasterizer("auto", "cpu"), CpuRasterizer)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_rasterizer("nvdiffrast", "cpu")


def test_nvdiffrast_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)  # import nvdiffrast -> ImportError
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    with pytest.raises(ImportError, match="pip install diffrp-nvdiffrast"):
        NvdiffrastRasterizer(torch.device("cuda", 0))


def test_bad_inputs(rasterizer):
    with pytest.raises(ValueError, match="without faces"):
        rasterizer.prepare((np.zeros((3, 3)), np.zeros((0, 3), int)))
    with pytest.raises(ValueError, match="face indices"):
        rasterizer.prepare((np.zeros((3, 3)), np.array([[0, 1, 3]])))
    rm = rasterizer.prepare(icosphere(0.3, 1))
    with pytest.raises(ValueError, match="share a resolution"):
        rasterizer.rasterize(rm, [Camera(0, 0, DIST, FOV, 8, 8), Camera(0, 0, DIST, FOV, 16, 16)])
    with pytest.raises(ValueError, match=r"\[F, 3, 2\]"):
        rasterizer.rasterize_uv(np.zeros((4, 2)), 8, 8)


def test_pixel_agreement(rasterizer):
    rm = rasterizer.prepare(icosphere(0.3, 2))
    cams = [Camera(0, 0, DIST, FOV, 24, 24)]
    a = rasterizer.rasterize(rm, cams)
    assert pixel_agreement(a, a) == 1.0
    b = rasterizer.rasterize(rm, [Camera(90, 0, DIST, FOV, 24, 24)])
    assert pixel_agreement(a, b) < 1.0
