"""Data pipeline throughput: seconds per object for load / render / volumes / encode+write, one core at a time,
for procedural objects and for a 100k-face textured mesh, then the whole builder with every core.

    .venv/bin/python benchmarks/bench_data.py [--objects 12] [--workers N] [key=value ...]

Prints a table and one JSON line. Targets (issue 2): >= 1 procedural object per second on a 2-core machine for the
full sample (K=3, 320 px, 64^3 / 128^3), and < 5 s per 100k-face textured mesh.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from one2345pp.config import load_config, to_object
from one2345pp.data.config import DataBuildConfig
from one2345pp.data.sample import build_sample
from one2345pp.data.shards import build_shards
from one2345pp.data.sources import procedural_items
from one2345pp.geometry.mesh import Material, Mesh
from one2345pp.geometry.mesh_io import load_mesh, save_mesh
from one2345pp.rendering.raycast import RaycastRenderer


def textured_sphere(n: int = 224, tex_res: int = 1024) -> Mesh:
    """A lat-long sphere with 2 * n * n faces (100,352 for n = 224) and a procedural texture."""
    th = np.linspace(0, np.pi, n + 1)
    ph = np.linspace(0, 2 * np.pi, n + 1)
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = 0.4 * np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    uv = np.stack([P / (2 * np.pi), 1 - T / np.pi], -1).reshape(-1, 2)
    idx = np.arange((n + 1) * (n + 1)).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    yy, xx = np.mgrid[0:tex_res, 0:tex_res]
    tex = np.stack([(xx * 255 // tex_res), (yy * 255 // tex_res), ((xx // 64 + yy // 64) % 2) * 180 + 40], -1)
    return Mesh(v, faces, uv[faces], None, None, [Material("tex", [1, 1, 1, 1], tex.astype(np.uint8))])


def time_object(load_fn, uid: str, cfg, renderer) -> dict:
    import webdataset as wds

    t0 = time.perf_counter()
    mesh = load_fn()
    t_load = time.perf_counter() - t0
    fields, t = build_sample(mesh, uid, mesh.source, cfg, renderer, threads=1)
    t1 = time.perf_counter()
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as w:
        w.write({"__key__": uid, **fields})
    t_write = time.perf_counter() - t1 + t.encode
    return {
        "load": t_load + t.normalize,
        "render": t.render,
        "volumes": t.volumes,
        "write": t_write,
        "faces": mesh.num_faces,
        "bytes": len(buf.getvalue()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=12, help="procedural objects timed one by one")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the whole-builder run")
    ap.add_argument("--builder-objects", type=int, default=16, help="objects for the whole-builder run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = to_object(load_config(DataBuildConfig, None, args.overrides)).data
    cfg.render.threads = 1
    renderer = RaycastRenderer(cfg.render)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = procedural_items(cfg.procedural, args.objects, tmp / "meshes")
        times = [time_object(lambda it=it: it.load(cfg.procedural, cfg.up_axis), it.uid, cfg, renderer) for it in items]
        rows["procedural (1 core)"] = {k: float(np.mean([t[k] for t in times])) for k in times[0]}
        save_mesh(textured_sphere(), tmp / "big" / "sphere.glb")
        big_path = tmp / "big" / "sphere.glb"

        def load_big():
            return load_mesh(big_path, up_axis=cfg.up_axis)

        big = [time_object(load_big, f"big{i}", cfg, renderer) for i in range(2)]
        rows["100k-face textured (1 core)"] = {k: float(np.mean([t[k] for t in big])) for k in big[0]}
        res = build_shards(
            "procedural", tmp / "built", cfg, num_objects=args.builder_objects, workers=args.workers, progress=False
        )
        builder = {"objects": res.done, "seconds": res.seconds, "objects_per_s": res.done / res.seconds}

    print(
        f"data pipeline, K={cfg.cond_samples}, views {cfg.view_resolution} px, "
        f"{cfg.volume.coarse_resolution}^3 / {cfg.volume.coarse_resolution * cfg.volume.fine_factor}^3; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    cols = ["faces", "load", "render", "volumes", "write", "total s", "obj/s/core"]
    head = f"{'input':30s} " + " ".join(f"{c:>10s}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        total = r["load"] + r["render"] + r["volumes"] + r["write"]
        r["total"], r["objects_per_s_per_core"] = total, 1.0 / total
        vals = [r["load"], r["render"], r["volumes"], r["write"], total]
        print(f"{name:30s} {r['faces']:10.0f} " + " ".join(f"{v:10.3f}" for v in vals) + f" {1 / total:10.2f}")
    print(
        f"whole builder: {builder['objects']} procedural objects with {args.workers} workers in "
        f"{builder['seconds']:.1f} s = {builder['objects_per_s']:.2f} objects/s"
    )
    print(
        json.dumps(
            {
                "bench": "data",
                "rows": rows,
                "builder": builder,
                "workers": args.workers,
                "cond_samples": cfg.cond_samples,
                "view_resolution": cfg.view_resolution,
            }
        )
    )


if __name__ == "__main__":
    main()
