"""The 3D stages alone, from ground-truth views: ``python -m one2345pp.demo.recon --coarse RUN --fine RUN
--heldout SHARDS --train SHARDS --out DIR`` (the demo's ``recon`` step).

The full pipeline's meshes can only be as good as its generated views; this step shows what the coarse and fine
stages learned by feeding them the held-out objects' ground-truth six views instead (loaded through the stages' own
data module with the coarse run's loader settings), as :mod:`one2345pp.models.recon` chains them: coarse shell,
fine SDF + colour, mesh. Per object, in the normalised frame of the shards (no alignment needed): shell IoU against
the ground-truth shell, F-Score at 0.05 and Chamfer distance (``--points`` surface samples) against the ground-truth
mesh, and the same for a baseline that ignores the input: a sphere at the origin whose radius is the training
objects' mean distance of shell cells from the centre. A missing surface scores F-Score 0.

Writes ``DIR/<uid>/mesh.glb`` (vertex colours), ``DIR/<uid>/turntable.png``, ``DIR/<uid>/metrics.json`` (written
last: an object with one is skipped on a rerun) and ``DIR/metrics.json`` (the rows and their means).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..cameras import get_layout
from ..config import to_object
from ..data.config import DataConfig
from ..data.datamodule import VolumeDataModule
from ..data.procedural import sphere_surface
from ..data.sample import camera_distance
from ..evaluation.geometry import fscore_chamfer, sample_surface
from ..models.coarse import shell_iou
from ..models.recon import Reconstructor
from ..models.volume_targets import reduce_occupancy
from ..pipeline.one2345 import vertex_colored
from ..pipeline.turntable import TurntableConfig, render_turntable
from ..stages.coarse import load_stage_config
from ..stages.texture import load_object_mesh
from ..texture.export import save_glb
from ..utils.atomic import write_json, write_png
from .steps import recon_summary

TAU = 0.05
METRICS = ("iou", "fscore", "chamfer", "sphere_fscore", "sphere_chamfer")


def _loader(coarse_run: Path, shards: Path):
    overrides = [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_workers=0", "data.batch_size=1"]
    conf = to_object(load_stage_config(coarse_run / "config.yaml", overrides))  # old key names read too
    return VolumeDataModule(conf.data).val_dataloader()


def mean_shell_radius(coarse_run: Path, train: Path) -> float:
    """Mean over the training objects of the mean distance of their occupied shell cells' centres from the origin."""
    radii = []
    for batch in _loader(coarse_run, train):
        occ = batch["occ"][:, 0] > 0
        c = -0.5 + (torch.arange(occ.shape[-1]) + 0.5) / occ.shape[-1]
        x, y, z = torch.meshgrid(c, c, c, indexing="ij")
        dist = torch.sqrt(x * x + y * y + z * z)
        radii += [float(dist[o].mean()) for o in occ]
    if not radii:
        raise ValueError(f"no training objects in {train}")
    return sum(radii) / len(radii)


def _turntable_camera(shards: Path) -> tuple[float, float]:
    """(camera distance, FoV) of the shards' data config."""
    held = OmegaConf.load(shards / "config.yaml").get("data") or {}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), held))
    return camera_distance(cfg), get_layout(cfg.layout).fov_deg


def reconstruct(
    coarse_run: Path,
    fine_run: Path,
    heldout: Path,
    train: Path,
    out: Path,
    points: int = 20_000,
    seed: int = 0,
    turntable_size: int = 128,
    coarse_steps: int | None = None,
    fine_steps: int | None = None,
) -> dict:
    """Reconstruct every held-out object (see the module doc) with ``coarse_steps`` / ``fine_steps`` sampling steps
    (None: the models' own); returns ``{"objects": rows, "mean": {...}, "sphere_radius": r, ...}``, also written to
    ``out/metrics.json``."""
    out.mkdir(parents=True, exist_ok=True)
    radius = mean_shell_radius(coarse_run, train)
    sphere = sphere_surface(radius, 48)
    rec = Reconstructor.from_exports(coarse_run / "export", fine_run / "export")
    distance, fov = _turntable_camera(heldout)
    turn = TurntableConfig(views=8, size=turntable_size)
    shard_url = str(min(heldout.glob("shard-*.tar"), default=heldout / "shard-000000.tar"))
    rows = []
    for index, batch in enumerate(_loader(coarse_run, heldout)):
        meta = batch["meta"][0]
        folder = out / meta["uid"]
        done = folder / "metrics.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        folder.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + index)
        cams = (batch["views_c2w"], batch["views_K"])
        result = rec(batch["views"], cams, batch["cond"], gen, coarse_steps=coarse_steps, fine_steps=fine_steps)
        iou = float(shell_iou(result.occupancy, reduce_occupancy(batch["occ"], rec.coarse.resolution))[0])
        gt_mesh = load_object_mesh(meta, shard_url)  # normalised as in the shard
        gt = sample_surface(gt_mesh.vertices, gt_mesh.faces, points, seed=2 * index + 1)
        base = fscore_chamfer(sample_surface(sphere.vertices, sphere.faces, points, seed=2 * index + 2), gt, TAU)
        row = {"uid": meta["uid"], "iou": iou, "sphere_fscore": base["fscore"], "sphere_chamfer": base["chamfer"]}
        mesh = result.meshes[0]
        if mesh is None:  # no surface: nothing is within tau of the ground truth
            row.update(fscore=0.0, chamfer=None, faces=0, error=result.errors[0])
        else:
            scores = fscore_chamfer(sample_surface(mesh.vertices, mesh.faces, points, seed=2 * index + 3), gt, TAU)
            row.update(fscore=scores["fscore"], chamfer=scores["chamfer"], faces=int(mesh.num_faces))
            save_glb(vertex_colored(mesh), folder / "mesh.glb")
            strip = render_turntable(mesh, turn, distance, fov)
            write_png(folder / "turntable.png", strip)
            row.update(mesh=f"{meta['uid']}/mesh.glb", turntable=f"{meta['uid']}/turntable.png")
        row["seconds"] = time.perf_counter() - t0
        write_json(done, row)
        rows.append(row)
        print(
            f"recon {len(rows)}: {row['uid']}  shell IoU {row['iou']:.3f}  F-Score {row['fscore']:.3f}  "
            f"(sphere {row['sphere_fscore']:.3f})",
            flush=True,
        )
    if not rows:
        raise ValueError(f"no held-out objects in {heldout}")
    mean = {}
    for key in METRICS:
        values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        mean[key] = sum(values) / len(values) if values else None
    steps = {
        "coarse": coarse_steps or rec.coarse.cfg.diffusion.sample_steps,
        "fine": fine_steps or rec.fine.cfg.diffusion.sample_steps,
    }
    summary = {"objects": rows, "mean": mean, "sphere_radius": radius, "points": points, "tau": TAU, "steps": steps}
    write_json(out / "metrics.json", summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m one2345pp.demo.recon", description=__doc__.splitlines()[0])
    p.add_argument("--coarse", required=True, type=Path, help="coarse run directory (config.yaml, export/)")
    p.add_argument("--fine", required=True, type=Path, help="fine run directory")
    p.add_argument("--heldout", required=True, type=Path, help="held-out shard folder")
    p.add_argument("--train", required=True, type=Path, help="training shard folder (the sphere baseline's radius)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--points", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse-steps", type=int, default=None, help="coarse sampling steps (default: the model's)")
    p.add_argument("--fine-steps", type=int, default=None, help="fine sampling steps (default: the model's)")
    args = p.parse_args(argv)
    for path in (args.coarse / "export", args.fine / "export", args.heldout, args.train):
        if not path.exists():
            print(f"recon: error: {path} does not exist", file=sys.stderr)
            return 2
    s = reconstruct(
        args.coarse,
        args.fine,
        args.heldout,
        args.train,
        args.out,
        args.points,
        args.seed,
        coarse_steps=args.coarse_steps,
        fine_steps=args.fine_steps,
    )

    print(f"recon: {recon_summary(args.out)}; sphere radius {s['sphere_radius']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
