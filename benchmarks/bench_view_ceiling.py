"""How much of an object's six views does one condition view determine? Upper bounds on the view mask IoU that a
perfect multi-view sampler can reach on the procedural objects.

    .venv/bin/python benchmarks/bench_view_ceiling.py [--objects 64] [--seed 3000] [--draws 4]
        [--config experiments/tiny/data.yaml] [--pipeline checkpoints/tiny/multiview/export]

For each held-out object (generated from ``--seed``, normalised, lit and photographed as the data build does), the
benchmark builds worlds that the condition view cannot tell from the object's own and renders their six target views:

* ``stretch``: the object stretched along the condition camera's viewing axis by the ratio of two prior draws of an
  axis scale (a part gets an independent scale per axis, ``procedural.PART_AXIS_SCALE`` times the object's
  ``OBJECT_AXIS_SCALE``, so its depth is not seen). A proxy, not the exact posterior: a stretched sphere is an
  ellipsoid of the same family, but a stretched box is a parallelepiped, which a model that knows the prior could
  rule out;
* ``elevation``: the object and its light turned about the origin so that a camera at another elevation of the
  build's range (``cond_elevation_min..max``, same azimuth) takes the very same picture. The objects are rotated
  uniformly at random, so nothing in them says which way is up; the six target views sit at fixed absolute
  elevations, so they depend on the condition's elevation, which only the direction of the world-fixed light (seen in
  the shading) gives away. A sampler that does not read the light cannot do better than this row. Upright objects
  (``procedural.orientation=upright``) show which way is up, and a turned one is not upright: this row and the next
  are left out for them;
* ``both``: the two at once.

Their condition views, framed by the product's preprocessing, are compared with the object's (``input IoU``: 1 for
``elevation``, the same picture); their target views are scored against the object's ground truth with
``bench_multiview_follow``'s rule (silhouette = more than 0.08 from gray in some channel): ``sample`` one alternative,
``sample, VAE`` the same through the pipeline's VAE, ``mean, VAE`` the mean of ``--draws`` alternatives through the
VAE; ``truth_vae`` is the ground truth itself through the VAE. Other ambiguities (a hidden part of a union, a cone
pointing towards or away from the camera) are not simulated. The objects are taken as generated, before the data
build's file round trip, so their poses differ from the shards' (the same distribution). Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_multiview_follow import silhouette, vae_roundtrip, view_scores
from omegaconf import OmegaConf
from PIL import Image

from one2345pp.cameras import Camera, tile
from one2345pp.config import to_object
from one2345pp.data.config import DataConfig
from one2345pp.data.decode import composite
from one2345pp.data.procedural import OBJECT_AXIS_SCALE, ORIENTATIONS, PART_AXIS_SCALE, generate_object
from one2345pp.data.sample import object_rng, sample_cameras
from one2345pp.geometry.mesh import Mesh
from one2345pp.geometry.mesh_io import normalize
from one2345pp.models.multiview_pipeline import GRAY, MultiViewDiffusionPipeline
from one2345pp.pipeline.build import condition_fill, facts_of_data
from one2345pp.pipeline.preprocess import PreprocessConfig, preprocess_image
from one2345pp.rendering.base import Light, light_from_config
from one2345pp.rendering.raycast import RaycastRenderer

ROOT = Path(__file__).resolve().parents[1]


def data_config(path: Path, seed: int, orientation: str | None = None) -> DataConfig:
    """The data recipe at ``path`` with procedural seed ``seed``, one condition view per object and, when given,
    another ``procedural.orientation``."""
    procedural = {"seed": seed} if orientation is None else {"seed": seed, "orientation": orientation}
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), OmegaConf.load(path).data, {"cond_samples": 1, "procedural": procedural}
    )
    return to_object(merged)


def prior_stretch(rng: np.random.Generator) -> float:
    """The ratio of two independent prior draws of one axis's scale (part times object factor)."""
    draws = rng.uniform(*PART_AXIS_SCALE, 2) * rng.uniform(*OBJECT_AXIS_SCALE, 2)
    return float(draws[1] / draws[0])


def linear_copy(mesh: Mesh, matrix: np.ndarray) -> Mesh:
    """A copy of ``mesh`` with every vertex ``v`` moved to ``matrix @ v``."""
    copy = mesh.transformed(1.0, np.zeros(3))
    copy.vertices = mesh.vertices @ matrix.T
    return copy


def stretched_copy(mesh: Mesh, axis: np.ndarray, factor: float, extent: float) -> Mesh:
    """``mesh`` scaled by ``factor`` along the unit ``axis`` through the origin, then normalised to ``extent``."""
    stretch = np.eye(3) + (factor - 1.0) * np.outer(axis, axis)
    return normalize(linear_copy(mesh, stretch), extent)[0]


def render_grid(renderer, mesh: Mesh, views, light) -> torch.Tensor:
    """The six views tiled 3x2 on gray, float [3, 3h, 2w]."""
    return composite(tile(np.stack([r.to_uint8_rgba() for r in renderer.render_many(mesh, views, light)])), GRAY)[0]


def framed_condition(renderer, mesh: Mesh, camera, light, fill: float) -> torch.Tensor:
    """The condition view through the product's preprocessing (framing at ``fill``, gray), float [3, s, s]."""
    rgba = renderer.render_many(mesh, [camera], light)[0].to_uint8_rgba()
    rgb, _ = preprocess_image(Image.fromarray(rgba), PreprocessConfig(size=camera.width, fill=fill))
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def through_vae(vae, grids: torch.Tensor) -> torch.Tensor:
    return vae_roundtrip(vae, grids)[0]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = silhouette(a), silhouette(b)
    return float(((sa & sb).sum(dim=(-2, -1)) / (sa | sb).sum(dim=(-2, -1)).clamp_min(1)).mean())


def by_family(iou: torch.Tensor, families: list[str]) -> dict:
    per = {f: [float(x) for x, g in zip(iou, families, strict=True) if g == f] for f in sorted(set(families))}
    return {f: {"objects": len(v), "mask_iou": float(np.mean(v))} for f, v in per.items()}


def elevation_turn(azimuth_deg: float, from_deg: float, to_deg: float) -> np.ndarray:
    """The rotation about the origin that takes the camera at (azimuth, ``from_deg``) to (azimuth, ``to_deg``) (world
    +Z up): the world turned by it and seen from the second camera is the picture the first camera took."""
    a, d = math.radians(azimuth_deg), math.radians(to_deg - from_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    turn = np.array([[math.cos(d), 0.0, -math.sin(d)], [0.0, 1.0, 0.0], [math.sin(d), 0.0, math.cos(d)]])
    return rz @ turn @ rz.T


def turned_world(mesh: Mesh, light: Light, cond: Camera, elevation_deg: float) -> tuple[Mesh, Light, Camera]:
    """The object and its light turned so that a condition camera at ``elevation_deg`` (same azimuth) sees what
    ``cond`` saw."""
    rot = elevation_turn(cond.azimuth_deg, cond.elevation_deg, elevation_deg)
    return (
        linear_copy(mesh, rot),
        Light(rot @ light.direction, light.ambient, light.diffuse),
        replace(cond, elevation_deg=elevation_deg),
    )


AMBIGUITIES = ("stretch", "elevation", "both")


def ambiguities(cfg: DataConfig) -> tuple[str, ...]:
    """Upright objects show which way is up, so a turned world is not one of them: only the stretch applies."""
    return ("stretch",) if cfg.procedural.orientation == "upright" else AMBIGUITIES


def alternative(kind: str, mesh: Mesh, light: Light, cond: Camera, cfg: DataConfig, rng: np.random.Generator):
    """One world the condition view cannot tell from the object's own: (mesh, light, condition camera)."""
    if kind in ("stretch", "both"):
        axis = -cond.position / np.linalg.norm(cond.position)
        mesh = stretched_copy(mesh, axis, prior_stretch(rng), cfg.normalize_extent)
    if kind in ("elevation", "both"):
        elevation = float(rng.uniform(cfg.cond_elevation_min, cfg.cond_elevation_max))  # the build's prior
        mesh, light, cond = turned_world(mesh, light, cond, elevation)
    return mesh, light, cond


def measure(cfg: DataConfig, objects: int, draws: int, vae, rng_seed: int = 0) -> dict:
    renderer = RaycastRenderer(cfg.render)
    facts = facts_of_data("multiview", "bench_view_ceiling", cfg)
    fill = condition_fill(facts)  # the product's framing of an input for a run trained on this data
    rng = np.random.default_rng(rng_seed)
    truth, families = [], []
    kinds = ambiguities(cfg)
    copies = {k: [] for k in kinds}
    cond_iou = {k: [] for k in kinds}
    for i in range(objects):
        obj = generate_object(i, cfg.procedural)
        mesh = normalize(obj.mesh, cfg.normalize_extent)[0]
        families.append(obj.family)
        obj_rng = object_rng(cfg.seed, obj.uid)  # the data build's order: light, then cameras
        light = light_from_config(cfg.render, obj_rng)
        cond, views = sample_cameras(cfg, obj_rng)[0]
        truth.append(render_grid(renderer, mesh, views, light))
        own_cond = framed_condition(renderer, mesh, cond, light, fill)
        for kind in kinds:
            grids = []
            for _ in range(draws):
                alt_mesh, alt_light, alt_cond = alternative(kind, mesh, light, cond, cfg, rng)
                grids.append(render_grid(renderer, alt_mesh, views, alt_light))  # targets: the cond's azimuth only
                alt_view = framed_condition(renderer, alt_mesh, alt_cond, alt_light, fill)
                cond_iou[kind].append(mask_iou(alt_view, own_cond))
            copies[kind].append(torch.stack(grids))
    truth_t = torch.stack(truth)
    psnr, iou = view_scores(through_vae(vae, truth_t), truth_t)
    result = {
        "orientation": cfg.procedural.orientation,
        "objects": len(truth),
        "draws": draws,
        "fill": fill,
        "truth_vae": {"mask_iou": float(iou.mean()), "psnr": float(psnr.mean())},
    }
    for kind in kinds:
        alt = torch.stack(copies[kind])  # [N, D, 3, H, W]
        alt_vae = through_vae(vae, alt.flatten(0, 1)).view_as(alt)
        row = {"condition_mask_iou": float(np.mean(cond_iou[kind]))}
        for name, grids in (("sample", alt[:, 0]), ("sample_vae", alt_vae[:, 0]), ("mean_vae", alt_vae.mean(dim=1))):
            psnr, iou = view_scores(grids, truth_t)
            row[name] = {"mask_iou": float(iou.mean()), "psnr": float(psnr.mean())}
            if name == "sample_vae":
                row["sample_vae_by_family"] = by_family(iou, families)
        result[kind] = row
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=64)
    ap.add_argument("--seed", type=int, default=3000, help="procedural seed of the held-out objects")
    ap.add_argument("--draws", type=int, default=4, help="alternatives per object and kind (averaged by the mean rows)")
    ap.add_argument("--config", default=str(ROOT / "experiments" / "tiny" / "data.yaml"), help="data recipe")
    ap.add_argument("--pipeline", default=str(ROOT / "checkpoints" / "tiny" / "multiview" / "export"))
    ap.add_argument("--orientation", choices=ORIENTATIONS, default=None, help="default: the recipe's")
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
        **measure(data_config(Path(args.config), args.seed, args.orientation), args.objects, args.draws, vae),
    }
    result["seconds"] = time.perf_counter() - t0
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    print(
        f"one view's ambiguities: {r['objects']} procedural objects of seed {r['seed']} ({r['orientation']}), "
        f"{r['draws']} alternatives each, scored against the ground-truth views ({r['seconds']:.0f} s)"
    )
    print(
        f"ground truth through the VAE: mask IoU {r['truth_vae']['mask_iou']:.3f}, PSNR {r['truth_vae']['psnr']:.2f} dB"
    )
    print(
        f"| {'alternative worlds':22s} | input IoU | sample IoU | sample IoU, VAE | mean IoU, VAE | sample PSNR, VAE |"
    )
    kinds = [k for k in AMBIGUITIES if k in r]
    for kind in kinds:
        a = r[kind]
        print(
            f"| {kind:22s} | {a['condition_mask_iou']:9.3f} | {a['sample']['mask_iou']:10.3f} | "
            f"{a['sample_vae']['mask_iou']:15.3f} | {a['mean_vae']['mask_iou']:13.3f} | "
            f"{a['sample_vae']['psnr']:16.2f} |"
        )
    for kind in kinds:
        by = ", ".join(f"{f} {v['mask_iou']:.3f} ({v['objects']})" for f, v in r[kind]["sample_vae_by_family"].items())
        print(f"sample IoU through the VAE by family (objects), {kind}: {by}")


if __name__ == "__main__":
    main()
