"""The inference pipeline: folder round trip, seeds, component swaps, refused stage mixes, and the pipeline folder
built from run directories by ``one2345pp export --multiview/--coarse/--fine``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import SPHERE_RADIUS, tiny_coarse_config, tiny_fine_config, tiny_multiview, tiny_texture_settings
from one2345pp.cli import main
from one2345pp.config import save_config
from one2345pp.data.config import DataBuildConfig
from one2345pp.pipeline.one2345 import COMPONENTS, One2345PPPipeline, PipelineSettings


@pytest.fixture(scope="module")
def image():
    """An RGBA input: a red box with an orange cap on a transparent background."""
    a = np.zeros((80, 80, 4), np.uint8)
    a[20:60, 25:55] = (190, 40, 30, 255)
    a[20:30, 25:55] = (230, 140, 20, 255)
    return Image.fromarray(a, "RGBA")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return One2345PPPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def reference(pipe, image):
    return pipe(image, seed=3)


def _same(a, b) -> None:
    for x, y in zip(a.views, b.views, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(a.coarse_occupancy, b.coarse_occupancy)
    assert a.mesh_raw.num_vertices == b.mesh_raw.num_vertices and a.mesh_raw.num_faces == b.mesh_raw.num_faces
    assert a.mesh.num_vertices == b.mesh.num_vertices


def test_output_fields_and_the_fixture_object(tiny_pipeline_dir, reference):
    out = reference
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "One2345PPPipeline"
    assert {k: index[k] for k in COMPONENTS} == {k: list(v) for k, v in COMPONENTS.items()}
    assert index["settings"]["view_size"] == 32 and index["settings"]["preprocess"]["size"] == 32
    assert out.condition.size == (32, 32) and len(out.views) == 6 and out.views[0].size == (32, 32)
    grid = np.asarray(out.grid)
    assert grid.shape == (96, 64, 3)  # 3 rows x 2 columns, row-major
    assert np.array_equal(grid[32:64, 32:64], np.asarray(out.views[3]))
    assert [round(c.azimuth_deg) for c in out.cameras] == [30, 90, 150, 210, 270, 330]
    assert [c.elevation_deg for c in out.cameras] == [20, -10, 20, -10, 20, -10]
    assert out.coarse_occupancy.shape == (8, 8, 8) and out.coarse_occupancy.dtype == bool
    # the 3D stages were fitted to a sphere of radius 0.3 (conftest): whatever the views, that is what comes out
    centres = (np.argwhere(out.coarse_occupancy) + 0.5) / 8 - 0.5
    assert abs(np.linalg.norm(centres, axis=1).mean() - SPHERE_RADIUS) < 0.1
    radius = np.linalg.norm(out.mesh_raw.vertices, axis=1)
    assert abs(radius.mean() - SPHERE_RADIUS) < 0.1 and radius.std() < 0.08  # one fine voxel is 0.0625
    assert out.mesh.textured and out.mesh.texture.shape[:2] == (64, 64)  # texture.bake.texture_size of the fixture
    assert set(out.timings) == {"preprocess", "multiview", "coarse", "fine", "extraction", "texture", "total"}
    assert all(v >= 0 for v in out.timings.values())
    assert out.timings["total"] >= sum(v for k, v in out.timings.items() if k != "total")
    assert out.settings == {
        "seed": 3,
        "num_inference_steps": 4,
        "guidance_scale": 4.0,
        "num_candidates": 1,  # the fixture's multi-view folder draws one grid per input
        "sampler": "euler_a",
        "coarse_steps": 8,
        "fine_steps": 4,
        "coarse_guidance": 1.0,
        "fine_guidance": 1.0,
        "refine": True,
        "refine_iterations": 20,
    }


@pytest.mark.slow
def test_same_seed_same_output_other_seed_other_views(pipe, image, reference):
    _same(pipe(image, seed=3), reference)
    other = pipe(image, seed=4)
    assert not np.array_equal(np.asarray(other.grid), np.asarray(reference.grid))


@pytest.mark.slow
def test_save_pretrained_round_trip(pipe, image, reference, tmp_path):
    out = pipe.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary folder left
    again = One2345PPPipeline.from_pretrained(out)
    assert again.settings == pipe.settings and again.texture == pipe.texture
    _same(again(image, seed=3), reference)
    pipe.save_pretrained(out)  # replacing an existing folder
    assert (out / "model_index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


@pytest.mark.slow
def test_swapping_components_by_keyword(tiny_pipeline_dir, image, reference):
    other = One2345PPPipeline.from_pretrained(tiny_pipeline_dir, multiview=tiny_multiview(seed=1))
    out = other(image, seed=3)
    assert not np.array_equal(np.asarray(out.grid), np.asarray(reference.grid))  # other multi-view weights
    assert out.coarse_occupancy.any()  # the stored 3D stages still run on the new views
    quick = One2345PPPipeline.from_pretrained(
        tiny_pipeline_dir, settings=PipelineSettings(view_size=32, num_inference_steps=2, refine=False)
    )
    assert quick.settings.num_inference_steps == 2
    flat = quick(image, seed=3, coarse_steps=8, fine_steps=4)
    assert flat.settings["num_inference_steps"] == 2 and not flat.settings["refine"]
    assert not flat.mesh.textured and flat.mesh.vertex_colors is not None
    assert flat.mesh.num_vertices == flat.mesh_raw.num_vertices  # no UV seams: the extracted mesh's own vertices
    with pytest.raises(TypeError, match="unknown pipeline components"):
        One2345PPPipeline.from_pretrained(tiny_pipeline_dir, unet=None)


def test_mismatched_stages_are_refused(tiny_pipeline_dir):
    from one2345pp.models.fine import FineModel

    fine32 = FineModel(tiny_fine_config(resolution=32))  # refines a 16^3 coarse grid; the stored coarse is 8^3
    with pytest.raises(ValueError, match=r"coarse stage samples 8\^3 but the fine stage expects 16\^3"):
        One2345PPPipeline.from_pretrained(tiny_pipeline_dir, fine=fine32)
    with pytest.raises(ValueError, match="view_size=36 is not a multiple"):
        One2345PPPipeline.from_pretrained(tiny_pipeline_dir, settings=PipelineSettings(view_size=36))
    with pytest.raises(ValueError, match="sampler='heun'"):
        PipelineSettings(sampler="heun").check()


def test_empty_coarse_volume_is_a_clear_error(tiny_pipeline_dir, image):
    from one2345pp.models.coarse import CoarseModel

    class NothingThere(CoarseModel):
        def sample(self, views, cameras, cond_image, steps=None, generator=None, guidance_scale=None):
            r = self.resolution
            return -torch.ones(1, 1, r, r, r)

    empty = NothingThere(tiny_coarse_config())
    p = One2345PPPipeline.from_pretrained(tiny_pipeline_dir, coarse=empty)
    with pytest.raises(RuntimeError, match="empty occupancy volume for seed 5"):
        p(image, seed=5)


def test_broken_folders_are_clear_errors(tiny_pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        One2345PPPipeline.from_pretrained(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipeline_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "coarse": ["os", "system"]}))
    with pytest.raises(ValueError, match=r"component 'coarse' is \['os', 'system'\]"):
        One2345PPPipeline.from_pretrained(bad)
    (bad / "model_index.json").write_text(json.dumps({**index, "settings": {"steps": 3}}))
    with pytest.raises(ValueError, match="steps"):
        One2345PPPipeline.from_pretrained(bad)
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(bad / "fine")
    with pytest.raises(FileNotFoundError, match="component folder missing"):
        One2345PPPipeline.from_pretrained(bad)


# ------------------------------------------------------------------------------------------ export from run dirs
def _shards(root, **data):
    """A shard folder as far as the export reads it: the data config `one2345pp data build` writes."""
    cfg = OmegaConf.structured(DataBuildConfig)
    cfg = OmegaConf.merge(cfg, {"data": {"view_resolution": 32, "cond_resolution": 32, **data}})
    save_config(cfg, root / "config.yaml")
    return root


def _checkpoint(stage_cls, config_cls, model, run, shards, ckpt_name="last.ckpt"):
    """A run directory with config.yaml and a checkpoint as the stage's LightningModule writes it (its own
    on_save_checkpoint: model weights without frozen parts, EMA state = the given model's weights, model config)."""
    from one2345pp.training.ema import EMAWeights

    conf = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(config_cls), {"model": OmegaConf.to_container(OmegaConf.structured(model.cfg))}
        )
    )
    conf.data.train_shards = str(shards)
    conf.data.view_resolution = conf.data.cond_resolution = 32
    module = stage_cls(conf)
    module.model.load_state_dict(model.state_dict())
    module.ema = EMAWeights(module.model, 0.9)
    ckpt = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(ckpt)
    (run / "ckpts").mkdir(parents=True)
    torch.save(ckpt, run / "ckpts" / ckpt_name)
    save_config(OmegaConf.structured(conf), run / "config.yaml")
    return run


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    """Multi-view run with export/, coarse run with only ckpts/last.ckpt, fine run with a checkpoint file, texture
    YAML config: each stage's files from the fixture pipeline's weights."""
    from one2345pp.models.coarse import CoarseModel
    from one2345pp.models.fine import FineModel
    from one2345pp.stages.coarse import CoarseConfig, CoarseStage
    from one2345pp.stages.fine import FineConfig, FineStage
    from one2345pp.stages.multiview import MultiViewConfig
    from one2345pp.stages.texture import TextureStageConfig

    root = tmp_path_factory.mktemp("runs")
    shards = _shards(root / "shards")
    mv = root / "multiview"
    shutil.copytree(tiny_pipeline_dir / "multiview", mv / "export")
    mv_cfg = OmegaConf.merge(
        OmegaConf.structured(MultiViewConfig),
        {"model": {"view_size": 32, "cond_size": 32}, "data": {"train_shards": str(shards), "view_resolution": 32}},
    )
    save_config(mv_cfg, mv / "config.yaml")
    coarse = _checkpoint(
        CoarseStage, CoarseConfig, CoarseModel.from_pretrained(tiny_pipeline_dir / "coarse"), root / "coarse", shards
    )
    fine = _checkpoint(
        FineStage, FineConfig, FineModel.from_pretrained(tiny_pipeline_dir / "fine"), root / "fine", shards, "s7.ckpt"
    )
    t = tiny_texture_settings()
    tex_cfg = OmegaConf.merge(
        OmegaConf.structured(TextureStageConfig),
        {
            "field": OmegaConf.structured(t.field),
            "refine": OmegaConf.structured(t.refine),
            "bake": OmegaConf.structured(t.bake),
        },
    )
    save_config(tex_cfg, root / "texture.yaml")
    return {"root": root, "shards": shards, "multiview": mv, "coarse": coarse, "fine": fine / "ckpts" / "s7.ckpt"}


def _export(runs, out, *extra, **swap):
    r = {**runs, **swap}
    args = ["export", "--multiview", str(r["multiview"]), "--coarse", str(r["coarse"]), "--fine", str(r["fine"])]
    return main([*args, "--texture", str(runs["root"] / "texture.yaml"), "--out", str(out), *extra])


@pytest.mark.slow
def test_export_from_runs_reproduces_the_pipeline(runs, tiny_pipeline_dir, image, reference, tmp_path):
    before = sorted(p.relative_to(runs["root"]) for p in runs["root"].rglob("*"))
    assert _export(runs, tmp_path / "built", "num_inference_steps=4") == 0
    assert sorted(p.relative_to(runs["root"]) for p in runs["root"].rglob("*")) == before  # runs untouched
    built = One2345PPPipeline.from_pretrained(tmp_path / "built")
    stored = One2345PPPipeline.from_pretrained(tiny_pipeline_dir)
    # the settings come from the runs (shard data config, loader sizes, the models' sampling steps) + the override
    assert built.settings == stored.settings and built.texture == stored.texture
    _same(built(image, seed=3), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # no scratch folder left behind

    # the single-stage export still works on the same runs
    assert main(["export", "--stage", "coarse", "--run", str(runs["coarse"]), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["step"] == 7


def test_export_frames_inputs_as_the_multiview_run_framed_its_conditions(runs, tmp_path):
    mv = tmp_path / "multiview"
    shutil.copytree(runs["multiview"], mv)
    cfg = OmegaConf.load(mv / "config.yaml")
    assert _export(runs, tmp_path / "rendered") == 0  # conditions as rendered: the distance rule
    rendered = One2345PPPipeline.from_pretrained(tmp_path / "rendered").settings.preprocess.fill
    cfg.data.cond_fill = 0.7
    save_config(cfg, mv / "config.yaml")
    assert _export(runs, tmp_path / "framed", multiview=mv) == 0
    assert One2345PPPipeline.from_pretrained(tmp_path / "framed").settings.preprocess.fill == 0.7 != rendered


def test_export_refuses_stages_trained_on_different_data(runs, tmp_path, capsys):
    other = _shards(tmp_path / "v11", layout="zero123pp-v1.1")
    coarse = tmp_path / "coarse"
    shutil.copytree(runs["coarse"], coarse)
    cfg = OmegaConf.load(coarse / "config.yaml")
    cfg.data.train_shards = str(other)
    cfg.data.view_resolution = 64
    save_config(cfg, coarse / "config.yaml")
    assert _export(runs, tmp_path / "out", coarse=coarse) == 2
    err = capsys.readouterr().err
    assert "camera layout: multiview zero123pp-v1.2, coarse zero123pp-v1.1, fine zero123pp-v1.2" in err
    assert "view size: coarse 64, fine 32, multiview (generated) 32" in err
    assert not (tmp_path / "out").exists()

    # a fine stage refining another coarse grid
    from one2345pp.models.fine import FineModel
    from one2345pp.stages.fine import FineConfig, FineStage

    fine = _checkpoint(
        FineStage, FineConfig, FineModel(tiny_fine_config(resolution=32)), tmp_path / "f", runs["shards"]
    )
    assert _export(runs, tmp_path / "out", fine=fine) == 2
    assert "coarse stage samples 8^3 but the fine stage expects 16^3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["coarse", "f", "v11"]


def test_export_needs_the_data_facts_and_says_how_to_give_them(runs, tmp_path, capsys):
    coarse = tmp_path / "coarse"
    shutil.copytree(runs["coarse"], coarse)
    cfg = OmegaConf.load(coarse / "config.yaml")
    cfg.data.train_shards = "/cluster/shards/objaverse"
    save_config(cfg, coarse / "config.yaml")
    assert _export(runs, tmp_path / "out", coarse=coarse) == 2
    err = capsys.readouterr().err
    assert "/cluster/shards/objaverse/config.yaml is not here" in err and "layout=NAME extent=X distance=D|null" in err
    facts = ["layout=zero123pp-v1.2", "extent=0.9", "distance=null", "num_inference_steps=4"]
    assert _export(runs, tmp_path / "out", *facts, coarse=coarse) == 0
    assert One2345PPPipeline.from_pretrained(tmp_path / "out").settings.layout == "zero123pp-v1.2"
    assert _export(runs, tmp_path / "o2", "no_such_key=1") == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["export", "--multiview", str(runs["multiview"]), "--out", str(tmp_path / "o3")]) == 2
    assert "missing --coarse, --fine" in capsys.readouterr().err
    assert main(["export", "--stage", "coarse", "--run", str(coarse), "--fine", str(coarse)]) == 2
    assert "takes --run RUN [--out DIR] only (got --fine)" in capsys.readouterr().err
    assert main(["export", "--stage", "coarse", "--run", str(coarse), "val.num_candidates=2"]) == 2
    assert "only --stage multiview takes val.* ones" in capsys.readouterr().err
    assert _export(runs, tmp_path / "o4", coarse=tmp_path / "nowhere") == 2
    assert "no such run directory or checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_to_moves_the_multiview_stage_to_a_dtype(tiny_pipeline_dir, image, reference):
    p = One2345PPPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float64)
    assert p.dtype == torch.float64 and p.multiview.unet.dtype == torch.float64
    assert next(p.coarse.parameters()).dtype == torch.float32  # the 3D stages stay float32
    a, b = (p(image, seed=3, refine=False, coarse_steps=2, fine_steps=1) for _ in range(2))
    # diffusers draws the noise in the model's dtype, so the sample differs from float32's; a seed still fixes it
    assert np.array_equal(np.asarray(a.grid), np.asarray(b.grid)) and a.coarse_occupancy.any()
    assert p.to("cpu") is p and p.device == torch.device("cpu")


def test_texture_settings_from_config_run_checkpoint_or_export(runs, tmp_path):
    from one2345pp.pipeline.build import load_texture
    from one2345pp.texture.settings import TextureSettings, save_settings

    want = tiny_texture_settings()
    assert load_texture(None, tmp_path) == TextureSettings()
    assert load_texture(runs["root"] / "texture.yaml", tmp_path) == want
    run = tmp_path / "texture-run"
    run.mkdir()
    shutil.copy(runs["root"] / "texture.yaml", run / "config.yaml")
    assert load_texture(run, tmp_path / "scratch") == want  # a run without export/: the stage's export()
    assert (tmp_path / "scratch" / "texture" / "config.json").is_file() and not (run / "export").exists()
    save_settings(want, run / "export")
    assert load_texture(run, tmp_path) == want
    assert load_texture(run / "export" / "config.json", tmp_path) == want
    with pytest.raises(FileNotFoundError, match="--texture"):
        load_texture(tmp_path / "none", tmp_path)
