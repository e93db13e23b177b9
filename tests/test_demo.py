"""``one2345pp demo`` (one2345pp.demo): the whole chain on a minimal config (3 objects at 32 px / 8^3, a few steps per
stage, one held-out image, one evaluated object) writes what it promises; a rerun skips every finished step; other
settings in the same folder are refused, --force redoes; bad configs fail before any work."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from one2345pp.config import ConfigError
from one2345pp.demo import DemoConfig, load_demo_config, run_demo

REPO = Path(__file__).resolve().parents[1]

# 32 px views, 8^3 shell / 16^3 fine cells; the stage sizes of tests/test_{coarse,fine,texture,multiview}.py
MINIMAL = f"""
jobs: 2
progress_interval: 0
data:
  config: null
  num_objects: 3
  workers: 1
  sheet_objects: 2
  overrides: [data.view_resolution=32, data.cond_resolution=32, data.cond_samples=2, data.render.supersample=1,
              data.volume.coarse_resolution=8, data.procedural.texture_resolution=32,
              "data.procedural.families=[sphere,box]", data.procedural.orientation=upright, data.shards.max_samples=2]
images:
  num_images: 1
train:
  multiview:
    config: {REPO}/experiments/tiny/multiview.yaml
    pretrained: null
    max_steps: 2
    overrides: [model.view_size=32, model.cond_size=32, train.cond_size_min=32, train.cond_size_max=32,
                train.vae_fit.steps=20,
                val.num_images=1, val.num_inference_steps=2, data.view_resolution=32, data.cond_resolution=32,
                data.batch_size=2, data.epoch_samples=2, data.num_workers=0, data.shuffle_buffer=2,
                trainer.limit_val_batches=1, optim.warmup_steps=0]
  coarse:
    config: {REPO}/experiments/tiny/coarse.yaml
    max_steps: 30
    overrides: [model.unet.resolution=8, model.unet.base_channels=8, "model.unet.channel_mults=[1,2,2]",
                "model.unet.attention_resolutions=[]", model.unet.head_channels=8,
                "model.condition.image_features.cnn_channels=[8,8]", model.condition.mlp_hidden=8,
                model.condition.feature_channels=8, "model.condition.level_channels=[4,4,8]",
                "model.global_embedding.cnn_channels=[8,8]", model.global_embedding.cnn_dim=8,
                model.diffusion.sample_steps=4, optim.warmup_steps=0, optim.lr=3e-3, val.sample_steps=2,
                ema.decay=0.5, data.view_resolution=32, data.cond_resolution=32, data.batch_size=2,
                data.num_workers=0, data.epoch_samples=60, data.shuffle_buffer=2, trainer.limit_val_batches=1]
  fine:
    config: {REPO}/experiments/tiny/fine.yaml
    max_steps: 15
    overrides: [model.unet.resolution=16, model.unet.base_channels=8, "model.unet.channel_mults=[1,2]",
                "model.condition.image_features.cnn_channels=[8,8]", model.condition.mlp_hidden=8,
                model.condition.feature_channels=8, "model.condition.level_channels=[4,8]",
                "model.global_embedding.cnn_channels=[8,8]", model.global_embedding.cnn_dim=8,
                model.sdf_truncation=0.1, model.diffusion.sample_steps=3, optim.warmup_steps=0, optim.lr=3e-3,
                val.sample_steps=2, ema.decay=0.5, train.crop=4, data.view_resolution=32,
                data.cond_resolution=32, data.batch_size=2, data.num_workers=0, data.epoch_samples=30,
                data.shuffle_buffer=2, trainer.limit_val_batches=1]
  texture:
    config: {REPO}/experiments/tiny/texture.yaml
    overrides: [data.view_resolution=32, data.cond_resolution=32, data.max_objects=1, data.max_val_objects=1,
                field.resolution=16, field.components=2, field.feature_dim=8, field.hidden=16, refine.iterations=10,
                refine.batch_pixels=0, bake.texture_size=64, "export_formats=[glb]"]
coarse_steps: 4
export_overrides: [num_inference_steps=2, fine_steps=3]
infer:
  overrides: [texture.refine.iterations=5, texture.bake.texture_size=64, turntable.views=2, turntable.size=32,
              turntable.supersample=1]
recon_points: 2000
eval:
  config: null
  num_objects: 1
  overrides: [points=2000, alignment.up_axes=1, alignment.azimuth_step_deg=90, alignment.search_points=1000,
              alignment.refine_points=2000, views.azimuth_step_deg=90, views.resolution=32, render.supersample=1,
              pipeline.refine_iterations=5, progress=false]
"""


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.refs.append(value)


def _refs(page: Path) -> list[str]:
    from urllib.parse import unquote

    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return [unquote(r) for r in parser.refs]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One minimal demo run: (config path, output folder, its console output)."""
    import io

    root = tmp_path_factory.mktemp("demo")
    config = root / "demo.yaml"
    config.write_text(MINIMAL)
    out = root / "out"
    stream = io.StringIO()
    code = run_demo(out, config, stream=stream)
    text = stream.getvalue()
    assert code == 0, text
    return config, out, text


@pytest.mark.slow
def test_demo_writes_the_pipeline_meshes_metrics_and_an_index_of_existing_files(demo):
    import trimesh

    _, out, text = demo
    state = json.loads((out / "demo.json").read_text())
    names = [
        "data",
        "heldout",
        "data-sheet",
        "heldout-images",
        *(f"train-{s}" for s in ("multiview", "coarse", "fine", "texture")),
        "export",
        "infer",
        "eval",
        "recon",
    ]
    assert list(state["steps"]) == names
    assert all(state["steps"][n]["status"] == "done" and state["steps"][n]["seconds"] >= 0 for n in names)
    # what each step made
    manifest = [json.loads(ln) for ln in (out / "data" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in manifest] == ["done"] * 3
    assert (out / "pipeline" / "model_index.json").is_file()
    for stage in ("multiview", "coarse", "fine", "texture"):
        assert (out / "checkpoints" / stage / "demo" / "config.yaml").is_file(), stage
    (image,) = json.loads((out / "heldout" / "images.json").read_text())
    assert image["name"].startswith("proc-2000-")  # another procedural seed than the training data (0)
    folder = out / "infer" / image["name"]
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == "ok"
    scene = trimesh.load(folder / "mesh.glb")
    faces = sum(len(g.faces) for g in scene.geometry.values())
    assert faces == result["mesh"]["faces"] > 0
    rows = (out / "eval" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("uid,status,fscore,chamfer")
    row = json.loads((out / "eval" / "metrics.json").read_text())["objects"][0]
    assert row["status"] == "ok" and 0.0 <= row["fscore"] <= 1.0 and row["uid"].startswith("proc-1000-")
    (recon,) = json.loads((out / "recon" / "metrics.json").read_text())["objects"]  # the 3D stages on true views
    assert recon["uid"] == image["name"] and 0.0 <= recon["fscore"] <= 1.0 and 0.0 <= recon["sphere_fscore"] <= 1.0
    # the index references only files that exist, and shows the image, its views, turntable, GLB and the metrics
    page = out / "index.html"
    refs = _refs(page)
    assert refs and all((out / r).exists() for r in refs), [r for r in refs if not (out / r).exists()]
    for rel in (
        image["input"],
        image["gt_views"],
        f"infer/{image['name']}/views.png",
        f"infer/{image['name']}/turntable.png",
        f"infer/{image['name']}/mesh.glb",
        "eval/report.html",
        "eval/metrics.csv",
        "data/contact_sheet.png",
    ):
        assert rel in refs, rel
    html = page.read_text()
    assert "missing:" not in html
    assert f"{row['fscore']:.3f}" in html  # the measured F-Score, as eval wrote it
    # progress and the path of the report were printed
    assert re.search(r"\[coarse\] step \d+/30", text)
    assert str((out / "index.html").resolve()) in text


@pytest.mark.slow
def test_the_eval_draws_held_out_objects_of_the_training_recipe(demo):
    """`eval --dataset procedural` in the demo generates objects of the kind the stages trained on (families,
    orientation, parts, textures, file formats), from another seed."""
    from omegaconf import OmegaConf

    _, out, _ = demo
    trained = OmegaConf.load(out / "data" / "config.yaml").data.procedural
    evaluated = OmegaConf.load(out / "eval" / "eval_config.yaml").config.procedural
    assert trained.orientation == "upright" and list(trained.families) == ["sphere", "box"]  # the test's recipe
    for key in ("families", "orientation", "min_parts", "max_parts", "texture_resolution", "file_formats"):
        assert evaluated[key] == trained[key], key
    assert evaluated.seed != trained.seed


def test_rerun_skips_finished_steps(demo):
    import io

    config, out, _ = demo
    stamp = {
        p: p.stat().st_mtime_ns
        for p in [out / "pipeline" / "model_index.json", out / "eval" / "metrics.csv", out / "data" / "manifest.jsonl"]
    }
    before = json.loads((out / "demo.json").read_text())["steps"]
    stream = io.StringIO()
    assert run_demo(out, config, stream=stream) == 0
    text = stream.getvalue()
    for name in before:
        assert f"[{name}] skipped: finished before" in text, name
    assert "started" not in text
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    after = json.loads((out / "demo.json").read_text())
    assert after["steps"] == before and len(after["runs"]) == 2


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(demo):
    config, out, _ = demo
    with pytest.raises(ConfigError, match=r"eval\.num_objects differ.*--force"):
        run_demo(out, config, ["eval.num_objects=2"])
    run_demo(out, config, ["jobs=1"])  # how the demo runs may change


def test_bad_configs_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.order"):
        load_demo_config(None, ["train.order=[coarse,fine]"])
    with pytest.raises(ConfigError, match=r"train\.coarse\.config=nope\.yaml: file not found"):
        load_demo_config(None, ["train.coarse.config=nope.yaml"])
    with pytest.raises(ConfigError, match="data.num_objects=1"):
        run_demo(tmp_path / "out", None, ["data.num_objects=1"])
    assert not (tmp_path / "out").exists()


def test_the_shipped_config_is_the_default_recipe():
    """experiments/demo.yaml writes out the defaults (with the measurements behind them as comments)."""
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # its paths are relative to the repository root
    try:
        cfg, conf = load_demo_config(REPO / "experiments" / "demo.yaml")
    finally:
        os.chdir(cwd)
    assert conf == DemoConfig()


def test_steps_run_when_their_needs_are_met_and_a_failure_stops_only_what_needs_it(tmp_path):
    """The scheduler on plain Python subprocesses: at most `jobs` at a time, dependencies, failures recorded with
    the tail of their log, the steps that need a failed one recorded as not run, the others going on."""
    import io
    import sys

    from one2345pp.demo.steps import Console, DemoState, Task, run_tasks

    def py(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    out = tmp_path / "out"
    out.mkdir()
    tasks = [
        Task("b", py("import sys; print('[coarse] step 1/1'); print('boom', file=sys.stderr); sys.exit(3)"), []),
        Task("a", py(f"open({str(out / 'a.txt')!r}, 'w').write('a')"), ["a.txt"], lambda: "made a"),
        Task("c", py("print('never')"), [], needs=("b",)),
        Task(
            "d",
            py(f"open({str(out / 'd.txt')!r}, 'w').write(open({str(out / 'a.txt')!r}).read() + 'd')"),
            ["d.txt"],
            needs=("a",),
        ),
        Task("e", py("pass"), ["e.txt"]),  # exits 0 but does not make its output
    ]
    state, stream, failed = DemoState(out), io.StringIO(), set()
    run_tasks(tasks, 2, state, Console(stream), 0.0, failed)
    steps = state.data["steps"]
    assert failed == {"b", "c", "e"}
    assert steps["a"]["status"] == "done" and steps["a"]["summary"] == "made a" and steps["a"]["cpu_seconds"] >= 0
    assert (out / "d.txt").read_text() == "ad" and steps["d"]["status"] == "done"  # ran after a, with its output
    assert steps["b"]["status"] == "failed" and steps["b"]["summary"] == "exit code 3" and "boom" in steps["b"]["tail"]
    assert steps["c"] == {**steps["c"], "status": "not run", "summary": "not run: needs b, which failed"}
    assert steps["e"]["status"] == "failed" and steps["e"]["summary"] == "missing outputs: e.txt"
    text = stream.getvalue()
    assert "[coarse] step 1/1" in text  # a stage's progress line is echoed
    assert "never" not in text and "boom" in (out / "logs" / "b.log").read_text()
    assert json.loads((out / "demo.json").read_text())["steps"] == steps
    assert state.finished("a") and not state.finished("b")
    (out / "a.txt").unlink()
    assert not state.finished("a")  # a recorded step whose output is gone is redone


def test_report_says_whether_the_multiview_model_follows_its_condition(tmp_path):
    from one2345pp.demo.report import _condition_note

    logs = tmp_path / "checkpoints" / "multiview" / "demo" / "logs"
    logs.mkdir(parents=True)
    assert _condition_note(tmp_path, "demo") == []  # nothing logged yet
    for gain, says in ((0.004, "come out alike for every input"), (0.31, "explains that share of the loss")):
        (logs / "metrics.csv").write_text(f"epoch,step,val/loss,val/cond_gain\n0,9,0.2,0.5\n1,19,0.1,{gain}\n")
        (note,) = _condition_note(tmp_path, "demo")
        assert f"val/cond_gain {gain:.3f}" in note and says in note


@pytest.mark.slow
def test_a_shipped_multiview_run_stands_in_for_its_training(demo, tmp_path):
    """train.multiview.pretrained: the shipped run folder is copied where the demo's own run would be (no training),
    and the pipeline export reads the run's data_config.yaml when its shards are not there (a fresh clone)."""
    import shutil

    from omegaconf import OmegaConf

    from one2345pp.demo.plan import shipped_step
    from one2345pp.pipeline.build import build_pipeline

    _, out, _ = demo
    runs = out / "checkpoints"
    trained = runs / "multiview" / "demo"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for folder in ("export", "logs"):
        shutil.copytree(trained / folder, shipped / folder)
    cfg = OmegaConf.load(trained / "config.yaml")
    cfg.data.train_shards = str(tmp_path / "shards-not-here")
    OmegaConf.save(cfg, shipped / "config.yaml")
    with pytest.raises(FileNotFoundError, match="shards-not-here"):  # no shards, no data config: refused
        build_pipeline(shipped, runs / "coarse" / "demo", runs / "fine" / "demo", tmp_path / "p0")
    shutil.copy(out / "data" / "config.yaml", shipped / "data_config.yaml")

    demo_out = tmp_path / "out"
    outputs, summary, _ = shipped_step(demo_out, "multiview", shipped)()
    assert outputs and all((demo_out / p).exists() for p in outputs)  # config.yaml and the export folder
    assert str(shipped) in summary and "2 steps" in summary
    assert not list((demo_out / "checkpoints" / "multiview").glob(".tmp-*"))
    pipe = build_pipeline(
        demo_out / "checkpoints" / "multiview" / "demo",
        runs / "coarse" / "demo",
        runs / "fine" / "demo",
        tmp_path / "pipe",
    )
    assert (pipe / "model_index.json").is_file()
    with pytest.raises(ConfigError, match="from-scratch"):  # a folder that is not a trained run: before any work
        load_demo_config(None, [f"train.multiview.pretrained={tmp_path / 'empty'}"])


def test_from_scratch_trains_every_stage(monkeypatch, tmp_path):
    """`one2345pp demo --from-scratch` clears every stage's shipped model (train.<stage>.pretrained=null)."""
    import one2345pp.demo as demo_module
    from one2345pp import cli

    seen = {}

    def fake_run_demo(out, config, overrides, force=False):
        seen["cfg"] = load_demo_config(config, overrides)[1]
        return 0

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    monkeypatch.chdir(REPO)  # the default config's paths are relative to the repository root
    assert cli.main(["demo", "--out", str(tmp_path / "o"), "--from-scratch"]) == 0
    assert all(getattr(seen["cfg"].train, s).pretrained is None for s in ("multiview", "coarse", "fine", "texture"))
