"""The CPU ray-cast renderer against analytic expectations (sphere silhouettes, depths, normals, textures)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers.meshes import icosphere
from one2345pp.cameras import Camera, camera_position
from one2345pp.data.config import RenderConfig
from one2345pp.geometry.mesh import Material, Mesh
from one2345pp.rendering import Light, RaycastRenderer, RenderOutput, background_color, light_from_config
from one2345pp.rendering import raycast as raycast_module
from one2345pp.rendering.raycast import PAIR_STRIDE, edge_pixels

R_SPHERE = 0.5
DIST = 2.0
FOV = 40.0
RES = 161  # odd: the centre pixel's ray is the optical axis
FLAT = Light(np.array([0.0, 0.0, 1.0]), ambient=1.0, diffuse=0.0)  # shading = identity


def sphere_mesh(subdivisions: int = 5, radius: float = R_SPHERE) -> Mesh:
    return icosphere(radius, subdivisions, Material("white", (1.0, 1.0, 1.0, 1.0)))


@pytest.fixture(scope="module")
def sphere() -> Mesh:
    return sphere_mesh()


@pytest.fixture(scope="module")
def sphere_view(sphere) -> tuple[Camera, RenderOutput]:
    cam = Camera(30.0, 20.0, DIST, FOV, RES, RES)
    return cam, RaycastRenderer(RenderConfig(supersample=3)).render(sphere, cam, FLAT)


def disc_radius_px(cam: Camera, r: float = R_SPHERE, d: float = DIST) -> float:
    return cam.K[0, 0] * math.tan(math.asin(r / d))


def pixel_centres(cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)


def camera_rays(cam: Camera) -> np.ndarray:
    """Camera-space directions with z = 1 through the pixel centres, [H, W, 3], computed from K only."""
    u, v = pixel_centres(cam)
    K = cam.K
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)


# --- sphere: silhouette, depth, normals, anti-aliasing ------------------------------------------------------------
def test_sphere_silhouette_area_matches_perspective_disc(sphere_view):
    cam, out = sphere_view
    radius = disc_radius_px(cam)
    area = float(out.alpha.sum())
    assert area == pytest.approx(math.pi * radius**2, rel=5e-3)


def test_sphere_silhouette_is_centred(sphere_view):
    cam, out = sphere_view
    u, v = pixel_centres(cam)
    a = out.alpha
    assert abs((a * u).sum() / a.sum() - cam.width / 2) < 0.5
    assert abs((a * v).sum() / a.sum() - cam.height / 2) < 0.5


def test_sphere_depth_is_camera_z_of_the_analytic_surface(sphere_view):
    cam, out = sphere_view
    c = RES // 2
    assert out.depth[c, c] == pytest.approx(DIST - R_SPHERE, abs=2e-4)
    # every pixel well inside the disc: z-depth of the ray/sphere intersection (sphere centre at camera z = DIST)
    dcam = camera_rays(cam)
    q = (dcam**2).sum(-1)
    disc = DIST**2 - q * (DIST**2 - R_SPHERE**2)
    u, v = pixel_centres(cam)
    rho = np.hypot(u - cam.width / 2, v - cam.height / 2)
    inside = rho < 0.9 * disc_radius_px(cam)
    z = (DIST - np.sqrt(np.maximum(disc, 0.0))) / q
    assert (out.face_ids[inside] >= 0).all()
    np.testing.assert_allclose(out.depth[inside], z[inside], atol=2e-3)
    assert (out.depth[out.face_ids < 0] == 0).all()


def test_sphere_normals_are_radial_and_face_the_camera(sphere_view):
    cam, out = sphere_view
    c = RES // 2
    towards_camera = cam.position / np.linalg.norm(cam.position)
    assert out.normals[c, c] @ towards_camera > 0.9999
    # interior normals equal the analytic sphere normal at the hit point
    dcam = camera_rays(cam)
    points = dcam * out.depth[..., None] @ cam.c2w[:3, :3].T + cam.position
    u, v = pixel_centres(cam)
    inside = np.hypot(u - cam.width / 2, v - cam.height / 2) < 0.95 * disc_radius_px(cam)
    expected = points[inside] / np.linalg.norm(points[inside], axis=-1, keepdims=True)
    dots = (out.normals[inside] * expected).sum(-1)
    assert dots.min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(out.normals[inside], axis=-1), 1.0, atol=1e-5)
    assert (out.normals[out.face_ids < 0] == 0).all()


def test_shading_normals_are_interpolated_vertex_normals():
    # on a coarse sphere the face normals are off the radial direction by up to ~10 degrees; the interpolated vertex
    # normals follow the sphere's normal at the hit point
    mesh = sphere_mesh(subdivisions=2)
    cam = Camera(30.0, 20.0, DIST, FOV, RES, RES)
    out = RaycastRenderer(RenderConfig()).render(mesh, cam, FLAT)
    points = camera_rays(cam) * out.depth[..., None] @ cam.c2w[:3, :3].T + cam.position
    hit = out.face_ids >= 0
    radial = points[hit] / np.linalg.norm(points[hit], axis=-1, keepdims=True)
    assert (out.normals[hit] * radial).sum(-1).min() > 0.9995
    face_normals = mesh.face_normals()[out.face_ids[hit]]
    assert (face_normals * radial).sum(-1).min() < 0.99  # so the check above is not passed by face normals


def test_antialiasing_only_at_the_silhouette(sphere_view):
    cam, out = sphere_view
    radius = disc_radius_px(cam)
    u, v = pixel_centres(cam)
    dx, dy = np.abs(u - cam.width / 2), np.abs(v - cam.height / 2)
    nearest = np.hypot(np.maximum(dx - 0.5, 0.0), np.maximum(dy - 0.5, 0.0))  # closest point of the pixel square
    farthest = np.hypot(dx + 0.5, dy + 0.5)
    alpha = out.alpha
    assert (alpha[farthest < radius - 0.05] == 1.0).all()
    assert (alpha[nearest > radius + 0.01] == 0.0).all()
    fractional = (alpha > 0) & (alpha < 1)
    assert fractional.sum() > 2 * math.pi * radius * 0.5
    rho = np.hypot(u - cam.width / 2, v - cam.height / 2)
    assert (np.abs(rho[fractional] - radius) < 1.0).all()
    # the 3x3 sub-sample coverage estimate is within 1/6 (plus tessellation) of the exact pixel coverage
    sub = (np.arange(16) + 0.5) / 16 - 0.5
    su = u[..., None, None] + sub[None, None, None, :]
    sv = v[..., None, None] + sub[None, None, :, None]
    exact = (np.hypot(su - cam.width / 2, sv - cam.height / 2) < radius).mean(axis=(-1, -2))
    band = fractional | ((nearest < radius) & (farthest > radius))
    assert np.abs(alpha[band] - exact[band]).max() < 1.0 / 6.0 + 0.03
    # straight alpha: edge pixels of a white sphere under identity shading keep a white colour
    np.testing.assert_allclose(out.rgba[fractional][:, :3], 1.0, atol=1e-5)
    # background pixels: background colour (gray), alpha 0
    np.testing.assert_allclose(out.rgba[alpha == 0][:, :3], 0.5)


def test_supersample_one_gives_binary_alpha(sphere):
    cam = Camera(0.0, 0.0, DIST, FOV, 64, 64)
    out = RaycastRenderer(RenderConfig(supersample=1)).render(sphere, cam, FLAT)
    assert set(np.unique(out.alpha).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(out.alpha > 0, out.face_ids >= 0)


def test_projected_point_lands_on_the_pixel_of_its_triangle():
    mesh = sphere_mesh(subdivisions=2)
    cam = Camera(70.0, 25.0, DIST, FOV, RES, RES)
    out = RaycastRenderer(RenderConfig()).render(mesh, cam, FLAT)
    rng = np.random.default_rng(0)
    tri = mesh.vertices[mesh.faces]
    bary = rng.dirichlet([4.0, 4.0, 4.0], size=len(tri))
    points = np.einsum("fk,fkc->fc", bary, tri)
    normals = mesh.face_normals()
    visible = ((cam.position - points) * normals).sum(-1) > 0.3 * np.linalg.norm(cam.position - points, axis=-1)
    uv, z = cam.project(points)
    tri_uv, _ = cam.project(tri)
    checked = 0
    for f in np.flatnonzero(visible):
        i, j = int(uv[f, 0]), int(uv[f, 1])
        centre = np.array([i + 0.5, j + 0.5])
        a, b, c = tri_uv[f]
        m = np.array([b - a, c - a]).T
        l1, l2 = np.linalg.solve(m, centre - a)
        if min(1 - l1 - l2, l1, l2) < 0.05:  # the pixel centre must lie clearly inside the projected triangle
            continue
        assert out.face_ids[j, i] == f
        assert out.depth[j, i] == pytest.approx(z[f], abs=0.05)
        checked += 1
    assert checked > 20


# --- flat quads: textures, vertex colours, base colours, shading --------------------------------------------------
HALF = 0.5  # the quad spans y, z in [-HALF, HALF] on the plane x = 0


def quad_mesh(**kwargs) -> Mesh:
    """Two triangles on x = 0; the winding makes the face normal point to -x (away from a camera on +x)."""
    vertices = np.array([[0.0, -HALF, -HALF], [0.0, HALF, -HALF], [0.0, HALF, HALF], [0.0, -HALF, HALF]])
    faces = np.array([[0, 2, 1], [0, 3, 2]])
    return Mesh(vertices, faces, **kwargs)


def quad_uv(vertices_yz: np.ndarray) -> np.ndarray:
    return (vertices_yz + HALF) / (2 * HALF)  # u along +y, v along +z (OBJ: v up)


def head_on(res: int = 96, distance: float = 2.0) -> tuple[Camera, np.ndarray, np.ndarray]:
    """Camera on +x looking at the quad, and the world (y, z) of every pixel centre on the plane x = 0
    (image right = +y, image down = -z)."""
    cam = Camera(0.0, 0.0, distance, 40.0, res, res)
    u, v = pixel_centres(cam)
    K = cam.K
    y = (u - K[0, 2]) / K[0, 0] * cam.distance
    z = -(v - K[1, 2]) / K[1, 1] * cam.distance
    return cam, y, z


def test_camera_convention_used_by_the_quad_tests():
    cam, _, _ = head_on()
    np.testing.assert_allclose(cam.c2w[:3, 0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(cam.c2w[:3, 1], [0.0, 0.0, -1.0], atol=1e-12)


def test_textured_quad_reproduces_the_texture():
    rng = np.random.default_rng(1)
    blocks, texel = 4, 16
    colours = rng.integers(0, 256, size=(blocks, blocks, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(colours, texel, axis=0), texel, axis=1)  # row 0 = top of the image
    quad = quad_mesh()
    uv = quad_uv(quad.vertices[:, 1:])[quad.faces]
    mesh = quad_mesh(face_uvs=uv, materials=[Material("tex", (1.0, 1.0, 1.0, 1.0), texture)])
    cam, y, z = head_on()
    out = RaycastRenderer(RenderConfig()).render(mesh, cam, FLAT)
    tu, tv = (y + HALF) / (2 * HALF), (z + HALF) / (2 * HALF)
    col = tu * blocks * texel
    row = (1.0 - tv) * blocks * texel
    dist_col = np.abs(col / texel - np.round(col / texel)) * texel
    dist_row = np.abs(row / texel - np.round(row / texel)) * texel
    inside = (np.abs(y) < HALF - 0.02) & (np.abs(z) < HALF - 0.02)
    clear = inside & (dist_col > 1.0) & (dist_row > 1.0)
    assert clear.sum() > 1000
    bi = np.clip((row // texel).astype(int), 0, blocks - 1)
    bj = np.clip((col // texel).astype(int), 0, blocks - 1)
    expected = colours[bi, bj].astype(np.float32) / 255.0
    np.testing.assert_allclose(out.rgba[clear][:, :3], expected[clear], atol=1e-5)
    assert (out.alpha[inside] == 1.0).all()


def test_vertex_colours_interpolate_linearly():
    quad = quad_mesh()
    uv = quad_uv(quad.vertices[:, 1:])
    corner = np.concatenate([uv, np.full((4, 1), 0.25)], axis=1)[quad.faces]  # colour = (u, v, 0.25), linear
    base = np.array([0.5, 1.0, 0.8, 1.0])
    mesh = quad_mesh(corner_colors=corner, materials=[Material("m", base)])
    cam, y, z = head_on()
    out = RaycastRenderer(RenderConfig()).render(mesh, cam, FLAT)
    inside = (np.abs(y) < HALF - 0.02) & (np.abs(z) < HALF - 0.02)
    expected = np.stack([(y + HALF) / (2 * HALF), (z + HALF) / (2 * HALF), np.full_like(y, 0.25)], -1) * base[:3]
    np.testing.assert_allclose(out.rgba[inside][:, :3], expected[inside], atol=2e-4)


def test_base_colour_with_straight_alpha():
    mesh = quad_mesh(materials=[Material("m", (0.2, 0.4, 0.6, 0.5))])
    cam, y, z = head_on(distance=2.1)  # the quad's edges cross pixels at 0.4 of their width
    out = RaycastRenderer(RenderConfig(background="white")).render(mesh, cam, FLAT)
    inside = (np.abs(y) < HALF - 0.02) & (np.abs(z) < HALF - 0.02)
    np.testing.assert_allclose(out.rgba[inside], np.broadcast_to([0.2, 0.4, 0.6, 0.5], (inside.sum(), 4)), atol=1e-6)
    expected = np.broadcast_to(0.5 * np.array([0.2, 0.4, 0.6]) + 0.5, (inside.sum(), 3))
    np.testing.assert_allclose(out.composite()[inside], expected, atol=1e-6)
    # edge pixels keep the unpremultiplied colour; their alpha is the coverage times 0.5
    edge = (out.alpha > 0) & (out.alpha < 0.5)
    assert edge.sum() >= 4 * 60
    np.testing.assert_allclose(out.alpha[edge & (np.abs(z) < 0.4)], 0.5 / 3.0, atol=1e-6)  # 3 of 9 sub-samples
    np.testing.assert_allclose(out.rgba[edge][:, :3], np.broadcast_to([0.2, 0.4, 0.6], (edge.sum(), 3)), atol=1e-5)


@pytest.mark.parametrize(
    ("direction", "factor"),
    [
        ((1.0, 0.0, 0.0), 1.0),  # light behind the camera: n.l = 1
        ((1.0, 0.0, math.sqrt(3.0)), 0.3 + 0.7 * 0.5),  # 60 degrees from the normal
        ((-1.0, 0.0, 0.0), 0.3),  # behind the quad: the two-sided normal faces the camera, so ambient only
    ],
)
def test_lambert_shading_and_two_sided_normals(direction, factor):
    mesh = quad_mesh(materials=[Material("m", (0.8, 0.6, 0.4, 1.0))])
    cam, y, z = head_on(48)
    out = RaycastRenderer(RenderConfig()).render(mesh, cam, Light(np.array(direction), ambient=0.3, diffuse=0.7))
    inside = (np.abs(y) < HALF - 0.05) & (np.abs(z) < HALF - 0.05)
    expected = np.broadcast_to(np.array([0.8, 0.6, 0.4]) * factor, (inside.sum(), 3))
    np.testing.assert_allclose(out.rgba[inside][:, :3], expected, atol=1e-5)
    # the quad's face normal is -x; the shading normal is turned towards the camera on +x
    np.testing.assert_allclose(out.normals[inside], np.broadcast_to([1.0, 0.0, 0.0], (inside.sum(), 3)), atol=1e-6)
    np.testing.assert_allclose(out.depth[inside], cam.distance, atol=1e-5)


# --- backgrounds, outputs, lights --------------------------------------------------------------------------------
def test_backgrounds_and_output_helpers(sphere):
    cam = Camera(0.0, 10.0, DIST, FOV, 48, 48)
    for name, value in (("gray", 0.5), ("white", 1.0)):
        out = RaycastRenderer(RenderConfig(background=name)).render(sphere, cam, FLAT)
        empty = out.face_ids < 0
        assert (out.alpha[empty & (out.alpha == 0)] == 0).all()
        np.testing.assert_allclose(out.rgba[out.alpha == 0][:, :3], value)
        np.testing.assert_allclose(background_color(name), [value] * 3)
        assert out.rgba.dtype == np.float32 and out.depth.dtype == np.float32
        assert out.normals.dtype == np.float32 and out.face_ids.dtype == np.int64
        comp = out.composite("white")
        np.testing.assert_allclose(comp, out.rgba[..., :3] * out.alpha[..., None] + (1 - out.alpha[..., None]))
        assert comp.dtype == np.float32
        u8 = out.to_uint8_rgba()
        assert u8.dtype == np.uint8 and u8.shape == (48, 48, 4)
        np.testing.assert_array_equal(u8[..., 3], np.round(out.alpha * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="black"):
        RaycastRenderer(RenderConfig(background="black"))
    with pytest.raises(ValueError, match="random"):
        background_color("random")


def test_light_from_config():
    fixed = light_from_config(RenderConfig(light_azimuth_deg=45.0, light_elevation_deg=55.0, ambient=0.4, diffuse=0.6))
    np.testing.assert_allclose(fixed.direction, camera_position(45.0, 55.0, 1.0))
    assert (fixed.ambient, fixed.diffuse) == (0.4, 0.6)
    cfg = RenderConfig(random_lighting=True)
    lights = [light_from_config(cfg, np.random.default_rng(k)) for k in range(200)]
    dirs = np.array([li.direction for li in lights])
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    assert (dirs[:, 2] >= 0).all() and dirs[:, 2].std() > 0.2
    amb = np.array([li.ambient for li in lights])
    assert amb.min() >= 0.3 and amb.max() <= 0.6
    np.testing.assert_allclose([li.diffuse for li in lights], 1 - amb)
    again = light_from_config(cfg, np.random.default_rng(3))
    np.testing.assert_array_equal(again.direction, lights[3].direction)
    with pytest.raises(ValueError, match="rng|Generator"):
        light_from_config(cfg)
    with pytest.raises(ValueError, match="random_lighting"):
        RaycastRenderer(cfg).render(quad_mesh(), head_on(16)[0])


def test_default_light_is_the_configured_one():
    mesh = quad_mesh(materials=[Material("m", (1.0, 1.0, 1.0, 1.0))])
    cam, y, z = head_on(32)
    cfg = RenderConfig(light_azimuth_deg=0.0, light_elevation_deg=60.0, ambient=0.2, diffuse=0.8)
    out = RaycastRenderer(cfg).render(mesh, cam)
    inside = (np.abs(y) < HALF - 0.05) & (np.abs(z) < HALF - 0.05)
    np.testing.assert_allclose(out.rgba[inside][:, :3], 0.2 + 0.8 * math.cos(math.radians(60.0)), atol=1e-5)


# --- caching, edge selection, degenerate inputs ----------------------------------------------------------------
def test_render_many_builds_the_scene_once(monkeypatch, sphere):
    calls = []
    real = raycast_module.build_scene

    def counting(mesh):
        calls.append(mesh)
        return real(mesh)

    monkeypatch.setattr(raycast_module, "build_scene", counting)
    renderer = RaycastRenderer(RenderConfig())
    cams = [Camera(az, 15.0, DIST, FOV, 40, 40) for az in (0.0, 120.0, 240.0)]
    many = renderer.render_many(sphere, cams, FLAT)
    assert len(calls) == 1 and len(many) == 3
    single = renderer.render(sphere, cams[1], FLAT)
    assert len(calls) == 1
    np.testing.assert_array_equal(single.rgba, many[1].rgba)
    np.testing.assert_array_equal(single.face_ids, many[1].face_ids)
    other = sphere_mesh(subdivisions=1)
    renderer.render(other, cams[0], FLAT)
    assert len(calls) == 2 and calls[1] is other


def test_edge_pixel_selection():
    faces = np.full((8, 8), -1, dtype=np.int64)
    faces[1:7, 1:4] = 0
    faces[1:7, 4:7] = 1
    premult = np.zeros((8, 8, 4), np.float32)
    premult[faces == 0] = [0.2, 0.2, 0.2, 1.0]
    premult[faces == 1] = [0.9, 0.2, 0.2, 1.0]
    # contrast 0: every pixel with a 3x3 neighbour of another face id, i.e. all but columns 2 and 5 of rows 2..5
    expected = np.ones((8, 8), bool)
    expected[2:6, 2] = expected[2:6, 5] = False
    assert (edge_pixels(faces, premult, 0.0) == expected).all()
    # the 0/1 edge is seamless: only the silhouette is kept
    expected_gated = np.ones((8, 8), bool)
    expected_gated[2:6, 2:6] = False
    seamless = np.array([0 * PAIR_STRIDE + 1])
    assert (edge_pixels(faces, premult, 0.05, seamless, np.zeros((8, 8), bool)) == expected_gated).all()
    # seen from different sides the pair is not seamless
    back = faces == 1
    assert (edge_pixels(faces, premult, 0.05, seamless, back) == expected).all()
    # a strong edge between faces that are not a seamless pair is kept, a faint one is dropped
    assert (edge_pixels(faces, premult, 0.05) == expected).all()
    assert (edge_pixels(faces, premult, 0.8) == expected_gated).all()


def test_empty_mesh_and_object_outside_the_view():
    cam = Camera(0.0, 0.0, DIST, FOV, 24, 24)
    empty = Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    out = RaycastRenderer(RenderConfig()).render(empty, cam, FLAT)
    assert (out.alpha == 0).all() and (out.face_ids == -1).all()
    far = sphere_mesh(subdivisions=1).transformed(1.0, np.array([0.0, 5.0, 0.0]))
    out = RaycastRenderer(RenderConfig()).render(far, cam, FLAT)
    assert (out.alpha == 0).all() and (out.depth == 0).all()
