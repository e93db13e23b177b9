"""Dataset evaluation (``one2345pp eval --dataset gso|procedural``): the per-object scorer against itself, the
ground-truth framing, clear errors, and whole runs with a tiny random pipeline (tables, means, failures, --limit,
resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from one2345pp.cameras import Camera, multiview_cameras
from one2345pp.config import ConfigError
from one2345pp.data.procedural import box_surface, make_texture, sphere_surface
from one2345pp.evaluation.config import EvalConfig
from one2345pp.evaluation.dataset import (
    evaluate_dataset,
    frame_ground_truth,
    list_objects,
    load_eval_config,
)
from one2345pp.evaluation.geometry import unit_box
from one2345pp.evaluation.lpips import LPIPS, save_weights
from one2345pp.evaluation.scoring import ObjectScorer, over, render_rgba, to_uint8
from one2345pp.geometry.mesh import Material, Mesh
from one2345pp.geometry.mesh_io import save_mesh

REPO = Path(__file__).resolve().parents[1]

# small protocol: few points, a 4-candidate rotation search, 8 evaluation views of 32 px
FAST = [
    "points=3000",
    "alignment.up_axes=1",
    "alignment.azimuth_step_deg=90",
    "alignment.search_points=1000",
    "alignment.refine_points=3000",
    "views.azimuth_step_deg=90",
    "views.resolution=32",
    "render.supersample=1",
    "device=cpu",
    "progress=false",
]


def _textured(surface, seed: int) -> Mesh:
    texture, _ = make_texture(np.random.default_rng(seed), 64, "checker")
    mat = Material("skin", np.ones(4, np.float32), texture)
    return Mesh(surface.vertices, surface.faces, face_uvs=surface.uvs[surface.faces], materials=[mat])


def _box(seed: int = 0) -> Mesh:
    return _textured(box_surface([0.35, 0.22, 0.28]), seed)


def _sphere(seed: int = 1) -> Mesh:
    return _textured(sphere_surface(0.3), seed)


def write_gso_object(root: Path, name: str, mesh: Mesh) -> Path:
    """One object in the Google Scanned Objects layout: meshes/model.obj + model.mtl naming ``texture.png``, which
    lives in materials/textures/ (so it is found through the GSO texture fallback, as in the real dataset)."""
    meshes = root / name / "meshes"
    save_mesh(mesh, meshes / "model.obj")
    textures = root / name / "materials" / "textures"
    textures.mkdir(parents=True)
    pngs = sorted(meshes.glob("model_*.png"))
    assert len(pngs) == 1
    pngs[0].rename(textures / "texture.png")
    mtl = meshes / "model.mtl"
    mtl.write_text(mtl.read_text().replace(pngs[0].name, "texture.png"))
    return meshes / "model.obj"


def _cfg(*extra: str) -> EvalConfig:
    return load_eval_config([*FAST, *extra])


# ---------------------------------------------------------------------------------------------- framing
def test_gso_layout_object_reads_with_its_texture(tmp_path):
    write_gso_object(tmp_path, "Red_Box", _box())
    items = list_objects("gso", tmp_path, _cfg(), tmp_path / "out")
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in items] == ["Red_Box/meshes/model.obj"]
    mesh = items[0].load()
    assert mesh.materials[0].texture is not None  # found through materials/textures/texture.png
    assert np.array_equal(mesh.materials[0].texture[..., :3], _box().materials[0].texture[..., :3])


def test_frame_ground_truth_normalises_and_turns_the_input_azimuth_to_zero():
    mesh = _box().transformed(3.0, np.array([1.0, -2.0, 0.5]))
    gt = frame_ground_truth(mesh, 0.9)
    lo, hi = gt.bounds
    assert np.allclose((lo + hi) / 2, 0.0, atol=1e-9)
    assert (hi - lo).max() == pytest.approx(0.9)
    # turned by -azimuth: the camera at azimuth 0 of the turned mesh sees what azimuth 70 saw before
    turned = frame_ground_truth(mesh, 0.9, input_azimuth_deg=70.0)
    from one2345pp.data.config import RenderConfig
    from one2345pp.rendering.raycast import RaycastRenderer

    renderer = RaycastRenderer(RenderConfig(supersample=1))
    a = renderer.render(gt, Camera(70.0, 20.0, 3.0, 30.0, 48, 48))
    b = renderer.render(turned, Camera(0.0, 20.0, 3.0, 30.0, 48, 48))
    assert a.mask.sum() > 200
    assert np.array_equal(a.mask, b.mask)
    assert np.allclose(a.depth, b.depth, atol=1e-4)


# ---------------------------------------------------------------------------------------------- scoring
def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    lpips = save_weights(LPIPS(), root / "lpips.safetensors")
    return {"clip": _tiny_clip(root / "clip"), "lpips": lpips}


def test_ground_truth_scored_against_itself(model_paths):
    cfg = _cfg(f"clip.model={model_paths['clip']}", f"lpips.weights={model_paths['lpips']}")
    scorer = ObjectScorer(cfg)
    assert scorer.unavailable == {}
    gt = frame_ground_truth(_box(), 0.9)
    cams = multiview_cameras(0.0, "zero123pp-v1.2", 3.01, 48)
    views = to_uint8(over(render_rgba(scorer.renderer, gt, cams), 0.5))  # "generated" = the ground truth itself
    scored = scorer.score(gt, gt, views, cams)
    m = scored.metrics
    # two independent samples of n points on one surface of area A: the mean nearest-neighbour distance of a
    # uniform planar sample is 0.5 sqrt(A / n), so Chamfer should be about that
    area = Mesh(unit_box(gt.vertices), gt.faces).face_areas().sum()
    assert m["fscore"] > 0.99
    assert m["chamfer"] == pytest.approx(0.5 * math.sqrt(area / cfg.points), rel=0.1)
    assert m["psnr"] == math.inf and m["psnr_views"] == [math.inf] * 6
    assert m["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m["clip"] == pytest.approx(1.0, abs=1e-5)
    assert m["mask_iou"] > 0.97  # the mask found from the gray background, as the pipeline finds it
    assert scored.images["gt_views"].shape == (3 * 48, 2 * 48, 3)
    assert scored.images["turntable"].shape == (2 * 32, 4 * 32, 3)  # one row per elevation
    assert np.array_equal(scored.images["turntable"], scored.images["gt_turntable"])


def test_other_object_scores_lower_and_unconfigured_models_are_unavailable():
    scorer = ObjectScorer(_cfg())
    assert set(scorer.unavailable) == {"clip", "lpips"} and all(scorer.unavailable.values())
    gt = frame_ground_truth(_box(), 0.9)
    pred = frame_ground_truth(_sphere(), 0.9)
    cams = multiview_cameras(0.0, "zero123pp-v1.2", 3.01, 48)
    views = to_uint8(over(render_rgba(scorer.renderer, pred, cams), 0.5))
    m = scorer.score(pred, gt, views, cams).metrics
    assert m["clip"] is None and m["lpips"] is None
    assert m["fscore"] < 0.9 and m["chamfer"] > 0.02
    assert 0.3 < m["mask_iou"] < 0.95
    # PSNR: per view against the ground truth on gray (quantised like a saved image), then averaged
    target = to_uint8(over(render_rgba(scorer.renderer, gt, cams), 0.5)).astype(np.float64) / 255
    mse = ((views.astype(np.float64) / 255 - target) ** 2).mean(axis=(1, 2, 3))
    assert m["psnr_views"] == pytest.approx(list(10 * np.log10(1 / mse)))
    assert m["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))))


# ---------------------------------------------------------------------------------------------- errors
def test_dataset_listing_errors(tmp_path):
    cfg = _cfg()
    with pytest.raises(FileNotFoundError, match="Google Scanned Objects folder not found"):
        list_objects("gso", tmp_path / "nope", cfg, tmp_path / "out")
    with pytest.raises(ValueError, match="needs --input"):
        list_objects("gso", None, cfg, tmp_path / "out")
    with pytest.raises(ValueError, match="takes no --input"):
        list_objects("procedural", tmp_path, cfg, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown dataset"):
        list_objects("objaverse", tmp_path, cfg, tmp_path / "out")
    items = list_objects("procedural", None, _cfg("procedural.num_objects=3"), tmp_path / "out")
    assert [i.uid for i in items] == ["proc-1000-000000", "proc-1000-000001", "proc-1000-000002"]


def test_bad_settings_and_missing_paths_are_clear_errors(tmp_path, model_paths):
    with pytest.raises(ConfigError, match="nope"):
        load_eval_config(["nope=1"])
    with pytest.raises(ConfigError, match="mesh_format"):
        load_eval_config(["mesh_format=stl"])
    with pytest.raises(FileNotFoundError, match="CLIP model folder not found"):
        ObjectScorer(_cfg(f"clip.model={tmp_path / 'no_clip'}"))
    with pytest.raises(FileNotFoundError, match="LPIPS weights not found"):
        ObjectScorer(_cfg(f"lpips.weights={tmp_path / 'no.safetensors'}"))
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        evaluate_dataset("procedural", None, tmp_path / "no_pipe", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        evaluate_dataset("procedural", None, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


@pytest.mark.parametrize("name", ["gso", "procedural"])
def test_presets_load(name):
    cfg = load_eval_config([], REPO / "experiments" / "eval" / f"{name}.yaml")
    assert isinstance(cfg, EvalConfig)
    if name == "gso":
        assert cfg.points == 100_000 and cfg.clip.model and cfg.lpips.weights
        assert len(cfg.views.elevations_deg) == 2 and cfg.views.azimuth_step_deg == 30.0


# ---------------------------------------------------------------------------------------------- whole runs
METRIC_KEYS = ("fscore", "chamfer", "clip", "psnr", "lpips", "mask_iou", "seconds")


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "objects").glob("*/metrics.json"))}


@pytest.mark.slow
def test_gso_run_tables_means_limit_resume_and_a_broken_object(tmp_path, tiny_pipeline_dir, model_paths):
    gso, out = tmp_path / "gso", tmp_path / "eval"
    write_gso_object(gso, "Ball", _sphere())
    write_gso_object(gso, "Box", _box())
    args = dict(dataset="gso", input_dir=gso, pipeline_dir=tiny_pipeline_dir, out_dir=out)
    overrides = [*FAST, f"clip.model={model_paths['clip']}", f"lpips.weights={model_paths['lpips']}"]

    first = evaluate_dataset(**args, limit=1, overrides=overrides)
    assert (first["count"], first["evaluated"], first["skipped"]) == (1, 1, 0)
    assert len(_read_csv(out / "metrics.csv")) == 1
    done = _mtimes(out)

    full = evaluate_dataset(**args, overrides=overrides)
    assert (full["count"], full["succeeded"], full["evaluated"], full["skipped"]) == (2, 2, 1, 1)
    assert _mtimes(out)[next(iter(done))] == next(iter(done.values()))  # the finished object was not redone
    for name in ("metrics.csv", "metrics.json", "report.md", "report.html", "eval_config.yaml"):
        assert (out / name).is_file(), name
    rows = _read_csv(out / "metrics.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    data = json.loads((out / "metrics.json").read_text())
    assert data["unavailable"] == {} and full["unavailable"] == {}
    for key in METRIC_KEYS:
        values = [float(r[key]) for r in rows]
        assert all(math.isfinite(v) for v in values), key
        assert data["mean"][key] == pytest.approx(sum(values) / 2), key
        assert full["mean"][key] == pytest.approx(sum(values) / 2), key
    for r in rows:
        assert 0.0 <= float(r["fscore"]) <= 1.0 and -1.0 <= float(r["clip"]) <= 1.0
        for key in ("input_image", "views_image", "gt_views_image", "turntable_image", "gt_turntable_image", "mesh"):
            assert (out / r[key]).is_file(), key
        obj = json.loads((out / "objects" / r["uid"] / "metrics.json").read_text())
        assert obj["fscore"] == pytest.approx(float(r["fscore"])) and len(obj["psnr_views"]) == 6
    md = (out / "report.md").read_text()
    assert "2 of 2 objects" in md and "93.6" in md
    assert "objects/" in (out / "report.html").read_text()

    # a broken object: recorded with its reason, the others kept; a rerun leaves it alone unless asked
    (gso / "Broken" / "meshes").mkdir(parents=True)
    (gso / "Broken" / "meshes" / "model.obj").write_bytes(b"\x00\x01 this is not a mesh \xff\xfe\n")
    before = _mtimes(out)
    third = evaluate_dataset(**args, overrides=overrides)
    assert (third["count"], third["succeeded"], third["failed"], third["evaluated"]) == (3, 2, 1, 1)
    (failure,) = third["failures"]
    assert failure["uid"].startswith("Broken") and failure["reason"].startswith("load: ")
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before
    rows = _read_csv(out / "metrics.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]  # folders in sorted order: Ball, Box, Broken
    assert json.loads((out / "metrics.json").read_text())["mean"]["fscore"] == pytest.approx(full["mean"]["fscore"])
    assert failure["reason"] in (out / "report.md").read_text()
    assert evaluate_dataset(**args, overrides=overrides)["evaluated"] == 0
    assert evaluate_dataset(**args, overrides=[*overrides, "retry_failed=true"])["evaluated"] == 1

    with pytest.raises(ConfigError, match="points"):  # other settings into the same folder are refused
        evaluate_dataset(**args, overrides=[*overrides, "points=2000"])


@pytest.mark.slow
def test_eval_command_on_two_procedural_objects_writes_its_tables(tmp_path, tiny_pipeline_dir, capsys):
    from one2345pp.cli import main

    out = tmp_path / "eval"
    preset = REPO / "experiments" / "eval" / "procedural.yaml"
    args = ["eval", "--dataset", "procedural", "--pipeline", str(tiny_pipeline_dir), "--out", str(out)]
    assert main([*args, "--config", str(preset), *FAST, "procedural.num_objects=2"]) == 0
    assert "2 of 2 objects succeeded" in capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    assert (data["count"], data["succeeded"]) == (2, 2), data["failures"]
    assert set(data["unavailable"]) == {"clip", "lpips"}
    rows = _read_csv(out / "metrics.csv")
    assert [r["uid"] for r in rows] == ["proc-1000-000000", "proc-1000-000001"]
    assert all(r["clip"] == "" and r["lpips"] == "" for r in rows)  # recorded as not measured, not faked
    for key in ("fscore", "chamfer", "psnr", "mask_iou", "seconds"):
        assert data["mean"][key] == pytest.approx(sum(float(r[key]) for r in rows) / 2)
    assert sorted(p.name for p in (out / "meshes").iterdir()) == [r["uid"] for r in rows]  # written, read back
    md = (out / "report.md").read_text()
    assert "not available (no CLIP model configured" in md and "not GSO" in md
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_cli_names_an_unreachable_clip_model_without_a_traceback(tmp_path, tiny_pipeline_dir, monkeypatch, capsys):
    from one2345pp.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id is not cached: no download is tried
    code = main(
        [
            "eval",
            "--dataset",
            "procedural",
            "--pipeline",
            str(tiny_pipeline_dir),
            "--out",
            str(tmp_path / "out"),
            "clip.model=nobody/no-such-clip",
            "lpips.weights=null",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "one2345pp eval: error: CLIP model 'nobody/no-such-clip' could not be loaded" in err
    assert "Traceback" not in err
