"""``one2345pp infer``: the four outputs per image, skipping finished images, recording failures; and the CLI's
``eval --dataset`` hook and --help of every subcommand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from one2345pp.cli import main

STAGES = {"preprocess", "multiview", "coarse", "fine", "extraction", "texture", "total", "turntable", "write"}
QUICK = ["turntable.views=4", "turntable.size=24", "turntable.supersample=1", "--no-progress"]


def _rgba(path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[14:50, 18:46] = (40, 120, 200, 255)
    Image.fromarray(a, "RGBA").save(path)
    return path


def _rgb_on_white(path):
    a = np.full((72, 60, 3), 255, np.uint8)
    yy, xx = np.mgrid[:72, :60]
    a[(yy - 36) ** 2 + (xx - 30) ** 2 < 18**2] = (200, 60, 40)
    Image.fromarray(a, "RGB").save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def job(tiny_pipeline_dir, tmp_path_factory):
    """One infer run over an RGBA and an RGB image."""
    root = tmp_path_factory.mktemp("infer")
    images = [_rgba(root / "cup.png"), _rgb_on_white(root / "ball.jpg")]
    out = root / "out"
    rc = main(
        ["infer", *map(str, images), "--pipeline", str(tiny_pipeline_dir), "--out", str(out), "--seed", "2", *QUICK]
    )
    return {"rc": rc, "root": root, "images": images, "out": out, "pipeline": tiny_pipeline_dir}


@pytest.mark.slow
def test_infer_writes_the_four_outputs_per_image(job):
    import trimesh

    assert job["rc"] == 0
    assert sorted(p.name for p in job["out"].iterdir()) == ["ball", "cup"]  # no temporary folders left
    for stem in ("cup", "ball"):
        folder = job["out"] / stem
        assert sorted(p.name for p in folder.iterdir()) == ["mesh.glb", "result.json", "turntable.png", "views.png"]
        scene = trimesh.load(folder / "mesh.glb")
        geom = list(scene.geometry.values())
        assert len(geom) == 1 and len(geom[0].faces) > 0
        material = geom[0].visual.material
        assert material.baseColorTexture is not None and material.baseColorTexture.size == (64, 64)
        assert Image.open(folder / "views.png").size == (64, 96)
        strip = np.asarray(Image.open(folder / "turntable.png"))
        assert strip.shape == (24, 4 * 24, 3)
        assert np.any(strip != 128)  # something drawn over the gray background in every frame
        for i in range(4):
            frame = strip[:, 24 * i : 24 * (i + 1)].astype(int)
            assert np.abs(frame - 128).max() > 20, i
        r = json.loads((folder / "result.json").read_text())
        assert r["status"] == "ok" and r["reason"] is None and r["seed"] == 2
        assert r["image"].endswith({"cup": "cup.png", "ball": "ball.jpg"}[stem])
        assert r["pipeline"] == str(job["pipeline"].resolve())
        assert set(r["timings"]) == STAGES and all(v >= 0 for v in r["timings"].values())
        assert r["run"]["seed"] == 2 and r["run"]["num_inference_steps"] == 4
        assert r["turntable"] == {"views": 4, "elevation_deg": 20.0, "size": 24, "supersample": 1}
        assert r["settings"]["view_size"] == 32 and r["texture"]["refine"]["iterations"] == 20
        assert r["versions"]["torch"] and r["versions"]["one2345pp"]
        assert r["mesh"]["textured"] and r["mesh"]["faces"] == len(geom[0].faces)


@pytest.mark.slow
def test_rerun_skips_finished_images_and_overwrite_redoes_them(job, capsys):
    out, cup = job["out"], job["out"] / "cup" / "result.json"
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    args = ["infer", *map(str, job["images"]), "--pipeline", str(job["pipeline"]), "--out", str(out), "--seed", "2"]
    assert main([*args, *QUICK]) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    assert main([*args[:2], *args[3:], "--overwrite", *QUICK]) == 0  # the RGBA image only
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert cup.stat().st_mtime_ns != stamp[cup] and json.loads(cup.read_text())["status"] == "ok"
    assert (out / "ball" / "result.json").stat().st_mtime_ns == stamp[out / "ball" / "result.json"]


@pytest.mark.slow
def test_a_failing_image_is_recorded_and_the_others_go_on(job, capsys):
    root, out = job["root"], job["out"]
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(root / "clear.png")
    images = [root / "broken.png", job["images"][0], root / "clear.png", root / "missing.png"]
    args = ["infer", *map(str, images), "--pipeline", str(job["pipeline"]), "--out", str(out), *QUICK]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "0 done, 1 skipped (finished before), 3 failed" in captured.out
    for stem, reason in (("broken", "not a readable image"), ("clear", "no object"), ("missing", "no such file")):
        assert f"failed: {root / stem}" in captured.err and reason in captured.err
        r = json.loads((out / stem / "result.json").read_text())
        assert r["status"] == "failed" and r["reason"].startswith("ImageError") and reason in r["reason"]
        assert sorted(p.name for p in (out / stem).iterdir()) == ["result.json"]
    assert json.loads((out / "cup" / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_infer_refuses_bad_jobs_before_running(job, tmp_path, capsys):
    img, pipe = str(job["images"][0]), str(job["pipeline"])
    assert main(["infer", img, "--pipeline", pipe, "--out", str(tmp_path / "a"), "num_inference_step=3"]) == 2
    assert "num_inference_step" in capsys.readouterr().err
    assert main(["infer", img, "--pipeline", pipe, "--out", str(tmp_path / "a"), "turntable.views=0"]) == 2
    assert "turntable: views must be >= 1" in capsys.readouterr().err
    assert main(["infer", img, "--pipeline", pipe, "--out", str(tmp_path / "a"), "--device", "cuda:99"]) == 2
    assert "--device cuda:99: no such CUDA device here" in capsys.readouterr().err
    assert main(["infer", img, "--pipeline", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    other = _rgba(tmp_path / "b" / "cup.png")
    assert main(["infer", img, str(other), "--pipeline", pipe, "--out", str(tmp_path / "a")]) == 2
    assert "two inputs share the output name 'cup'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_eval_dataset_is_wired_to_evaluate_dataset(monkeypatch, tmp_path, capsys):
    import one2345pp.evaluation.dataset as dataset

    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return {"count": 2, "succeeded": 2, "failed": 0, "skipped": 0, "mean": {"fscore": 0.5}, "files": {}}

    monkeypatch.setattr(dataset, "evaluate_dataset", fake)
    args = ["eval", "--dataset", "procedural", "--pipeline", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    assert main([*args, "eval.num_points=1000", "--limit", "3"]) == 0  # options after overrides too
    assert calls == [
        {
            "dataset": "procedural",
            "input_dir": None,
            "pipeline_dir": tmp_path / "p",
            "out_dir": tmp_path / "o",
            "limit": 3,
            "overrides": ["eval.num_points=1000"],
            "config_path": None,
        }
    ]
    assert "2 of 2 objects succeeded" in capsys.readouterr().out

    def missing(**kwargs):
        raise FileNotFoundError("GSO folder not found: /nowhere")

    monkeypatch.setattr(dataset, "evaluate_dataset", missing)
    assert main(["eval", "--dataset", "gso", "--input", "/nowhere", *args[3:]]) == 2
    assert "one2345pp eval: error: GSO folder not found: /nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "shapenet", *args[3:]])


@pytest.mark.parametrize(
    "command",
    [[], ["data"], ["data", "build"], ["data", "sheet"], ["train"], ["eval"], ["eval", "mesh"], ["infer"], ["sweep"]]
    + [["export"]],
)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: one2345pp" in capsys.readouterr().out
