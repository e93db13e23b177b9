import math

import numpy as np
import pytest
import torch

from one2345pp.cameras import (
    LAYOUTS,
    Camera,
    framing_distance,
    get_layout,
    intrinsics,
    multiview_cameras,
    opencv_to_opengl,
    tile,
    untile,
)


def expected_position(az, el, d):
    a, e = math.radians(az), math.radians(el)
    return d * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("cond_az", [0.0, 37.5, 300.0])
def test_every_view_of_both_layouts_matches_the_formula(layout, cond_az):
    d = 2.7
    cams = multiview_cameras(cond_az, layout, d, 320)
    elev = {"zero123pp-v1.2": [20, -10] * 3, "zero123pp-v1.1": [30, -20] * 3}[layout]
    fov = {"zero123pp-v1.2": 30.0, "zero123pp-v1.1": 2 * math.degrees(math.atan(16 / 35))}[layout]
    assert len(cams) == 6
    for i, cam in enumerate(cams):
        az = cond_az + 30 + 60 * i
        assert cam.elevation_deg == elev[i]
        assert cam.fov_deg == pytest.approx(fov)
        c2w = cam.c2w
        pos = expected_position(az, elev[i], d)
        np.testing.assert_allclose(c2w[:3, 3], pos, atol=1e-12)
        R = c2w[:3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        np.testing.assert_allclose(R[:, 2], -pos / d, atol=1e-12)  # z forward looks at the origin
        assert R[:, 0][2] == pytest.approx(0.0, abs=1e-12)  # x right is horizontal (up is +Z)
        assert R[:, 1][2] < 0  # y points down in the world
        np.testing.assert_allclose(np.cross(R[:, 2], R[:, 0]), R[:, 1], atol=1e-12)


def test_v11_fov_value():
    assert get_layout("zero123pp-v1.1").fov_deg == pytest.approx(49.1343, abs=1e-3)
    with pytest.raises(ValueError, match="known layouts"):
        get_layout("zero123pp-v9")


def test_projection_of_known_points():
    cam = Camera(azimuth_deg=0.0, elevation_deg=0.0, distance=3.0, fov_deg=30.0, width=320, height=320)
    f = 160 / math.tan(math.radians(15))
    np.testing.assert_allclose(cam.K, [[f, 0, 160], [0, f, 160], [0, 0, 1]])
    # camera on +X looking at -X: world +Y is image right, world +Z is image up
    pts = np.array([[0, 0, 0], [0, 0.2, 0], [0, 0, 0.3], [0.5, -0.1, 0.1]])
    uv, z = cam.project(pts)
    np.testing.assert_allclose(z, [3.0, 3.0, 3.0, 2.5])
    np.testing.assert_allclose(uv[0], [160, 160])
    np.testing.assert_allclose(uv[1], [160 + f * 0.2 / 3, 160])
    np.testing.assert_allclose(uv[2], [160, 160 - f * 0.3 / 3])
    np.testing.assert_allclose(uv[3], [160 - f * 0.1 / 2.5, 160 - f * 0.1 / 2.5])


def test_rays_hit_the_points_they_came_from():
    cam = Camera(123.0, 25.0, 2.5, 30.0, 64, 48)
    o, d = cam.rays()
    assert o.shape == d.shape == (48, 64, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0)
    pts = o + 1.7 * d
    uv, _ = cam.project(pts)
    jj, ii = np.meshgrid(np.arange(48), np.arange(64), indexing="ij")
    np.testing.assert_allclose(uv[..., 0], ii + 0.5, atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], jj + 0.5, atol=1e-9)


def test_opengl_conversion_is_an_involution():
    c2w = Camera(10, 20, 3, 30, 8, 8).c2w
    gl = opencv_to_opengl(c2w)
    np.testing.assert_allclose(gl[:3, 2], -c2w[:3, 2])  # OpenGL looks down -z
    np.testing.assert_allclose(gl[:3, 1], -c2w[:3, 1])  # and has y up
    np.testing.assert_allclose(opencv_to_opengl(gl), c2w)


def test_camera_dict_round_trip():
    cam = Camera(45.0, -10.0, 2.2, 30.0, 320, 320)
    back = Camera.from_dict(cam.to_dict(), 30.0, 320)
    assert back == cam
    np.testing.assert_allclose(np.array(cam.to_dict()["c2w"]), cam.c2w)


def test_framing_distance_keeps_the_cube_in_view():
    d = framing_distance(30.0, 0.9)
    corners = np.array([[x, y, z] for x in (-0.45, 0.45) for y in (-0.45, 0.45) for z in (-0.45, 0.45)])
    for az in range(0, 360, 30):
        for el in (-10, 20, 40):
            uv, _ = Camera(az, el, d, 30.0, 320, 320).project(corners)
            assert (uv >= 0).all() and (uv <= 320).all()


def test_intrinsics_rejects_bad_fov():
    with pytest.raises(ValueError, match="field of view"):
        intrinsics(180.0, 10, 10)


def test_tile_untile_round_trip_numpy_and_torch():
    views = np.random.default_rng(0).random((6, 5, 4, 3))
    grid = tile(views)
    assert grid.shape == (15, 8, 3)
    # row-major 3 rows x 2 columns: view 3 (az+210) is row 1, column 1
    np.testing.assert_array_equal(grid[5:10, 4:8], views[3])
    np.testing.assert_array_equal(grid[10:15, 0:4], views[4])
    np.testing.assert_array_equal(untile(grid), views)
    t = torch.rand(2, 6, 3, 5, 4)
    g = tile(t)
    assert g.shape == (2, 3, 15, 8)
    assert torch.equal(g[1, :, 5:10, 4:8], t[1, 3])
    assert torch.equal(untile(g), t)
    with pytest.raises(ValueError):
        untile(np.zeros((10, 8, 3)))
