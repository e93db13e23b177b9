"""The procedural mesh generator: determinism, geometry of every family, colours, and file round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from one2345pp.data.config import ProceduralConfig
from one2345pp.data.procedural import (
    COLOR_MODES,
    FAMILIES,
    PRIMITIVE_FAMILIES,
    box_surface,
    capsule_surface,
    cone_surface,
    cylinder_surface,
    extrusion_surface,
    generate_object,
    object_uid,
    polygon_outline,
    sphere_surface,
    torus_surface,
)
from one2345pp.geometry.mesh import Mesh

CENTRE = np.full((1, 2), 1 / 3)  # barycentrics of a face centre


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    return float(np.linalg.det(vertices[faces]).sum() / 6)


def merged(vertices: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh:
    tm = trimesh.Trimesh(vertices, faces, process=False)
    tm.merge_vertices()
    return tm


def shoelace(corners: np.ndarray) -> float:
    x, y = corners[:, 0], corners[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def exact_volume(family: str, p: dict) -> float:
    """Independent analytic volumes of the untessellated primitives."""
    if family == "box":
        a, b, c = p["half_extents"]
        return 8 * a * b * c
    if family == "sphere":
        return 4 / 3 * np.pi * p["radius"] ** 3
    if family == "cylinder":
        return np.pi * p["radius"] ** 2 * p["height"]
    if family == "cone":  # frustum
        r1, r2, h = p["radius"], p["radius"] * p["top_ratio"], p["height"]
        return np.pi * h * (r1 * r1 + r1 * r2 + r2 * r2) / 3
    if family == "torus":
        return 2 * np.pi**2 * p["major_radius"] * p["minor_radius"] ** 2
    if family == "capsule":
        return np.pi * p["radius"] ** 2 * p["length"] + 4 / 3 * np.pi * p["radius"] ** 3
    corners = polygon_outline(p["kind"], p["points"], p["outer_radius"], p["inner_radius"], p["phase"])
    t = p["taper"]
    return shoelace(corners) * p["height"] * (1 + t + t * t) / 3


def face_colors(mesh: Mesh) -> np.ndarray:
    return mesh.surface_color(np.arange(mesh.num_faces), np.repeat(CENTRE, mesh.num_faces, axis=0))


@pytest.fixture(scope="module")
def many():
    cfg = ProceduralConfig(seed=7, texture_resolution=64)
    return [generate_object(i, cfg) for i in range(40)]


def test_uid_format():
    assert object_uid(3, 12) == "proc-0003-000012"
    obj = generate_object(5, ProceduralConfig(seed=11, texture_resolution=32))
    assert obj.uid == "proc-0011-000005" == obj.description["uid"] == obj.mesh.source
    assert "." not in obj.uid


def test_deterministic_from_seed_and_index():
    cfg = ProceduralConfig(seed=3, texture_resolution=64)
    for index in range(6):
        a, b = generate_object(index, cfg), generate_object(index, cfg)
        assert a.family == b.family and a.description == b.description
        for name in ("vertices", "faces", "face_uvs", "corner_colors", "face_material"):
            x, y = getattr(a.mesh, name), getattr(b.mesh, name)
            assert (x is None and y is None) or np.array_equal(x, y), name
        for ma, mb in zip(a.mesh.materials, b.mesh.materials, strict=True):
            assert np.array_equal(ma.base_color, mb.base_color)
            assert (ma.texture is None and mb.texture is None) or np.array_equal(ma.texture, mb.texture)
    first = generate_object(0, cfg).mesh.vertices
    assert not np.array_equal(first, generate_object(1, cfg).mesh.vertices)  # another index
    other_seed = generate_object(0, ProceduralConfig(seed=4, texture_resolution=64)).mesh.vertices
    assert first.shape != other_seed.shape or not np.allclose(first, other_seed)


def test_description_is_json_and_complete():
    obj = generate_object(2, ProceduralConfig(texture_resolution=32), family="union")
    desc = json.loads(json.dumps(obj.description))
    assert desc["family"] == "union" and desc["num_faces"] == obj.mesh.num_faces
    assert len(desc["parts"]) == len(obj.mesh.materials)
    assert all(p["family"] in PRIMITIVE_FAMILIES and p["color"]["mode"] in COLOR_MODES for p in desc["parts"])


def test_all_families_reachable_by_default():
    cfg = ProceduralConfig(seed=0, texture_resolution=16)
    assert {generate_object(i, cfg).family for i in range(100)} == set(FAMILIES)


def test_families_restriction_and_unknown_names():
    cfg = ProceduralConfig(seed=1, texture_resolution=16)
    cfg.families = ["torus", "cone"]  # the optional config field the generator honours
    assert {generate_object(i, cfg).family for i in range(20)} == {"torus", "cone"}
    cfg.families = ["union", "sphere"]
    for i in range(10):
        obj = generate_object(i, cfg)
        assert all(p["family"] == "sphere" for p in obj.description["parts"])  # union parts from allowed ones
    cfg.families = ["dodecahedron"]
    with pytest.raises(ValueError, match="dodecahedron"):
        generate_object(0, cfg)
    with pytest.raises(ValueError, match="blob"):
        generate_object(0, ProceduralConfig(), family="blob")


def _keeps_z(linear) -> bool:
    m = np.asarray(linear)
    return bool(np.allclose(m[2, :2], 0) and np.allclose(m[:2, 2], 0))


def test_upright_objects_turn_only_about_the_vertical_axis():
    upright = ProceduralConfig(seed=2, texture_resolution=16, orientation="upright")
    anyway = ProceduralConfig(seed=2, texture_resolution=16)
    for i in range(12):
        obj = generate_object(i, upright)
        d = obj.description
        # every turn keeps +Z: the matrices have no coupling between z and x, y
        assert _keeps_z(d["object_linear"]) and all(_keeps_z(p["linear"]) for p in d["parts"]), obj.family
    assert not all(_keeps_z(generate_object(i, anyway).description["object_linear"]) for i in range(12))
    with pytest.raises(ValueError, match="procedural.orientation='sideways'"):
        generate_object(0, ProceduralConfig(orientation="sideways"))


@pytest.mark.parametrize("family", PRIMITIVE_FAMILIES)
def test_single_part_families_are_closed_outward_and_match_analytic_volume(family):
    cfg = ProceduralConfig(seed=5, texture_resolution=32)
    for index in range(3):
        obj = generate_object(index, cfg, family=family)
        mesh = obj.mesh
        mesh.validate()
        assert obj.family == family and len(obj.description["parts"]) == 1
        assert 100 <= mesh.num_faces <= 5000
        assert np.abs(mesh.vertices).max() < 1.5  # unit-ish size
        assert (mesh.face_areas() > 0).all()
        tm = merged(mesh.vertices, mesh.faces)
        assert tm.is_watertight and tm.is_winding_consistent
        assert tm.euler_number == (0 if family == "torus" else 2)  # poles and caps closed: a sphere's topology
        part = obj.description["parts"][0]
        det = np.linalg.det(part["linear"]) * np.linalg.det(obj.description["object_linear"])
        expected = exact_volume(family, part["params"]) * det
        volume = signed_volume(mesh.vertices, mesh.faces)
        assert volume > 0
        assert volume == pytest.approx(expected, rel=0.03)
        # outward normals: face normals point away from the solid's centroid on average, per face for convex ones
        if family in ("box", "sphere", "cylinder", "capsule"):
            centroid = tm.center_mass
            away = np.einsum("ij,ij->i", mesh.face_normals(), mesh.vertices[mesh.faces].mean(1) - centroid)
            assert (away > 0).all()


def test_union_parts_are_closed_and_overlap():
    cfg = ProceduralConfig(seed=2, min_parts=1, max_parts=4, texture_resolution=32)
    counts = set()
    for index in range(8):
        obj = generate_object(index, cfg, family="union")
        mesh = obj.mesh
        mesh.validate()
        n = len(obj.description["parts"])
        counts.add(n)
        assert 2 <= n <= 4 and len(mesh.materials) == n
        boxes = []
        for k in range(n):
            sel = mesh.faces[mesh.face_material == k]
            tm = merged(mesh.vertices, sel)
            assert tm.is_watertight and signed_volume(mesh.vertices, sel) > 0
            used = mesh.vertices[np.unique(sel)]
            boxes.append((used.min(0), used.max(0)))
        for k in range(1, n):  # every later part touches the bounding box of some earlier part
            assert any((boxes[k][0] <= hi).all() and (lo <= boxes[k][1]).all() for lo, hi in boxes[:k])
        modes = {p["color"]["mode"] for p in obj.description["parts"]}
        assert not {"vertex", "texture"} <= modes
    assert len(counts) > 1
    parts = ProceduralConfig(seed=2, min_parts=4, max_parts=5, texture_resolution=16)
    assert all(4 <= len(generate_object(i, parts, family="union").description["parts"]) <= 5 for i in range(4))
    single = ProceduralConfig(seed=2, min_parts=1, max_parts=1, texture_resolution=16)
    assert "union" not in {generate_object(i, single).family for i in range(40)}
    assert len(generate_object(0, single, family="union").description["parts"]) == 2


def test_tessellated_volumes_of_known_shapes():
    box = box_surface([0.1, 0.2, 0.3])
    assert signed_volume(box.vertices, box.faces) == pytest.approx(0.048, rel=1e-12)
    r, h, n = 0.3, 0.7, 48
    cyl = cylinder_surface(r, h)
    inscribed_prism = n / 2 * r * r * np.sin(2 * np.pi / n) * h
    assert signed_volume(cyl.vertices, cyl.faces) == pytest.approx(inscribed_prism, rel=1e-12)
    cone = cone_surface(r, h, 0.0)
    assert signed_volume(cone.vertices, cone.faces) == pytest.approx(inscribed_prism / 3, rel=1e-12)
    sphere = sphere_surface(0.4)
    vol = signed_volume(sphere.vertices, sphere.faces)
    assert 0.985 * 4 / 3 * np.pi * 0.4**3 < vol < 4 / 3 * np.pi * 0.4**3  # inscribed polyhedron, close
    torus = torus_surface(0.35, 0.1)
    assert signed_volume(torus.vertices, torus.faces) == pytest.approx(2 * np.pi**2 * 0.35 * 0.01, rel=0.02)
    cap = capsule_surface(0.2, 0.5)
    exact = np.pi * 0.04 * 0.5 + 4 / 3 * np.pi * 0.008
    assert signed_volume(cap.vertices, cap.faces) == pytest.approx(exact, rel=0.02)
    star = polygon_outline("star", 5, 0.4, 0.2, 0.3)
    area = 5 * 0.4 * 0.2 * np.sin(np.pi / 5)  # ten triangles of sides 0.4 and 0.2 at angle pi/5
    assert shoelace(star) == pytest.approx(area, rel=1e-12)
    prism = extrusion_surface(star, 0.5)
    assert signed_volume(prism.vertices, prism.faces) == pytest.approx(area * 0.5, rel=1e-12)
    tapered = extrusion_surface(star, 0.5, taper=0.5)  # planar trapezoid sides: exact frustum volume
    assert signed_volume(tapered.vertices, tapered.faces) == pytest.approx(area * 0.5 * 1.75 / 3, rel=1e-12)
    twisted = extrusion_surface(star, 0.5, twist=1.0)
    tm = merged(twisted.vertices, twisted.faces)
    assert tm.is_watertight and signed_volume(twisted.vertices, twisted.faces) == pytest.approx(area * 0.5, rel=0.05)
    hexagon = extrusion_surface(polygon_outline("polygon", 6, 0.3, 0.3, 0.0), 0.2)
    assert signed_volume(hexagon.vertices, hexagon.faces) == pytest.approx(1.5 * np.sqrt(3) * 0.09 * 0.2, rel=1e-12)


def test_uvs_are_continuous_per_face_and_inside_the_unit_square(many):
    for obj in many:
        uv = obj.mesh.face_uvs
        assert uv is not None and uv.shape == (obj.mesh.num_faces, 3, 2)
        assert uv.min() >= 0 and uv.max() <= 1
        assert np.ptp(uv, axis=1).max() < 0.3  # no face jumps across a seam (u 1 -> 0)
    # a sphere's pole copies sit at one position with u at the middle of their triangle's column
    sphere = sphere_surface(0.5)
    top = np.isclose(sphere.vertices[:, 2], 0.5)
    assert top.sum() == 48 and np.allclose(sphere.vertices[top, :2], 0)
    assert np.allclose(np.sort(sphere.uvs[top, 0]), (np.arange(48) + 0.5) / 48)


def test_colour_modes_textures_and_visibility(many):
    modes = [p["color"]["mode"] for obj in many for p in obj.description["parts"]]
    assert set(modes) == set(COLOR_MODES)
    patterns = set()
    for obj in many:
        mesh = obj.mesh
        for k, (mat, part) in enumerate(zip(mesh.materials, obj.description["parts"], strict=True)):
            sel = np.nonzero(mesh.face_material == k)[0]
            if part["color"]["mode"] != "flat":  # consecutive palette colours contrast, so patterns show
                assert np.linalg.norm(np.diff(part["color"]["colors"], axis=0), axis=1).min() > 0.29
            if part["color"]["mode"] == "texture":
                patterns.add(part["color"]["pattern"])
                assert mat.texture.dtype == np.uint8 and mat.texture.shape == (64, 64, 3)
                assert len(np.unique(mat.texture.reshape(-1, 3), axis=0)) > 1 and mat.texture.std() > 5
            elif part["color"]["mode"] == "vertex":
                assert mat.texture is None and np.ptp(mesh.corner_colors[sel], axis=(0, 1))[:3].max() > 0.05
            else:
                assert mat.texture is None
                assert mesh.corner_colors is None or np.allclose(mesh.corner_colors[sel], 1)
        rgb = face_colors(mesh)[:, :3]
        assert rgb.max(axis=1).min() >= 0.25  # never near black
        assert rgb.min(axis=1).max() <= 0.82  # never near white
    assert len(patterns) >= 3


def test_vertex_colours_vary_smoothly():
    cfg = ProceduralConfig(seed=0, texture_resolution=16)
    found = 0
    for index in range(60):
        obj = generate_object(index, cfg)
        if obj.family == "union" or obj.description["parts"][0]["color"]["mode"] != "vertex":
            continue
        found += 1
        cc = obj.mesh.corner_colors
        within_face = np.ptp(cc, axis=1).max(axis=1)
        across_part = np.ptp(cc.reshape(-1, 4), axis=0).max()
        assert np.quantile(within_face, 0.9) < 0.3 * across_part  # neighbouring corners close, far ones differ
        # corners that share a position share a colour (continuous across seams)
        pos = obj.mesh.vertices[obj.mesh.faces].reshape(-1, 3).round(9)
        _, inverse = np.unique(pos, axis=0, return_inverse=True)
        spread = np.zeros((inverse.max() + 1, 4))
        np.maximum.at(spread, inverse.reshape(-1), cc.reshape(-1, 4))
        low = np.ones_like(spread)
        np.minimum.at(low, inverse.reshape(-1), cc.reshape(-1, 4))
        assert (spread - low).max() < 1e-6
    assert found >= 3


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_round_trip_through_mesh_files(tmp_path, suffix):
    from one2345pp.geometry.mesh_io import load_mesh, save_mesh

    cfg = ProceduralConfig(seed=9, texture_resolution=32)
    seen = set()
    for index in range(8):
        obj = generate_object(index, cfg)
        seen.update(p["color"]["mode"] for p in obj.description["parts"])
        mesh = obj.mesh
        loaded = load_mesh(save_mesh(mesh, tmp_path / f"{obj.uid}{suffix}"))
        assert loaded.num_faces == mesh.num_faces
        dist, idx = cKDTree(loaded.vertices[loaded.faces].mean(1)).query(mesh.vertices[mesh.faces].mean(1))
        assert dist.max() < 1e-5
        np.testing.assert_allclose(
            loaded.surface_color(idx, np.repeat(CENTRE, len(idx), 0)), face_colors(mesh), atol=0.01
        )
    assert seen == set(COLOR_MODES)
