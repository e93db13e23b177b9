"""Reconstruction quality of the tiny coarse + fine stages (issue 4), and full-preset sampling time on a GPU.

    .venv/bin/python benchmarks/bench_recon.py [--work /tmp/recon_bench] [--train DIR] [--heldout DIR]
        [--coarse-minutes 15] [--fine-minutes 5] [--objects 16] [--train-objects 192]

1. Procedural shards: ``--train`` / ``--heldout`` folders are used when they hold shards, else built there with the
   tiny-bench recipe (64 px views, 64^3 shell / 128^3 fine cells as `make data`; held-out objects from another
   procedural seed, so different shapes and uids).
2. Trains the tiny coarse and fine stages (experiments/tiny/*.yaml) for the given minutes each of a dedicated
   ``--cores``-core machine, counted as CPU time: a stage stops once its process (and its loader workers) used
   ``cores * minutes`` CPU-minutes, so other jobs sharing the CPUs do not shorten its training (wall-clock time is
   reported beside it; ``--max-wall-minutes`` caps it). Constant learning rate after a 20-step warm-up, since the
   step count is not known in advance; no validation. Both stages are exported (EMA weights).
3. Loads the exports the way the pipeline does and reconstructs the held-out objects from their ground-truth views
   (condition 0): coarse 50 steps, fine 20 steps, mesh extraction. Per object: coarse-shell IoU against the
   ground-truth shell (max-pooled to 32^3), F-Score at 0.05 and Chamfer distance against the ground-truth mesh
   (normalised as in the shard; both in the [-0.5, 0.5]^3 frame, no alignment), from ``--points`` surface samples
   each; and the same for the baseline: a sphere at the origin whose radius is the training set's mean distance of
   shell cells from the centre.

Prints a table and one JSON line. Target (issue 4): mean F-Score >= 0.85 on the held-out objects. The full-preset
GPU timing rows (one coarse 50-step + one fine 20-step sampling; target < 8 s together on one H100) are measured only
when CUDA is available and printed as not available otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from one2345pp.config import load_config, to_object
from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig
from one2345pp.data.datamodule import VolumeDataModule
from one2345pp.data.shards import build_shards
from one2345pp.evaluation.geometry import fscore_chamfer, sample_surface
from one2345pp.geometry.mesh import Mesh
from one2345pp.geometry.mesh_io import load_mesh
from one2345pp.models.coarse import CoarseModel, shell_iou
from one2345pp.models.fine import FineModel
from one2345pp.models.recon import Reconstructor
from one2345pp.models.volume_targets import reduce_occupancy
from one2345pp.stages import coarse as coarse_stage
from one2345pp.stages import fine as fine_stage
from one2345pp.training.runner import fit

ROOT = Path(__file__).resolve().parents[1]
TAU = 0.05


def ensure_shards(folder: Path, objects: int, seed: int, cond_samples: int) -> Path:
    if list(folder.glob("shard-*.tar")):
        return folder
    cfg = DataConfig(
        view_resolution=64,
        cond_resolution=64,
        cond_samples=cond_samples,
        seed=seed,
        render=RenderConfig(supersample=2),
        procedural=ProceduralConfig(seed=seed, texture_resolution=128),
        shards=ShardConfig(max_samples=32),
    )
    t0 = time.time()
    build_shards("procedural", folder, cfg, num_objects=objects, workers=1, progress=False)
    print(f"built {objects} procedural objects (seed {seed}) in {folder} in {time.time() - t0:.0f} s", flush=True)
    return folder


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children (the loader workers, restarted every
    epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Budget(Callback):
    """Stops training once the run has used ``cores * minutes`` CPU-minutes (what ``minutes`` of a dedicated machine
    with ``cores`` cores supply at most), or after ``max_wall_minutes`` of wall-clock time, whichever comes first."""

    def __init__(self, minutes: float, cores: int, max_wall_minutes: float):
        self.cpu_limit, self.wall_limit = minutes * 60 * cores, max_wall_minutes * 60
        self.cpu0, self.wall0 = cpu_seconds(), time.time()
        self.reason = "max_steps"

    def on_train_batch_end(self, trainer, *args) -> None:
        if cpu_seconds() - self.cpu0 >= self.cpu_limit:
            trainer.should_stop, self.reason = True, "cpu budget"
        elif time.time() - self.wall0 >= self.wall_limit:
            trainer.should_stop, self.reason = True, "wall-clock cap"


def train_stage(
    module_cls,
    cfg_cls,
    name: str,
    config: Path,
    overrides: list[str],
    minutes: float,
    cores: int,
    max_wall_minutes: float,
) -> dict:
    cfg = load_config(cfg_cls, config, overrides)
    conf = to_object(cfg)
    module = module_cls(conf)
    budget = Budget(minutes, cores, max_wall_minutes)
    trainer, directory = fit(name, cfg, module, VolumeDataModule(conf.data), callbacks=[budget])
    info = {
        "steps": int(trainer.global_step),
        "wall_s": time.time() - budget.wall0,
        "cpu_s": cpu_seconds() - budget.cpu0,
        "stopped_by": budget.reason,
    }
    info["export"] = str(module.export_pretrained(directory / "export"))
    print(
        f"{name}: {info['steps']} steps, {info['cpu_s'] / 60:.1f} CPU-min, {info['wall_s'] / 60:.1f} min wall "
        f"(stopped by {budget.reason}) -> {info['export']}",
        flush=True,
    )
    return info


def sphere(radius: float, n: int = 64) -> Mesh:
    th = np.linspace(0, np.pi, n + 1)
    ph = np.linspace(0, 2 * np.pi, 2 * n + 1)
    t, p = np.meshgrid(th, ph, indexing="ij")
    v = radius * np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    idx = np.arange((n + 1) * (2 * n + 1)).reshape(n + 1, 2 * n + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return Mesh(v, faces, source="baseline sphere")


def mean_shell_radius(train: Path) -> float:
    """Mean over training objects of the mean distance of their occupied shell cells' centres from the origin."""
    dm = VolumeDataModule(
        to_object(
            load_config(
                coarse_stage.CoarseConfig,
                None,
                [f"data.train_shards={train}", f"data.val_shards={train}", "data.num_workers=0", "data.batch_size=8"],
            )
        ).data
    )
    radii = []
    for batch in dm.val_dataloader():
        occ = batch["occ"][:, 0] > 0
        r = occ.shape[-1]
        c = -0.5 + (torch.arange(r) + 0.5) / r
        x, y, z = torch.meshgrid(c, c, c, indexing="ij")
        dist = torch.sqrt(x * x + y * y + z * z)
        radii += [float(dist[o].mean()) for o in occ]
    return float(np.mean(radii))


def gt_mesh(meta: dict) -> Mesh:
    mesh = load_mesh(meta["source"])
    scale, offset = float(meta["normalize_scale"]), np.asarray(meta["normalize_offset"], dtype=np.float64)
    return Mesh(mesh.vertices * scale + offset, mesh.faces, source=meta["source"])


def evaluate(
    coarse_export: Path, fine_export: Path, heldout: Path, objects: int, points: int, radius: float, seed: int
) -> list[dict]:
    rec = Reconstructor.from_exports(coarse_export, fine_export)
    dm = VolumeDataModule(
        to_object(
            load_config(
                coarse_stage.CoarseConfig,
                None,
                [
                    f"data.train_shards={heldout}",
                    f"data.val_shards={heldout}",
                    "data.num_workers=0",
                    "data.batch_size=4",
                    "data.view_resolution=64",
                    "data.cond_resolution=64",
                ],
            )
        ).data
    )

    def surface_samples(mesh, k: int) -> np.ndarray:  # fresh, reproducible draws per call
        return sample_surface(mesh.vertices, mesh.faces, points, seed=seed * 1000 + k)

    base = surface_samples(sphere(radius), 0)
    rows = []
    for bi, batch in enumerate(dm.val_dataloader()):
        if len(rows) >= objects:
            break
        gen = torch.Generator().manual_seed(seed + bi)
        t0 = time.time()
        out = rec(batch["views"], (batch["views_c2w"], batch["views_K"]), batch["cond"], generator=gen)
        seconds = (time.time() - t0) / len(batch["meta"])
        ious = shell_iou(out.occupancy, reduce_occupancy(batch["occ"], rec.coarse.resolution))
        for i, meta in enumerate(batch["meta"]):
            if len(rows) >= objects:
                break
            gt = surface_samples(gt_mesh(meta), 2 * len(rows) + 1)
            row = {"uid": meta["uid"], "iou": float(ious[i]), "seconds": seconds}
            if out.meshes[i] is not None:
                m = fscore_chamfer(surface_samples(out.meshes[i], 2 * len(rows) + 2), gt, TAU)
                row.update(m, faces=int(out.meshes[i].num_faces))
            else:  # no surface: nothing is within tau of the ground truth
                row.update(fscore=0.0, precision=0.0, recall=0.0, chamfer=float("nan"), faces=0, error=out.errors[i])
            b = fscore_chamfer(base, gt, TAU)
            bf, bcd = b["fscore"], b["chamfer"]
            row.update(sphere_fscore=bf, sphere_chamfer=bcd)
            rows.append(row)
            print(
                f"{row['uid']:20s} iou {row['iou']:.3f}  F {row['fscore']:.3f}  CD {row['chamfer']:.4f}  "
                f"sphere F {bf:.3f} CD {bcd:.4f}",
                flush=True,
            )
    return rows


def sphere_shell(resolution: int, device, radius: float = 0.35) -> torch.Tensor:
    """Occupancy ``[1, 1, R, R, R]`` in {-1, +1} of a sphere shell two cells thick: the stand-in for the result of an
    untrained coarse stage (random weights give no surface, or noise that would make the fine support arbitrary)."""
    c = -0.5 + (torch.arange(resolution, device=device) + 0.5) / resolution
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    shell = (torch.sqrt(x * x + y * y + z * z) - radius).abs() < 1.0 / resolution
    return shell[None, None].float() * 2 - 1


def gpu_timing(
    dev: torch.device | None = None,
    coarse_steps: int = 50,
    fine_steps: int = 20,
    overrides: list[str] | tuple = (),
    tiny: bool = False,
    bf16: bool | None = None,
) -> dict:
    """Seconds for one coarse ``coarse_steps`` and one fine ``fine_steps`` sampling at the full preset (randomly
    initialised weights; the speed does not depend on them; the fine support is a sphere shell's, see
    :func:`sphere_shell`), batch 1, bf16 autocast on CUDA. ``dev`` defaults to
    CUDA (unavailable without it); bench_pipeline also runs it on the CPU as a check with few steps. ``overrides``
    apply to both stages' configs (bench_gpu points the encoders at local folders); ``tiny`` takes the tiny presets
    (64 px views) instead, as bench_gpu's dry run does; ``bf16`` (default: on CUDA) sets the autocast."""
    if dev is None:
        if not torch.cuda.is_available():
            return {"available": False, "reason": "no CUDA device"}
        dev = torch.device("cuda")
    cuda = dev.type == "cuda"
    folder, size = (ROOT / "experiments/tiny", 64) if tiny else (ROOT / "experiments", 320)
    ccfg = to_object(load_config(coarse_stage.CoarseConfig, folder / "coarse.yaml", list(overrides)))
    fcfg = to_object(load_config(fine_stage.FineConfig, folder / "fine.yaml", list(overrides)))
    try:
        coarse = CoarseModel(ccfg.model).to(dev).eval()
        fine = FineModel(fcfg.model).to(dev).eval()
        kinds = {ccfg.model.condition.image_features.kind, ccfg.model.global_embedding.kind}
        encoders = "DINOv2 + CLIP" if kinds == {"dinov2", "clip"} else " + ".join(sorted(kinds))
    except OSError as exn:  # hub weights unreachable: same networks with the small CNN encoders
        for c in (ccfg, fcfg):
            c.model.condition.image_features.kind = "cnn"
            c.model.global_embedding.kind = "cnn"
        coarse = CoarseModel(ccfg.model).to(dev).eval()
        fine = FineModel(fcfg.model).to(dev).eval()
        encoders = f"small CNN encoders (pretrained ones unavailable: {str(exn)[:80]})"
    from one2345pp.cameras import framing_distance, get_layout, multiview_cameras

    layout = get_layout("zero123pp-v1.2")
    cams = multiview_cameras(0.0, layout, framing_distance(layout.fov_deg, 0.9), size)
    views, cond = torch.rand(1, 6, 3, size, size, device=dev), torch.rand(1, 3, size, size, device=dev)
    out = {"available": True, "device": torch.cuda.get_device_name(dev) if cuda else str(dev), "encoders": encoders}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda if bf16 is None else bf16):
        for _rep in range(2 if cuda else 1):  # the first CUDA run warms up kernels and caches
            sync()
            t0 = time.time()
            gen = torch.Generator(dev).manual_seed(0)
            occ = coarse.sample(views, cams, cond, steps=coarse_steps, generator=gen)
            sync()
            t1 = time.time()
            # untrained weights give no surface or noise: the fine stage works on a sphere shell's support, about
            # the size of a real object's, so that its time does not depend on the random coarse result
            occ = sphere_shell(occ.shape[-1], dev)
            gen = torch.Generator(dev).manual_seed(0)
            fine.sample(views, cams, cond, coarse_occ=occ, steps=fine_steps, generator=gen)
            sync()
            t2 = time.time()
        out.update(coarse_s=t1 - t0, fine_s=t2 - t1, steps=[coarse_steps, fine_steps], support=int((occ > 0).sum()) * 8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/recon_bench"))
    ap.add_argument("--train", type=Path, default=None, help="training shards (default WORK/train; built if empty)")
    ap.add_argument("--heldout", type=Path, default=None, help="held-out shards (default WORK/heldout)")
    ap.add_argument("--train-objects", type=int, default=192)
    ap.add_argument("--objects", type=int, default=16)
    ap.add_argument("--coarse-minutes", type=float, default=15.0)
    ap.add_argument("--fine-minutes", type=float, default=5.0)
    ap.add_argument("--points", type=int, default=20000, help="surface samples per mesh for F-Score / Chamfer")
    ap.add_argument("--cores", type=int, default=2, help="cores of the dedicated machine the minutes refer to")
    ap.add_argument("--max-wall-minutes", type=float, default=60.0, help="wall-clock cap per stage (shared CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-gpu", action="store_true")
    args = ap.parse_args()
    if args.coarse_minutes + args.fine_minutes > 20:
        ap.error("the issue allows at most 20 minutes of training in total")
    train = ensure_shards(args.train or args.work / "train", args.train_objects, 0, 2)
    heldout = ensure_shards(args.heldout or args.work / "heldout", args.objects, 1, 1)
    common = [
        f"data.train_shards={train}",
        f"data.val_shards={heldout}",
        "trainer.limit_val_batches=0",
        "run.monitor=null",
        f"run.root={args.work / 'checkpoints'}",
        "run.name=bench",
        "optim.schedule=constant",
        "optim.warmup_steps=20",
        "trainer.max_steps=100000",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=20",
    ]
    cores, cap = args.cores, args.max_wall_minutes
    ctrain = train_stage(
        coarse_stage.CoarseStage,
        coarse_stage.CoarseConfig,
        "coarse",
        ROOT / "experiments/tiny/coarse.yaml",
        common,
        args.coarse_minutes,
        cores,
        cap,
    )
    ftrain = train_stage(
        fine_stage.FineStage,
        fine_stage.FineConfig,
        "fine",
        ROOT / "experiments/tiny/fine.yaml",
        common,
        args.fine_minutes,
        cores,
        cap,
    )
    c_exp, f_exp = ctrain["export"], ftrain["export"]
    radius = mean_shell_radius(train)
    t0 = time.time()
    rows = evaluate(c_exp, f_exp, heldout, args.objects, args.points, radius, args.seed)
    eval_s = time.time() - t0

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    summary = {k: mean(k) for k in ("fscore", "chamfer", "iou", "sphere_fscore", "sphere_chamfer", "seconds")}
    failed = sum(1 for r in rows if r["faces"] == 0)
    print()
    print(
        f"tiny coarse ({ctrain['steps']} steps, {ctrain['cpu_s'] / 60:.1f} CPU-min, {ctrain['wall_s'] / 60:.1f} "
        f"min wall) + fine ({ftrain['steps']} steps, {ftrain['cpu_s'] / 60:.1f} CPU-min, "
        f"{ftrain['wall_s'] / 60:.1f} min wall); {len(rows)} held-out objects from {heldout}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    head = f"{'method':28s} {'F-Score@0.05':>13s} {'Chamfer':>9s} {'shell IoU':>10s} {'s/object':>9s}"
    print(head)
    print("-" * len(head))
    print(
        f"{'coarse + fine (tiny)':28s} {summary['fscore']:13.3f} {summary['chamfer']:9.4f} {summary['iou']:10.3f} "
        f"{summary['seconds']:9.1f}"
    )
    print(
        f"{f'sphere r={radius:.3f} (baseline)':28s} {summary['sphere_fscore']:13.3f} "
        f"{summary['sphere_chamfer']:9.4f} {'-':>10s} {'-':>9s}"
    )
    print(
        f"objects without a mesh: {failed}; target F-Score >= 0.85: {'met' if summary['fscore'] >= 0.85 else 'NOT met'}"
    )
    gpu = {"available": False, "reason": "skipped"} if args.skip_gpu else gpu_timing()
    if gpu["available"]:
        print(
            f"full preset on {gpu['device']} ({gpu['encoders']}): coarse 50 steps {gpu['coarse_s']:.2f} s, "
            f"fine 20 steps {gpu['fine_s']:.2f} s ({gpu['support']} cells), "
            f"total {gpu['coarse_s'] + gpu['fine_s']:.2f} s (target < 8 s on an H100)"
        )
    else:
        print(f"full preset GPU sampling (coarse 50 steps, fine 20 steps): not available ({gpu['reason']})")
    print(
        json.dumps(
            {
                "bench": "recon",
                "summary": summary,
                "failed": failed,
                "rows": rows,
                "train": {"coarse": ctrain, "fine": ftrain, "cores": cores},
                "eval_s": eval_s,
                "sphere_radius": radius,
                "gpu": gpu,
                "points": args.points,
                "tau": TAU,
            }
        )
    )


if __name__ == "__main__":
    main()
