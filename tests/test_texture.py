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
    settings = stage.TextureSettings(
        field=SMALL_FIELD,
        refine=RefineConfig(iterations=300, batch_pixels=0, lr=0.05, decoder_lr=0.005, progress=False, threads=1),
        bake=BakeConfig(texture_size=256, padding=2, dilation=8),
    )
    baked, result = stage.texture_mesh(mesh, views, settings)
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
        stage.texture_mesh(mesh, views, stage.TextureSettings(refine=RefineConfig(precision="fp8")))
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
    """uint8 RGB per vertex: trimesh keeps glTF COLOR_0 as a vertex attribute when the primitive has a material."""
    if tm.visual.kind == "texture":
        return np.asarray(tm.visual.vertex_attributes["color"])[:, :3]
    return np.asarray(tm.visual.vertex_colors)[:, :3]


def test_glb_round_trip(refined, tmp_path):
    baked = refined[0]
    path = save_glb(baked, tmp_path / "model.glb")
    tm = _load_trimesh(path)
    assert len(tm.vertices) == baked.num_vertices
    np.testing.assert_allclose(tm.vertices, baked.vertices, atol=1e-6)
    np.testing.assert_array_equal(tm.faces, baked.faces)
    np.testing.assert_allclose(tm.visual.uv, baked.uvs, atol=1e-6)  # trimesh returns OBJ-convention uvs
    image = np.asarray(tm.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(image, baked.texture)

    _check_open3d_textured(path, baked)


def _check_open3d_textured(path: Path, baked: TexturedMesh) -> None:
    """open3d reads the same corners, per-corner uvs and texture (its reader renumbers vertices, keeps faces in
    order, and stores images bottom row first)."""
    import open3d as o3d

    om = o3d.io.read_triangle_mesh(str(path), enable_post_processing=True)  # the flag loads materials
    assert len(om.vertices) == baked.num_vertices and len(om.triangles) == baked.num_faces
    assert om.has_textures() and len(om.textures) == 1
    np.testing.assert_array_equal(np.flipud(np.asarray(om.textures[0])[..., :3]), baked.texture)
    corners = np.asarray(om.vertices)[np.asarray(om.triangles)]
    np.testing.assert_allclose(corners, baked.vertices[baked.faces], atol=1e-6)
    np.testing.assert_allclose(np.asarray(om.triangle_uvs).reshape(-1, 3, 2), baked.uvs[baked.faces], atol=1e-6)


def test_obj_round_trip(refined, tmp_path):
    baked = refined[0]
    path = save_obj(baked, tmp_path / "model.obj")
    assert {p.name for p in tmp_path.iterdir()} == {"model.obj", "model.mtl", "model.png"}
    tm = _load_trimesh(path)
    assert len(tm.vertices) == baked.num_vertices
    np.testing.assert_allclose(tm.vertices, baked.vertices, atol=1e-6)
    np.testing.assert_array_equal(tm.faces, baked.faces)
    np.testing.assert_allclose(tm.visual.uv, baked.uvs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tm.visual.material.image.convert("RGB")), baked.texture)

    _check_open3d_textured(path, baked)


def test_ply_and_vertex_colour_glb_round_trip(refined, tmp_path):
    import open3d as o3d

    _, result, rasterizer, rm = refined
    vc = bake(result.field, rm, BakeConfig(mode="vertex"), rasterizer)
    expected = np.clip(np.round(vc.vertex_colors * 255), 0, 255).astype(np.uint8)
    for name in ("model.ply", "colours.glb"):
        path = export_mesh(vc, tmp_path / name)
        tm = _load_trimesh(path)
        assert len(tm.vertices) == vc.num_vertices
        np.testing.assert_array_equal(tm.faces, vc.faces)
        np.testing.assert_array_equal(_trimesh_vertex_colors(tm), expected)
        om = o3d.io.read_triangle_mesh(str(path), enable_post_processing=True)
        assert len(om.vertices) == vc.num_vertices and om.has_vertex_colors()
        # compare (position, colour) rows in a canonical order: open3d's glTF reader renumbers vertices
        ours = np.concatenate([np.round(vc.vertices, 5), expected / 255.0], axis=1)
        theirs = np.concatenate([np.round(np.asarray(om.vertices), 5), np.asarray(om.vertex_colors)], axis=1)
        np.testing.assert_allclose(theirs[np.lexsort(theirs.T)], ours[np.lexsort(ours.T)], atol=1e-5)
    # a textured mesh written as PLY carries its texture sampled at the vertices
    baked = refined[0]
    tm = _load_trimesh(save_ply(baked, tmp_path / "textured.ply"))
    sampled = np.clip(np.round(sample_texture(baked.texture, baked.uvs)[:, :3] * 255), 0, 255)
    np.testing.assert_array_equal(_trimesh_vertex_colors(tm), sampled)
    with pytest.raises(ValueError, match="supported types"):
        export_mesh(vc, tmp_path / "model.stl")


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

    settings = stage.load_settings(run / "export")
    assert settings.field.resolution == 32 and settings.refine.iterations == 40 and settings.bake.texture_size == 64
    doc = json.loads((run / "export" / "config.json").read_text())
    assert doc["stage"] == "texture" and doc["metrics"]["train"]["objects"] == 1

    again = stage.export(run, tmp_path / "again")
    assert stage.load_settings(again) == settings
    ckpt = run / "ckpts" / "last.ckpt"
    assert ckpt.is_file()
    from_ckpt = stage.export(ckpt, tmp_path / "from_ckpt")
    assert stage.load_settings(from_ckpt) == settings


def test_stage_config_and_export_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be different"):
        stage.train(None, ["data.supervise_condition=1", "data.holdout_condition=1"])
    with pytest.raises(ConfigError, match="export_formats"):
        stage.train(None, ["export_formats=[fbx]"])
    with pytest.raises(FileNotFoundError, match="texture run directory"):
        stage.export(tmp_path, None)
    (tmp_path / "config.json").write_text(json.dumps({"stage": "coarse"}))
    with pytest.raises(ValueError, match="not a texture-stage export"):
        stage.load_settings(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"stage": "texture", "format_version": 1, "refine": {"iters": 3}}))
    with pytest.raises(ConfigError, match="iters"):
        stage.load_settings(tmp_path)
