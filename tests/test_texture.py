"""Stage 4: colour field, texture refinement, baking, export (GLB / OBJ / PLY) and the training stage."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from one2345pp.cameras import Camera, multiview_cameras
from one2345pp.config import ConfigError
from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
from one2345pp.data.shards import build_shards
from one2345pp.geometry.mesh import Material, Mesh, sample_texture
from one2345pp.models.color_field import ColorField, ColorFieldConfig
from one2345pp.rendering.rasterizer import interpolate, make_rasterizer
from one2345pp.rendering.raycast import RaycastRenderer
from one2345pp.stages import texture as stage
from one2345pp.texture.bake import BakeConfig, bake, bake_vertex_colors, dilate
from one2345pp.texture.export import TexturedMesh, export_mesh, save_glb, save_obj, save_ply
from one2345pp.texture.refine import RefineConfig, image_to_view, psnr, render_field, view_psnr
from one2345pp.texture.settings import TextureSettings, load_settings, texture_mesh

REPO = Path(__file__).resolve().parents[1]
RES = 64
DIST = 2.2
FOV = 30.0
SMALL_FIELD = ColorFieldConfig(resolution=48, components=8)  # the default decoder (27 features, 64 hidden)


# ------------------------------------------------------------------------------------------------ the test object
def textured_sphere(radius: float = 0.4) -> Mesh:
    """An icosphere with a smooth procedural texture in spherical UVs (seam faces unwrapped, repeat lookups)."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    u = np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi) + 0.5
    t = 1.0 - np.arccos(np.clip(v[:, 2] / radius, -1, 1)) / np.pi
    face_uvs = np.stack([u, t], axis=-1)[f]
    seam = face_uvs[..., 0].max(1) - face_uvs[..., 0].min(1) > 0.5
    fu = face_uvs[seam, :, 0]
    face_uvs[seam, :, 0] = np.where(fu < 0.5, fu + 1.0, fu)
    h, w = 64, 128
    yy, xx = np.mgrid[0:h, 0:w]
    s, q = (xx + 0.5) / w, 1.0 - (yy + 0.5) / h
    tex = np.stack(
        [
            0.5 + 0.4 * np.sin(4 * np.pi * s),
            0.5 + 0.35 * np.cos(3 * np.pi * q),
            0.45 + 0.35 * np.sin(2 * np.pi * s + 2 * np.pi * q),
        ],
        axis=-1,
    )
    texture = np.round(tex * 255).astype(np.uint8)
    return Mesh(v, f, face_uvs=face_uvs, materials=[Material("pattern", np.ones(4), texture)])


@pytest.fixture(scope="module")
def scene():
    mesh = textured_sphere()
    renderer = RaycastRenderer(RenderConfig(supersample=2))
    cameras = [Camera(0.0, 15.0, DIST, FOV, RES, RES), *multiview_cameras(0.0, "zero123pp-v1.2", DIST, RES)]
    views = [image_to_view(renderer.render(mesh, c).rgba, c) for c in cameras]
    held_camera = Camera(60.0, 30.0, DIST, FOV, RES, RES)  # between the generated views, above them
    held = image_to_view(renderer.render(mesh, held_camera).rgba, held_camera)
    return mesh, views, held


@pytest.fixture(scope="module")
def refined(scene):
    """Refinement + bake through the pipeline entry point :func:`one2345pp.stages.texture.texture_mesh`."""
    mesh, views, _ = scene
    settings = TextureSettings(
        field=SMALL_FIELD,
        refine=RefineConfig(iterations=300, batch_pixels=0, lr=0.05, decoder_lr=0.005, progress=False, threads=1),
        bake=BakeConfig(texture_size=256, padding=2, dilation=8),
    )
    baked, result = texture_mesh(mesh, views, settings)
    rasterizer = make_rasterizer("cpu")
    return baked, result, rasterizer, rasterizer.prepare(mesh)


# ---------------------------------------------------------------------------------------------------- colour field
def test_new_field_is_flat_gray_and_checks_config():
    field = ColorField(SMALL_FIELD)
    rgb = field(torch.rand(100, 3) - 0.5)
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.5))
    assert field.planes[0].shape == (1, 8, 48, 48) and field.lines[0].shape == (1, 8, 48, 1)
    assert field.basis.out_features == 27
    with pytest.raises(ValueError, match="field.resolution"):
        ColorField(ColorFieldConfig(resolution=0))
    vd = ColorField(ColorFieldConfig(resolution=8, components=2, view_dependent=True))
    with pytest.raises(ValueError, match="view dependent"):
        vd(torch.zeros(4, 3))


# ------------------------------------------------------------------------------------------------------ refinement
def test_refinement_raises_held_out_psnr(scene, refined):
    mesh, views, held = scene
    _, result, rasterizer, rm = refined
    gray = ColorField(SMALL_FIELD)  # where every refinement starts
    before = view_psnr(gray, rasterizer, rm, held)
    after = view_psnr(result.field, rasterizer, rm, held)
    assert before < 18.0, before
    assert after >= 25.0, (before, after)
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert result.samples > 0.3 * RES * RES * len(views)


def test_refine_rejects_bad_settings(scene):
    mesh, views, _ = scene
    with pytest.raises(ValueError, match="refine.precision"):
        texture_mesh(mesh, views, TextureSettings(refine=RefineConfig(precision="fp8")))
    with pytest.raises(ValueError, match="at least one view"):
        from one2345pp.texture.refine import refine_texture

        refine_texture(mesh, [], SMALL_FIELD, RefineConfig(progress=False))


# ------------------------------------------------------------------------------------------------------------ bake
def _render_baked(baked: TexturedMesh, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Colours of the baked mesh seen by ``camera``: its texture sampled (bilinear) at the interpolated UVs."""
    rasterizer = make_rasterizer("cpu")
    rm = rasterizer.prepare((baked.vertices, baked.faces))
    rast = rasterizer.rasterize(rm, [camera])
    mask = rast.mask[0].numpy()
    uv = interpolate(torch.as_tensor(baked.uvs, dtype=torch.float32), rm.faces, rast)[0].numpy()[mask]
    return sample_texture(baked.texture, uv)[:, :3], mask


def test_bake_then_render_matches_the_field(scene, refined):
    mesh, views, held = scene
    baked, result, rasterizer, rm = refined
    assert baked.texture.shape == (256, 256, 3) and baked.num_faces == mesh.num_faces
    for view in [*views, held]:
        expected, hit = render_field(result.field, rasterizer, rm, view.camera, direction="normal")
        got, mask = _render_baked(baked, view.camera)
        np.testing.assert_array_equal(mask, hit[0].numpy())
        value = psnr(torch.as_tensor(got), expected.reshape(3, -1).t()[torch.as_tensor(mask).reshape(-1)])
        assert value >= 30.0, value


def test_bake_queries_along_the_reversed_normal():
    """A view-dependent field is baked looking straight at the surface (direction = -normal)."""
    torch.manual_seed(0)
    field = ColorField(ColorFieldConfig(resolution=8, components=2, feature_dim=4, hidden=8, view_dependent=True))
    torch.nn.init.normal_(field.head.weight, std=1.0)
    rasterizer = make_rasterizer("cpu")
    mesh = textured_sphere(0.3)
    baked = bake_vertex_colors(field, mesh, rasterizer)
    normals = torch.as_tensor(mesh.vertex_normals(), dtype=torch.float32)
    points = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    expected = field.query(points, -normals).numpy()
    np.testing.assert_allclose(baked.vertex_colors, expected, atol=1e-5)
    assert np.abs(field.query(points, normals).numpy() - expected).max() > 1e-3  # the direction matters


def test_dilation_fills_past_chart_borders():
    colors = np.zeros((8, 8, 3), np.float32)
    covered = np.zeros((8, 8), bool)
    covered[2:4, 2:4] = True
    colors[2:4, 2:4] = [[[0.2, 0.4, 0.6], [0.3, 0.4, 0.6]], [[0.2, 0.5, 0.6], [0.3, 0.5, 0.6]]]
    out = dilate(colors, covered, dilation=2)
    np.testing.assert_allclose(out[covered], colors[covered])
    np.testing.assert_allclose(out[1, 1], colors[2, 2])  # nearest chart texel
    np.testing.assert_allclose(out[2, 5], colors[2, 3])
    np.testing.assert_allclose(out[7, 7], colors[covered].mean(0))  # beyond the dilation: the mean chart colour


def test_vertex_colour_bake(refined):
    _, result, rasterizer, rm = refined
    vc = bake(result.field, rm, BakeConfig(mode="vertex"), rasterizer)
    assert vc.texture is None and vc.vertex_colors.shape == (rm.vertices.shape[0], 3)
    np.testing.assert_allclose(vc.vertex_colors, result.field.query(rm.vertices).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="bake.mode"):
        bake(result.field, rm, BakeConfig(mode="atlas"), rasterizer)


# ---------------------------------------------------------------------------------------------------------- export
def _load_trimesh(path: Path):
    """The one mesh of a file, as trimesh reads it (GLB scenes must hold exactly one geometry)."""
    import trimesh

    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):
        assert len(loaded.geometry) == 1, list(loaded.geometry)
        loaded = next(iter(loaded.geometry.values()))
    return loaded


def _trimesh_vertex_colors(tm) -> np.ndarray:
    """RGB per vertex as the file holds it (PLY: uint8 sRGB; the project's GLB: float linear COLOR_0, which trimesh
    keeps as a vertex attribute when the primitive has a material)."""
    if tm.visual.kind == "texture":
        return np.asarray(tm.visual.vertex_attributes["color"])[:, :3]
    return np.asarray(tm.visual.vertex_colors)[:, :3]


def _in_gltf_frame(points: np.ndarray) -> np.ndarray:
    """The project's +Z-up coordinates as glTF's +Y up, written out independently of the package:
    ``(x, y, z) -> (x, z, -y)``."""
    x, y, z = np.asarray(points, dtype=np.float64).T
    return np.stack([x, z, -y], axis=1)


def _srgb_to_linear(c) -> np.ndarray:
    """The sRGB transfer function decoded (IEC 61966-2-1), independently of the package."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def test_glb_round_trip(refined, tmp_path):
    from one2345pp.geometry.mesh_io import load_mesh

    baked = refined[0]
    path = save_glb(baked, tmp_path / "model.glb")
    # third-party readers see the file's own frame, glTF's +Y up
    tm = _load_trimesh(path)
    assert len(tm.vertices) == baked.num_vertices
    np.testing.assert_allclose(tm.vertices, _in_gltf_frame(baked.vertices), atol=1e-6)
    np.testing.assert_array_equal(tm.faces, baked.faces)
    np.testing.assert_allclose(tm.visual.uv, baked.uvs, atol=1e-6)  # trimesh returns OBJ-convention uvs
    image = np.asarray(tm.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(image, baked.texture)  # the texture stays sRGB-encoded, byte for byte
    _check_open3d_textured(path, baked, gltf=True)
    # the project's reader turns it back +Z up
    back = load_mesh(path)
    np.testing.assert_allclose(back.vertices, baked.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, baked.faces)
    np.testing.assert_allclose(back.face_uvs, baked.uvs[baked.faces], atol=1e-6)
    np.testing.assert_array_equal(back.materials[0].texture[..., :3], baked.texture)


def _check_open3d_textured(path: Path, baked: TexturedMesh, gltf: bool = False) -> None:
    """open3d reads the same corners (in glTF's +Y-up frame for a GLB), per-corner uvs and texture (its reader
    renumbers vertices, keeps faces in order, and stores images bottom row first)."""
    import open3d as o3d

    om = o3d.io.read_triangle_mesh(str(path), enable_post_processing=True)  # the flag loads materials
    assert len(om.vertices) == baked.num_vertices and len(om.triangles) == baked.num_faces
    assert om.has_textures() and len(om.textures) == 1
    np.testing.assert_array_equal(np.flipud(np.asarray(om.textures[0])[..., :3]), baked.texture)
    corners = np.asarray(om.vertices)[np.asarray(om.triangles)]
    expected = _in_gltf_frame(baked.vertices) if gltf else baked.vertices
    np.testing.assert_allclose(corners, expected[baked.faces], atol=1e-6)
    np.testing.assert_allclose(np.asarray(om.triangle_uvs).reshape(-1, 3, 2), baked.uvs[baked.faces], atol=1e-6)


def test_obj_round_trip(refined, tmp_path):
    from one2345pp.geometry.mesh_io import load_mesh

    baked = refined[0]
    path = save_obj(baked, tmp_path / "model.obj")
    assert {p.name for p in tmp_path.iterdir()} == {"model.obj", "model.mtl", "model.png"}
    tm = _load_trimesh(path)
    assert len(tm.vertices) == baked.num_vertices
    np.testing.assert_allclose(tm.vertices, baked.vertices, atol=1e-6)  # OBJ is written +Z up, as it is
    np.testing.assert_array_equal(tm.faces, baked.faces)
    np.testing.assert_allclose(tm.visual.uv, baked.uvs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tm.visual.material.image.convert("RGB")), baked.texture)

    _check_open3d_textured(path, baked)
    back = load_mesh(path)  # the project's reader takes OBJ as +Z up: the same orientation
    np.testing.assert_allclose(back.vertices, baked.vertices, atol=1e-6)


def test_ply_and_vertex_colour_glb_round_trip(refined, tmp_path):
    import open3d as o3d

    from one2345pp.geometry.mesh_io import load_mesh

    _, result, rasterizer, rm = refined
    vc = bake(result.field, rm, BakeConfig(mode="vertex"), rasterizer)
    expected = np.clip(np.round(vc.vertex_colors * 255), 0, 255).astype(np.uint8)
    # PLY: +Z up, sRGB bytes, as they are; GLB (glTF 2.0): +Y up, float linear COLOR_0
    files = {
        "model.ply": (vc.vertices, expected / 255.0),
        "colours.glb": (_in_gltf_frame(vc.vertices), _srgb_to_linear(vc.vertex_colors)),
    }
    for name, (positions, colours) in files.items():
        path = export_mesh(vc, tmp_path / name)
        tm = _load_trimesh(path)
        assert len(tm.vertices) == vc.num_vertices
        np.testing.assert_array_equal(tm.faces, vc.faces)
        np.testing.assert_allclose(tm.vertices, positions, atol=1e-6)
        theirs = np.asarray(_trimesh_vertex_colors(tm), dtype=np.float64)
        np.testing.assert_allclose(theirs / 255.0 if name.endswith(".ply") else theirs, colours, atol=1e-6)
        om = o3d.io.read_triangle_mesh(str(path), enable_post_processing=True)
        assert len(om.vertices) == vc.num_vertices and om.has_vertex_colors()
        # compare (position, colour) rows in a canonical order: open3d's glTF reader renumbers vertices
        ours = np.concatenate([np.round(positions, 5), colours], axis=1)
        theirs = np.concatenate([np.round(np.asarray(om.vertices), 5), np.asarray(om.vertex_colors)], axis=1)
        np.testing.assert_allclose(theirs[np.lexsort(theirs.T)], ours[np.lexsort(ours.T)], atol=1e-5)
    back = load_mesh(tmp_path / "model.ply")  # the project's reader takes PLY as +Z up: the same orientation
    np.testing.assert_allclose(back.vertices, vc.vertices, atol=1e-6)
    np.testing.assert_allclose(back.corner_colors[..., :3], (expected / 255.0)[vc.faces], atol=1e-6)
    # a textured mesh written as PLY carries its texture sampled at the vertices
    baked = refined[0]
    tm = _load_trimesh(save_ply(baked, tmp_path / "textured.ply"))
    sampled = np.clip(np.round(sample_texture(baked.texture, baked.uvs)[:, :3] * 255), 0, 255)
    np.testing.assert_array_equal(_trimesh_vertex_colors(tm), sampled)
    with pytest.raises(ValueError, match="supported types"):
        export_mesh(vc, tmp_path / "model.stl")


def capped_tower() -> TexturedMesh:
    """A tall box (0.2 x 0.4 x 1.0, off the origin) with a pyramid cap whose apex, the only vertex above z = 0.7,
    leans towards +X and -Y: no turn or mirror maps it onto itself. One saturated colour per face group, dark shades
    among them (where 8-bit linear storage would lose them)."""
    lo, hi = np.array([0.1, -0.2, -0.4]), np.array([0.3, 0.2, 0.6])
    corners = np.array([[lo[0] if i & 1 == 0 else hi[0], lo[1] if i & 2 == 0 else hi[1], lo[2]] for i in range(4)])
    apex = np.array([0.28, -0.1, 0.9])
    # faces wound counter-clockwise seen from outside (outward normals); every face has its own vertices so each
    # can carry its colour: sides (red, green, blue, yellow), bottom (dark magenta), cap (dark cyan and orange)
    b0, b1, b2, b3 = corners  # bottom: (lo, lo), (hi, lo), (lo, hi), (hi, hi) in (x, y)
    t0, t1, t2, t3 = (c + [0.0, 0.0, hi[2] - lo[2]] for c in corners)
    quads = {  # (a, b, c, d) counter-clockwise from outside
        (1.0, 0.0, 0.0): (b0, b1, t1, t0),  # -Y side
        (0.0, 1.0, 0.0): (b1, b3, t3, t1),  # +X side
        (0.0, 0.0, 1.0): (b3, b2, t2, t3),  # +Y side
        (1.0, 1.0, 0.0): (b2, b0, t0, t2),  # -X side
        (30 / 255, 0.0, 0.1): (b0, b2, b3, b1),  # bottom
    }
    vertices, faces, colours = [], [], []
    for colour, (a, b, c, d) in quads.items():
        k = len(vertices)
        vertices += [a, b, c, d]
        faces += [[k, k + 1, k + 2], [k, k + 2, k + 3]]
        colours += [colour] * 4
    for colour, (a, b) in zip([(0.0, 0.05, 0.05), (1.0, 0.5, 0.0)] * 2, [(t0, t1), (t1, t3), (t3, t2), (t2, t0)]):
        k = len(vertices)
        vertices += [a, b, apex]
        faces.append([k, k + 1, k + 2])
        colours += [colour] * 3
    return TexturedMesh(np.array(vertices), np.array(faces), vertex_colors=np.array(colours))


def _read_glb(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON of a GLB and its one primitive's attributes (+ ``indices``), parsed here with struct alone."""
    import struct

    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_len, json_kind = struct.unpack_from("<II", data, 12)
    assert json_kind == 0x4E4F534A
    doc = json.loads(data[20 : 20 + json_len])
    bin_len, bin_kind = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_kind == 0x004E4942
    blob = data[28 + json_len : 28 + json_len + bin_len]
    dtypes = {5121: "<u1", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}

    def accessor(i: int) -> np.ndarray:
        acc = doc["accessors"][i]
        view = doc["bufferViews"][acc["bufferView"]]
        assert "byteStride" not in view
        n = acc["count"] * width[acc["type"]]
        arr = np.frombuffer(blob, dtypes[acc["componentType"]], n, view["byteOffset"] + acc.get("byteOffset", 0))
        return arr.reshape(acc["count"], width[acc["type"]])

    (prim,) = doc["meshes"][0]["primitives"]
    arrays = {name: accessor(i) for name, i in prim["attributes"].items()}
    arrays["indices"] = accessor(prim["indices"]).reshape(-1, 3)
    return doc, arrays


def test_glb_is_gltf_convention_and_reads_back_upright(tmp_path):
    from one2345pp.geometry.mesh_io import load_mesh

    tower = capped_tower()
    path = save_glb(tower, tmp_path / "tower.glb")
    apex = int(np.argmax(tower.vertices[:, 2]))  # the cap's apex (several copies; argmax picks the first)
    cap = tower.vertices[:, 2] > 0.7

    # (a) the project's reader (up_axis=auto: a GLB is +Y up) gives back the same positions and colours, +Z up
    back = load_mesh(path)
    np.testing.assert_allclose(back.vertices, tower.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, tower.faces)
    np.testing.assert_allclose(back.corner_colors[..., :3], tower.vertex_colors[tower.faces], atol=0.5 / 255)
    np.testing.assert_allclose(back.corner_colors[..., 3], 1.0)
    assert np.argmax(back.vertices[:, 2]) == apex

    # (b) the file itself: +Y up (the cap's apex has the largest glTF y), COLOR_0 the linear decoding of the sRGB
    # colours, normals turned alike and pointing out of the solid, windings counter-clockwise from outside
    doc, arrays = _read_glb(path)
    pos = arrays["POSITION"].astype(np.float64)
    np.testing.assert_allclose(pos, _in_gltf_frame(tower.vertices), atol=1e-6)
    assert np.all(pos[cap, 1] > pos[~cap, 1].max()) and np.argmax(pos[:, 1]) == apex
    position_accessor = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    assert position_accessor["max"][1] == pytest.approx(0.9)  # the accessor's bounds are +Y up too
    colour = arrays["COLOR_0"]
    assert colour.dtype == np.float32 and colour.shape == (tower.num_vertices, 4)
    np.testing.assert_allclose(colour[:, :3], _srgb_to_linear(tower.vertex_colors), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(colour[:, 3], 1.0)
    assert colour[0, 0] == pytest.approx(1.0) and colour[16, 0] == pytest.approx(((30 / 255 + 0.055) / 1.055) ** 2.4)
    assert "baseColorFactor" not in doc["materials"][0]["pbrMetallicRoughness"]  # the default, linear white
    tri = pos[arrays["indices"]]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = tri.mean(1) - pos.mean(0)  # the solid is convex: face centre minus an inner point
    assert np.all(np.einsum("ij,ij->i", face_normals, outward) > 0)
    normals = arrays["NORMAL"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    corner_normals = normals[arrays["indices"]]
    assert np.all(np.einsum("ijk,ik->ij", corner_normals, face_normals) > 0)  # agree with the winding

    # (c) the Khronos validator passes it
    (report,) = _validate([path])
    assert report["errors"] == 0 and report["warnings"] == 0, report["messages"]


def _validate(paths: list[Path]) -> list[dict]:
    node = shutil.which("node")
    assert node is not None, "node is needed to run the Khronos glTF validator (tools/validate_gltf.js)"
    proc = subprocess.run(
        [node, str(REPO / "tools" / "validate_gltf.js"), *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (0, 1), f"validator did not run (`make setup` installs it): {proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_glb_passes_the_khronos_validator(refined, tmp_path):
    baked, result, rasterizer, rm = refined
    textured = save_glb(baked, tmp_path / "textured.glb")
    colours = save_glb(bake(result.field, rm, BakeConfig(mode="vertex"), rasterizer), tmp_path / "colours.glb")
    reports = _validate([textured, colours])
    assert len(reports) == 2
    for report in reports:
        assert report["errors"] == 0, report["messages"]
        assert report["warnings"] == 0, report["messages"]
    # the validator is not a rubber stamp: a GLB with an index out of range is an error
    from one2345pp.texture.export import glb_bytes

    broken = TexturedMesh(baked.vertices, baked.faces, baked.normals, baked.uvs, baked.texture)
    broken.faces = baked.faces.copy()
    broken.faces[0, 0] = baked.num_vertices + 5  # set after construction, which would refuse it
    bad = tmp_path / "broken.glb"
    bad.write_bytes(glb_bytes(broken))
    (report,) = _validate([bad])
    assert report["errors"] > 0


# ----------------------------------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("texture_shards")
    cfg = DataConfig(
        view_resolution=48,
        cond_resolution=48,
        cond_samples=2,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=16),
        procedural=ProceduralConfig(seed=3, texture_resolution=32, families=["sphere", "box", "cylinder"]),
        shards=ShardConfig(max_samples=2),
    )
    build_shards("procedural", out, cfg, num_objects=3, progress=False)
    return out


def test_stage_trains_reports_psnr_and_exports(shards, tmp_path, capsys):
    overrides = [
        f"data.train_shards={shards}",
        "data.max_objects=1",
        "data.max_val_objects=1",
        "field.resolution=32",
        "field.components=4",
        "field.feature_dim=8",
        "field.hidden=16",
        "refine.iterations=40",
        "refine.batch_pixels=0",
        "refine.progress=false",
        "refine.threads=1",
        "bake.texture_size=64",
        "export_formats=[glb,ply]",
        f"run.root={tmp_path}",
        "run.name=t",
        "trainer.enable_progress_bar=false",
    ]
    assert stage.train(None, overrides) == 0
    out = capsys.readouterr().out
    assert "held-out PSNR" in out
    run = tmp_path / "texture" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["objects"] == 1 and metrics["val"]["objects"] == 1
    assert 10.0 < metrics["train"]["psnr_mean"] < 60.0
    meshes = sorted(p.suffix for p in (run / "meshes").iterdir())
    assert meshes == [".glb", ".ply"]
    logged = list((run / "media").glob("train_mesh_*/step*.glb"))  # the GLB went to the logger's media too
    assert len(logged) == 1 and logged[0].read_bytes() == next((run / "meshes").glob("*.glb")).read_bytes()

    settings = load_settings(run / "export")
    assert settings.field.resolution == 32 and settings.refine.iterations == 40 and settings.bake.texture_size == 64
    doc = json.loads((run / "export" / "config.json").read_text())
    assert doc["stage"] == "texture" and doc["metrics"]["train"]["objects"] == 1

    again = stage.export(run, tmp_path / "again")
    assert load_settings(again) == settings
    ckpt = run / "ckpts" / "last.ckpt"
    assert ckpt.is_file()
    from_ckpt = stage.export(ckpt, tmp_path / "from_ckpt")
    assert load_settings(from_ckpt) == settings


def test_stage_config_and_export_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be different"):
        stage.train(None, ["data.supervise_condition=1", "data.holdout_condition=1"])
    with pytest.raises(ConfigError, match="export_formats"):
        stage.train(None, ["export_formats=[fbx]"])
    with pytest.raises(FileNotFoundError, match="texture run directory"):
        stage.export(tmp_path, None)
    (tmp_path / "config.json").write_text(json.dumps({"stage": "coarse"}))
    with pytest.raises(ValueError, match="not a texture-stage export"):
        load_settings(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"stage": "texture", "format_version": 1, "refine": {"iters": 3}}))
    with pytest.raises(ConfigError, match="iters"):
        load_settings(tmp_path)
