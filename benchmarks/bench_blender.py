"""Blender as the reference, side by side: the same mesh files loaded with Blender's glTF / OBJ importers and
rendered with Cycles on the CPU from the same cameras as the project's loader + ray caster.

    make bench-blender [ARGS="--input my_meshes/ --procedural 2 --samples 32"]
    .venv/bin/python benchmarks/bench_blender.py --blender-python .venv-blender/bin/python [--input DIR] ...

Optional and outside ``make test``: Blender comes as the ``bpy`` module from PyPI (5.0.1 for Python 3.11, about
1 GB) in a virtualenv of its own (``make bench-blender`` creates ``.venv-blender`` when missing); the project's
environment never imports it. The Blender side is ``benchmarks/blender_render.py``.

Objects: files under ``--input`` (any readable format), ``--procedural`` procedural objects (written as GLB / OBJ
by the procedural source), and two assets written here: a +Y-up tower with a red cap (GLB, so the up-axis rule is
checked against Blender's importer) and a box with vertex colours, an unlit part and an emissive part. Per object, K
= 1 condition camera and its six target views of the data recipe (``data.*`` overrides apply) are rendered by both.

Reported per object: silhouette IoU (alpha > 0.5) of the condition view and the mean over all views, the mean
absolute RGB difference (0-255) where both silhouettes agree, and the seconds per object of each renderer (load +
all views; Blender: import + Cycles at ``--samples`` samples on ``--threads`` threads). Lighting matches the
project's Lambert + ambient (a uniform world of strength ``ambient`` and a sun of strength ``pi * diffuse``); Cycles
shades in linear light and the ray caster in display values, so colours of lit surfaces differ somewhat by design.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from one2345pp.config import load_config, to_object
from one2345pp.data.config import DataBuildConfig
from one2345pp.data.sample import object_rng, sample_cameras
from one2345pp.data.sources import materialise_procedural, procedural_items
from one2345pp.geometry.mesh import Material, Mesh, concatenate
from one2345pp.geometry.mesh_io import READ_SUFFIXES, load_mesh, normalize, save_mesh
from one2345pp.rendering.base import light_from_config
from one2345pp.rendering.raycast import RaycastRenderer


def _box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    f = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    )  # fmt: skip
    return v, f


def write_assets(folder: Path) -> list[Path]:
    """A capped tower and a box with vertex colours + unlit + emissive parts, as GLB (written +Y up)."""
    body = Mesh(*_box([-0.15, -0.15, 0.0], [0.15, 0.15, 1.0]), materials=[Material("body", [0.6, 0.6, 0.6, 1])])
    cap = Mesh(*_box([-0.2, -0.2, 1.0], [0.2, 0.2, 1.2]), materials=[Material("cap", [0.9, 0.1, 0.1, 1])])
    tower = save_mesh(concatenate([body, cap]), folder / "tower.glb")
    v, f = _box([0, 0, 0], [1, 0.6, 0.4])
    vc = np.concatenate([(v - v.min(0)) / np.ptp(v, axis=0) * 0.8 + 0.1, np.ones((len(v), 1))], axis=1)
    painted = Mesh(v, f, corner_colors=vc[f], materials=[Material("vc", [1, 1, 1, 1])])
    unlit = Mesh(*_box([1.1, 0, 0], [1.5, 0.6, 0.4]), materials=[Material("unlit", [0.2, 0.4, 0.9, 1], unlit=True)])
    glow = Mesh(
        *_box([-0.5, 0, 0], [-0.1, 0.6, 0.4]),
        materials=[Material("glow", [0, 0, 0, 1], emissive=[0.1, 0.9, 0.2])],
    )
    mixed = save_mesh(concatenate([painted, unlit, glow]), folder / "colours.glb")
    return [tower, mixed]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blender-python", default=".venv-blender/bin/python")
    ap.add_argument("--input", default=None, help="a folder of mesh files to compare as well")
    ap.add_argument("--procedural", type=int, default=2, help="procedural objects (GLB and OBJ alternate)")
    ap.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel")
    ap.add_argument("--threads", type=int, default=2, help="Cycles threads")
    ap.add_argument("--keep", default=None, help="keep the renders in this folder")
    ap.add_argument("overrides", nargs="*", help="data config overrides, e.g. data.view_resolution=160")
    args = ap.parse_args()
    cfg = to_object(load_config(DataBuildConfig, None, args.overrides)).data
    cfg.cond_samples = 1
    cfg.render.threads = 1
    renderer = RaycastRenderer(cfg.render)
    light = light_from_config(cfg.render)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(args.keep) if args.keep else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        files = write_assets(tmp / "assets")
        for item in procedural_items(cfg.procedural, args.procedural, tmp / "procedural"):
            files.append(Path(materialise_procedural(item, cfg.procedural)))
        if args.input:
            files += sorted(p for p in Path(args.input).rglob("*") if p.suffix.lower() in READ_SUFFIXES)

        ours, job_objects = {}, []
        for k, path in enumerate(files):
            name = f"{k:02d}-{path.stem}"
            t0 = time.perf_counter()
            mesh = load_mesh(path, up_axis=cfg.up_axis)
            mesh_n, scale, offset = normalize(mesh, cfg.normalize_extent)
            cond, views = sample_cameras(cfg, object_rng(cfg.seed, name))[0]
            cams = [cond, *views]
            renders = renderer.render_many(mesh_n, cams, light)
            ours[name] = {"seconds": time.perf_counter() - t0, "renders": renders, "path": str(path)}
            job_objects.append(
                {
                    "path": str(path.resolve()),
                    "out": str(tmp / "blender" / name),
                    "scale": float(scale),
                    "offset": [float(x) for x in offset],
                    "cameras": [
                        {"c2w": c.c2w.tolist(), "fov_deg": c.fov_deg, "width": c.width, "height": c.height}
                        for c in cams
                    ],
                }
            )
        job = {
            "samples": args.samples,
            "threads": args.threads,
            "ambient": light.ambient,
            "diffuse": light.diffuse,
            "light_dir": [float(x) for x in light.direction],
            "objects": job_objects,
        }
        (tmp / "job.json").write_text(json.dumps(job))
        script = Path(__file__).with_name("blender_render.py")
        subprocess.run([args.blender_python, str(script), str(tmp / "job.json")], check=True)

        from PIL import Image

        rows = {}
        for obj, (name, mine) in zip(job_objects, ours.items()):
            out = Path(obj["out"])
            ious, diffs = [], []
            for i, r in enumerate(mine["renders"]):
                ref = np.asarray(Image.open(out / f"view{i}.png").convert("RGBA"), dtype=np.float32) / 255.0
                a, b = r.rgba[..., 3] > 0.5, ref[..., 3] > 0.5
                ious.append(iou(a, b))
                both = a & b
                if both.any():
                    diffs.append(float(np.abs(r.rgba[both][:, :3] - ref[both][:, :3]).mean() * 255.0))
            blender_s = json.loads((out / "timing.json").read_text())["seconds"]
            rows[name] = {
                "file": mine["path"],
                "views": len(ious),
                "iou_cond": ious[0],
                "iou_mean": float(np.mean(ious)),
                "iou_min": float(np.min(ious)),
                "color_diff": float(np.mean(diffs)) if diffs else float("nan"),
                "ours_s": mine["seconds"],
                "blender_s": blender_s,
            }

    res = cfg.view_resolution
    print(f"Blender {args.samples}-sample Cycles (CPU, {args.threads} threads) vs the ray caster, {res} px views")
    head = f"{'object':28s} {'views':>5s} {'IoU cond':>9s} {'IoU mean':>9s} {'IoU min':>8s} {'|dRGB|':>7s}"
    head += f" {'ours s':>7s} {'Blender s':>9s}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(
            f"{name:28s} {r['views']:5d} {r['iou_cond']:9.3f} {r['iou_mean']:9.3f} {r['iou_min']:8.3f} "
            f"{r['color_diff']:7.1f} {r['ours_s']:7.2f} {r['blender_s']:9.1f}"
        )
    print(json.dumps({"bench": "blender", "samples": args.samples, "view_resolution": res, "rows": rows}))


if __name__ == "__main__":
    main()
