"""How much of an object's six views does one condition view determine? An upper bound on the view mask IoU that a
perfect multi-view sampler can reach on the procedural objects.

    .venv/bin/python benchmarks/bench_view_ceiling.py [--objects 64] [--seed 3000] [--draws 4]
        [--config experiments/tiny/data.yaml] [--pipeline checkpoints/tiny/multiview/export]

A procedural part gets an independent scale per axis (``procedural.PART_AXIS_SCALE``, then the object's
``OBJECT_AXIS_SCALE``), so its extent along the condition camera's viewing axis is not visible in the condition view.
For each held-out object (generated from ``--seed``, normalised, lit and photographed as the data build does), copies
are stretched along that axis by the ratio of two prior draws of an axis scale, normalised again, and rendered from
the same cameras. The copies' condition views, framed by the product's preprocessing, are nearly the object's own
(their silhouette IoU is printed); their six target views are what a sampler that knows everything but this one
unseen extent would draw. Scored against the object's ground-truth views with ``bench_multiview_follow``'s rule
(silhouette = more than 0.08 from gray in some channel):

* ``truth_vae``: the ground-truth views through the pipeline's VAE (what its latents keep of a perfect view);
* ``sample`` / ``sample_vae``: one stretched copy, as rendered and through the VAE: a perfect posterior sample;
* ``mean_vae``: the mean of ``--draws`` copies through the VAE: a perfect posterior mean (blurred where they differ).

The stretch is a proxy for one unseen degree of freedom, not the exact posterior: a stretched sphere is an ellipsoid
of the same family, but a stretched box is a parallelepiped, which a model that knows the prior could rule out (the
per-family rows show how much each family loses). Other ambiguities of one view (a hidden part of a union, a cone
pointing towards or away from the camera) are not simulated. The objects are taken as generated, before the data
build's file round trip, so their poses differ from the shards' (the same distribution). Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_multiview_follow import silhouette, view_scores
from omegaconf import OmegaConf
from PIL import Image

from one2345pp.cameras import tile
from one2345pp.config import to_object
from one2345pp.data.config import DataConfig
from one2345pp.data.decode import composite
from one2345pp.data.procedural import OBJECT_AXIS_SCALE, PART_AXIS_SCALE, generate_object
from one2345pp.data.sample import camera_distance, object_rng, sample_cameras
from one2345pp.geometry.mesh import Mesh
from one2345pp.geometry.mesh_io import normalize
from one2345pp.models.multiview_pipeline import GRAY, MultiViewDiffusionPipeline, scale_image, unscale_image
from one2345pp.pipeline.build import DataFacts, condition_fill
from one2345pp.pipeline.preprocess import PreprocessConfig, preprocess_image
from one2345pp.rendering.base import light_from_config
from one2345pp.rendering.raycast import RaycastRenderer

ROOT = Path(__file__).resolve().parents[1]


def data_config(path: Path, seed: int) -> DataConfig:
    """The data recipe at ``path`` with procedural seed ``seed`` and one condition view per object."""
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        OmegaConf.load(path).data,
        {"cond_samples": 1, "procedural": {"seed": seed}},
    )
    return to_object(merged)


def prior_stretch(rng: np.random.Generator) -> float:
    """The ratio of two independent prior draws of one axis's scale (part times object factor)."""
    draws = rng.uniform(*PART_AXIS_SCALE, 2) * rng.uniform(*OBJECT_AXIS_SCALE, 2)
    return float(draws[1] / draws[0])


def stretched_copy(mesh: Mesh, axis: np.ndarray, factor: float, extent: float) -> Mesh:
    """``mesh`` scaled by ``factor`` along the unit ``axis`` through the origin, then normalised to ``extent``."""
    copy = mesh.transformed(1.0, np.zeros(3))
    along = mesh.vertices @ axis
    copy.vertices = mesh.vertices + (factor - 1.0) * along[:, None] * axis[None]
    return normalize(copy, extent)[0]


def render_grid(renderer, mesh: Mesh, views, light) -> torch.Tensor:
    """The six views tiled 3x2 on gray, float [3, 3h, 2w]."""
    return composite(tile(np.stack([r.to_uint8_rgba() for r in renderer.render_many(mesh, views, light)])), GRAY)[0]


def framed_condition(renderer, mesh: Mesh, camera, light, fill: float) -> torch.Tensor:
    """The condition view through the product's preprocessing (framing at ``fill``, gray), float [3, s, s]."""
    rgba = renderer.render_many(mesh, [camera], light)[0].to_uint8_rgba()
    rgb, _ = preprocess_image(Image.fromarray(rgba), PreprocessConfig(size=camera.width, fill=fill))
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def through_vae(vae, grids: torch.Tensor) -> torch.Tensor:
    z = vae.encode(scale_image(grids * 2.0 - 1.0)).latent_dist.mode()
    return ((unscale_image(vae.decode(z).sample) + 1.0) / 2.0).clamp(0, 1)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = silhouette(a), silhouette(b)
    return float(((sa & sb).sum(dim=(-2, -1)) / (sa | sb).sum(dim=(-2, -1)).clamp_min(1)).mean())


def by_family(iou: torch.Tensor, families: list[str]) -> dict:
    per = {f: [float(x) for x, g in zip(iou, families, strict=True) if g == f] for f in sorted(set(families))}
    return {f: {"objects": len(v), "mask_iou": float(np.mean(v))} for f, v in per.items()}


def measure(cfg: DataConfig, objects: int, draws: int, vae, rng_seed: int = 0) -> dict:
    renderer = RaycastRenderer(cfg.render)
    facts = DataFacts(
        stage="multiview",
        source="bench_view_ceiling",
        layout=cfg.layout,
        distance=camera_distance(cfg),
        distance_setting=cfg.distance,
        extent=cfg.normalize_extent,
        view_size=cfg.view_resolution,
        cond_size=cfg.cond_resolution,
        background="gray",
    )
    fill = condition_fill(facts)  # the product's framing of an input for a run trained on this data
    rng = np.random.default_rng(rng_seed)
    truth, copies, cond_iou, factors, families = [], [], [], [], []
    for i in range(objects):
        obj = generate_object(i, cfg.procedural)
        mesh = normalize(obj.mesh, cfg.normalize_extent)[0]
        families.append(obj.family)
        obj_rng = object_rng(cfg.seed, obj.uid)  # the data build's order: light, then cameras
        light = light_from_config(cfg.render, obj_rng)
        cond, views = sample_cameras(cfg, obj_rng)[0]
        axis = -cond.position / np.linalg.norm(cond.position)
        truth.append(render_grid(renderer, mesh, views, light))
        own_cond = framed_condition(renderer, mesh, cond, light, fill)
        grids = []
        for _ in range(draws):
            f = prior_stretch(rng)
            copy = stretched_copy(mesh, axis, f, cfg.normalize_extent)
            grids.append(render_grid(renderer, copy, views, light))
            cond_iou.append(mask_iou(framed_condition(renderer, copy, cond, light, fill), own_cond))
            factors.append(f)
        copies.append(torch.stack(grids))
    truth_t, copies_t = torch.stack(truth), torch.stack(copies)  # [N, 3, H, W], [N, D, 3, H, W]
    n, d = copies_t.shape[:2]
    copies_vae = through_vae(vae, copies_t.flatten(0, 1)).view_as(copies_t)
    rows = {
        "truth_vae": through_vae(vae, truth_t),
        "sample": copies_t[:, 0],
        "sample_vae": copies_vae[:, 0],
        "mean_vae": copies_vae.mean(dim=1),
    }
    scores = {}
    for name, grids in rows.items():
        psnr, iou = view_scores(grids, truth_t)
        scores[name] = {"mask_iou": float(iou.mean()), "psnr": float(psnr.mean())}
        if name == "sample_vae":
            scores["sample_vae_by_family"] = by_family(iou, families)
    return {
        "objects": n,
        "draws": d,
        "fill": fill,
        "stretch_median_abs_log": float(np.median(np.abs(np.log(factors)))),
        "condition_mask_iou": float(np.mean(cond_iou)),
        **scores,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=64)
    ap.add_argument("--seed", type=int, default=3000, help="procedural seed of the held-out objects")
    ap.add_argument("--draws", type=int, default=4, help="stretched copies per object (the mean row averages them)")
    ap.add_argument("--config", default=str(ROOT / "experiments" / "tiny" / "data.yaml"), help="data recipe")
    ap.add_argument("--pipeline", default=str(ROOT / "checkpoints" / "tiny" / "multiview" / "export"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.objects < 1 or args.draws < 1:
        raise ValueError(f"--objects {args.objects} and --draws {args.draws} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vae = MultiViewDiffusionPipeline.from_pretrained(args.pipeline).vae
    result = {
        "bench": "view_ceiling",
        "config": str(args.config),
        "seed": args.seed,
        "pipeline": str(args.pipeline),
        **measure(data_config(Path(args.config), args.seed), args.objects, args.draws, vae),
    }
    result["seconds"] = time.perf_counter() - t0
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    print(
        f"one view's ambiguity: {r['objects']} procedural objects of seed {r['seed']}, {r['draws']} stretched copies "
        f"each (median |log stretch| {r['stretch_median_abs_log']:.2f}); their framed condition views match the "
        f"object's at silhouette IoU {r['condition_mask_iou']:.3f} ({r['seconds']:.0f} s)"
    )
    print(f"| {'six views, against the ground truth':48s} | mask IoU | PSNR dB |")
    names = {
        "truth_vae": "ground truth through the VAE",
        "sample": "perfect posterior sample (a stretched copy)",
        "sample_vae": "perfect posterior sample, through the VAE",
        "mean_vae": "perfect posterior mean, through the VAE",
    }
    for key, name in names.items():
        print(f"| {name:48s} | {r[key]['mask_iou']:8.3f} | {r[key]['psnr']:7.2f} |")
    by = ", ".join(f"{f} {v['mask_iou']:.3f} ({v['objects']})" for f, v in r["sample_vae_by_family"].items())
    print(f"perfect posterior sample through the VAE, by family (objects): {by}")


if __name__ == "__main__":
    main()
