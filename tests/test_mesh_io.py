import numpy as np
import pytest
import trimesh
from PIL import Image

from one2345pp.geometry.mesh import Material, Mesh, MeshError, concatenate
from one2345pp.geometry.mesh_io import load_mesh, normalize, save_mesh


def _box(offset=(0, 0, 0)):
    b = trimesh.creation.box(extents=(1.0, 0.5, 0.25))
    return np.asarray(b.vertices) + offset, np.asarray(b.faces)


def _nearest_faces(src: Mesh, dst: Mesh) -> np.ndarray:
    from scipy.spatial import cKDTree

    _, idx = cKDTree(dst.vertices[dst.faces].mean(1)).query(src.vertices[src.faces].mean(1))
    return idx


def _colours_agree(a: Mesh, b: Mesh, tol=2.5 / 255):
    rng = np.random.default_rng(1)
    fid = rng.integers(0, a.num_faces, 500)
    bary = rng.random((500, 2)) * 0.5
    got = b.surface_color(_nearest_faces(a, b)[fid], bary)
    np.testing.assert_allclose(got, a.surface_color(fid, bary), atol=tol)


@pytest.fixture
def mixed_mesh():
    rng = np.random.default_rng(0)
    v, f = _box()
    tex = (rng.random((8, 8, 3)) * 200 + 30).astype(np.uint8)
    textured = Mesh(v, f, rng.random((len(f), 3, 2)) * 0.8 + 0.1, None, None, [Material("t", [1, 1, 1, 1], tex)])
    v2, f2 = _box((2, 0, 0))
    flat = Mesh(v2, f2, None, None, None, [Material("flat", [0.2, 0.6, 0.3, 1])])
    return concatenate([textured, flat])


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_round_trip_keeps_geometry_and_colours(tmp_path, mixed_mesh, suffix):
    path = save_mesh(mixed_mesh, tmp_path / f"m{suffix}")
    back = load_mesh(path)
    assert back.num_faces == mixed_mesh.num_faces
    np.testing.assert_allclose(np.sort(back.vertices, axis=0)[[0, -1]], np.sort(mixed_mesh.vertices, axis=0)[[0, -1]])
    assert any(m.texture is not None for m in back.materials)
    _colours_agree(mixed_mesh, back)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_vertex_colours_round_trip(tmp_path, suffix):
    v, f = _box()
    vc = np.concatenate([(v - v.min(0)) / np.ptp(v, axis=0) * 0.8 + 0.1, np.ones((len(v), 1))], axis=1)
    mesh = Mesh(v, f, None, vc[f], None, [Material("vc", [1, 1, 1, 1])])
    back = load_mesh(save_mesh(mesh, tmp_path / f"vc{suffix}"))
    assert back.corner_colors is not None
    _colours_agree(mesh, back)


def test_obj_with_mtl_texture_written_by_hand(tmp_path):
    # a quad with a texture whose left half is red and right half blue; v = 0 is the bottom row of the image
    tex = np.zeros((4, 4, 3), np.uint8)
    tex[:, :2] = (255, 0, 0)
    tex[:, 2:] = (0, 0, 255)
    Image.fromarray(tex).save(tmp_path / "tex.png")
    (tmp_path / "q.mtl").write_text("newmtl m\nKd 0.8 0.8 0.8\nmap_Kd tex.png\n")
    (tmp_path / "q.obj").write_text(
        "mtllib q.mtl\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
        "usemtl m\nf 1/1 2/2 3/3\nf 1/1 3/3 4/4\n"
    )
    mesh = load_mesh(tmp_path / "q.obj")
    assert mesh.num_faces == 2 and mesh.materials[0].texture is not None
    # face 0 = (v0, v1, v2) -> uv (0.7, 0.1): right half -> blue; Kd is ignored beside a texture
    np.testing.assert_allclose(mesh.surface_color([0], [[0.6, 0.1]])[0, :3], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(mesh.surface_color([1], [[0.2, 0.7]])[0, :3], [1, 0, 0], atol=1e-6)


def test_glb_scene_is_flattened_with_transforms(tmp_path):
    v, f = _box()
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.Trimesh(v, f), node_name="a")
    moved = np.eye(4)
    moved[:3, 3] = (5.0, 0.0, 0.0)
    scene.add_geometry(trimesh.Trimesh(v, f), node_name="b", transform=moved)
    scene.export(tmp_path / "scene.glb")
    mesh = load_mesh(tmp_path / "scene.glb", up_axis="z")  # the file's own coordinates
    assert mesh.num_faces == 2 * len(f)
    np.testing.assert_allclose(mesh.vertices.max(0), [5.5, 0.25, 0.125], atol=1e-6)
    upright = load_mesh(tmp_path / "scene.glb")  # glTF is +Y up: (x, y, z) -> (x, -z, y)
    np.testing.assert_allclose(upright.vertices, mesh.vertices[:, [0, 2, 1]] * [1, -1, 1], atol=1e-12)


def test_off_and_gso_texture_fallback(tmp_path):
    v, f = _box()
    trimesh.Trimesh(v, f).export(tmp_path / "m.off")
    assert load_mesh(tmp_path / "m.off").num_faces == len(f)


def test_normalize_centres_and_scales():
    v, f = _box((3.0, -2.0, 7.0))
    mesh = Mesh(v * 4.0, f)
    n, scale, offset = normalize(mesh, 0.9)
    lo, hi = n.vertices.min(0), n.vertices.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-12)
    assert (hi - lo).max() == pytest.approx(0.9)
    np.testing.assert_allclose(mesh.vertices * scale + offset, n.vertices)
    with pytest.raises(ValueError, match="extent"):
        normalize(mesh, 1.5)


def test_bad_inputs_name_the_file_and_the_reason(tmp_path):
    cases = {}
    (tmp_path / "garbage.obj").write_bytes(b"\x00\x01 this is not an obj \xff" * 10)
    cases["garbage.obj"] = "no faces|not a triangle mesh|unreadable"
    (tmp_path / "empty.glb").write_bytes(b"")
    cases["empty.glb"] = "empty"
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    cases["nan.obj"] = "NaN or infinite"
    (tmp_path / "points.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n0 0 0\n1 0 0\n0 1 0\n"
    )
    cases["points.ply"] = "not a triangle mesh|no faces"
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    cases["flat.obj"] = "degenerate"
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = "unsupported file type"
    cases["missing.obj"] = "file not found"
    for name, pattern in cases.items():
        with pytest.raises(MeshError, match=pattern) as err:
            load_mesh(tmp_path / name)
        assert name in str(err.value)
