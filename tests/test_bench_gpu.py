"""`make bench-gpu ARGS=--dry-run`: the GPU benchmark's code on the CPU at tiny sizes, with the packages the GPU machine
lacks made unimportable, writes the same JSON and table as on a GPU, so that the GPU call can fail only for GPU
reasons. About 60 s on the shared 2-core machine (one child process per group of rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402

KEYS = ("name", "group", "figure", "target", "units", "status", "measured", "measured_text", "met", "reason", "device")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
def test_dry_run_writes_every_row_and_marks_the_cuda_rows_not_run(tmp_path):
    scene = tmp_path / "scene.npz"
    res = run("--write-scene", str(scene), "--scene-objects", "1", "--scene-resolution", "64")
    assert res.returncode == 0, res.stderr[-3000:]
    objects = bench_gpu.load_scene(scene)
    assert len(objects) == 1 and len(objects[0]["views"]) == 7 and objects[0]["face_ids"].shape == (7, 64, 64)
    assert (objects[0]["face_ids"] >= 0).any() and (objects[0]["face_ids"] < objects[0]["mesh"].num_faces).all()

    out = tmp_path / "out"
    res = run("--dry-run", "--out", str(out), "--scene", str(scene))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    report = json.loads((out / "bench_gpu.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == report  # the JSON line the other benchmarks print
    assert report["bench"] == "gpu" and report["dry_run"] is True
    assert set(bench_gpu.DEVICE_ABSENT) <= set(report["absent"])  # open3d, pymeshlab, ... as on the GPU machine
    env = report["environment"]
    assert {"device", "torch", "cuda", "python", "packages"} <= set(env)
    assert [r["name"] for r in report["rows"]] == [r.name for r in bench_gpu.ROWS]
    for row in report["rows"]:
        assert set(KEYS) <= set(row), row["name"]
        spec = bench_gpu.ROW_BY_NAME[row["name"]]
        assert row["target"] and row["units"] == spec.units and row["met"] is None  # no targets in a dry run
        if spec.cuda_only:
            assert row["status"] == "not_run" and "needs CUDA" in row["reason"], row
            assert row["measured"] is None and row["measured_text"] == "-"
        else:  # everything else runs on the CPU, without open3d and pymeshlab
            assert row["status"] == "ok", (row["name"], row["reason"], row["details"].get("traceback"))
            assert isinstance(row["measured"], float) and row["measured"] > 0 and row["device"] == "cpu"
    texture = next(r for r in report["rows"] if r["name"] == "texture_refine")
    assert "1 objects, read" in texture["reason"]  # the dry run reads the scene file the GPU rows use
    pipeline = next(r for r in report["rows"] if r["name"] == "pipeline_glb")
    assert pipeline["details"]["faces"] > 0 and pipeline["details"]["refine"] is False
    assert (out / "pipeline.glb").read_bytes()[:4] == b"glTF"

    md = (out / "bench_gpu.md").read_text()
    assert "DRY RUN" in md and env["torch"] in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | figure | target | measured | met | device |")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [r.name for r in bench_gpu.ROWS]


def test_an_exhausted_budget_skips_the_groups_and_still_writes_the_report(tmp_path):
    res = run("--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--rows", "sparse_conv,pipeline_glb")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]}
    assert rows["sparse_conv"]["status"] == "not_run" and "time budget" in rows["sparse_conv"]["reason"]
    assert rows["multiview_sample"]["reason"] == "not selected (--rows)"
    assert (tmp_path / "bench_gpu.md").is_file()


def test_targets_compare_the_measured_value_or_the_peak_memory():
    ok = {"status": "ok", "measured": 3.5, "details": {"peak_gib": 80.0}}
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["multiview_sample"], ok, dry=False) is True
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["multiview_sample"], ok, dry=True) is None
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["multiview_train_step"], ok, dry=False) is False  # 80 GiB > 78
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["raster_agreement"], {**ok, "measured": 99.5}, dry=False) is True
    slow_compile = {"status": "ok", "measured": 3.0, "details": {"pays": False}}
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["multiview_sample_compiled"], slow_compile, dry=False) is False
    assert bench_gpu.met(bench_gpu.ROW_BY_NAME["multiview_sample"], {"status": "error"}, dry=False) is None
    assert bench_gpu.measured_text(bench_gpu.ROW_BY_NAME["multiview_train_step"], ok) == "3.50 s/step, peak 80.0 GiB"
