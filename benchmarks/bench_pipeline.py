"""Seconds per stage and in total for one image through the whole pipeline (issue 6).

    .venv/bin/python benchmarks/bench_pipeline.py [--pipeline outputs/demo/pipeline] [--image PATH] [--repeats 2]
        [--threads N] [--full-device cuda|cpu|none] [--full-steps-scale 1.0]

1. Tiny preset on this CPU: the pipeline folder that ``make demo`` exports (``--pipeline``; trained tiny stages), run
   on one image (``--image``, default: a held-out procedural object rendered as the evaluation renders its input),
   with the settings stored in the folder (the demo's: 28 multi-view steps, guidance 4, 25 coarse and 20 fine
   steps, 300 texture-refinement iterations).
   The first call is reported apart (lazy initialisation); the table shows the median of the other ``--repeats``.
2. Full preset with random weights on ``--full-device`` (default: cuda when present, else skipped): the multi-view
   pipeline at the SD2 size (320 px views, 640x960 grid, bf16 on CUDA), one coarse 50-step and one fine 20-step
   sampling at 64^3 / 128^3 (a sphere shell stands in for an untrained coarse result, as in bench_recon), and the
   texture refinement of a procedural mesh against six 320 px views with experiments/texture.yaml. Random weights
   cost the same time as trained ones except where the data decide the work (the fine stage's support, the mesh
   size), which is why those use fixed stand-ins. ``--full-device cpu --full-steps-scale 0.05`` runs the same code
   on the CPU with fewer steps as a check that it works (its seconds say nothing about a GPU).

Targets: under 60 s for the tiny preset on this CPU; under 20 s in total with texture refinement at full size on
one H100 (the paper: 60 s with refinement, 20 s without). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY_TARGET_S = 60.0
FULL_TARGET_S = 20.0
STAGES = ("preprocess", "multiview", "coarse", "fine", "extraction", "texture")


def heldout_image(settings, seed: int = 4242) -> Image.Image:
    """A procedural object (a seed no training set uses) rendered as the evaluation renders its input."""
    from one2345pp.data.config import ProceduralConfig, RenderConfig
    from one2345pp.data.procedural import generate_object
    from one2345pp.evaluation.config import EvalConfig
    from one2345pp.evaluation.dataset import frame_ground_truth, input_camera
    from one2345pp.rendering.raycast import RaycastRenderer

    mesh = frame_ground_truth(generate_object(0, ProceduralConfig(seed=seed)).mesh, settings.extent)
    cam = input_camera(settings, EvalConfig())
    return Image.fromarray(RaycastRenderer(RenderConfig(supersample=2)).render(mesh, cam).to_uint8_rgba(), "RGBA")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_cpu(pipeline_dir: Path, image: Path | None, repeats: int) -> dict:
    from one2345pp.pipeline.one2345 import One2345PPPipeline

    if not (pipeline_dir / "model_index.json").is_file():
        raise SystemExit(f"no pipeline folder at {pipeline_dir}: run `make demo` first (it exports one), or --pipeline")
    pipe = One2345PPPipeline.from_pretrained(pipeline_dir)
    img = Image.open(image) if image is not None else heldout_image(pipe.settings)
    runs = []
    for i in range(1 + repeats):
        out = pipe(img, seed=i)
        runs.append(out.timings)
        print(f"  run {i}: {out.timings['total']:.2f} s ({out.mesh_raw.num_faces} faces)", flush=True)
    warm = runs[1:] or runs
    return {
        "pipeline": str(pipeline_dir),
        "settings": out.settings,
        "first_call": runs[0],
        "median": {k: statistics.median(r[k] for r in warm) for k in (*STAGES, "total")},
    }


def multiview_pipeline(preset: str, device: torch.device, dtype: torch.dtype):
    """The multi-view pipeline of a preset with random weights (``full``: SD2 / ViT-H sizes, 320 px views) on
    ``device`` in ``dtype``, progress bar off."""
    from one2345pp.models.multiview_builders import random_components

    size = 320 if preset == "full" else 64
    c = random_components(preset, device=device)  # built where it runs: the CPU initialisation is slow
    mv = c.pipeline(size, size).to(device, dtype)
    mv.set_progress_bar_config(disable=True)
    return mv


def full_preset(device: torch.device, scale: float) -> dict:
    """Full-size stages with random weights on ``device`` (bf16 autocast on CUDA)."""
    from bench_recon import gpu_timing  # coarse 50 + fine 20 steps at the full preset, one place for it
    from bench_texture import scene

    from one2345pp.config import load_config, to_object
    from one2345pp.stages.texture import TextureStageConfig
    from one2345pp.texture.settings import TextureSettings, texture_mesh

    steps = {k: max(1, round(v * scale)) for k, v in {"multiview": 28, "coarse": 50, "fine": 20}.items()}
    out: dict = {"device": str(device), "steps": steps}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    mv = multiview_pipeline("full", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cond = Image.fromarray(np.full((320, 320, 3), 127, np.uint8))
    for rep in range(2 if device.type == "cuda" else 1):  # the first CUDA run warms up kernels
        sync(device)
        t0 = time.perf_counter()
        res = mv(
            cond,
            num_inference_steps=steps["multiview"],
            guidance_scale=4.0,
            view_size=320,
            generator=torch.Generator().manual_seed(rep),
            output_type="pt",
        )
        sync(device)
        out["multiview_s"] = time.perf_counter() - t0
    out["grid"] = list(res.views[0].shape)
    del mv
    if device.type == "cuda":
        torch.cuda.empty_cache()
    recon = gpu_timing(device, steps["coarse"], steps["fine"])
    out.update(coarse_s=recon["coarse_s"], fine_s=recon["fine_s"], encoders=recon["encoders"])
    settings = TextureSettings.from_stage_config(
        to_object(load_config(TextureStageConfig, ROOT / "experiments/texture.yaml", []))
    )
    _, mesh, views, _ = scene(0, 320)
    sync(device)
    t0 = time.perf_counter()
    texture_mesh(mesh, views[1:], settings, device)  # the six generated views
    sync(device)
    out["texture_s"] = time.perf_counter() - t0
    out["total_s"] = out["multiview_s"] + out["coarse_s"] + out["fine_s"] + out["texture_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=ROOT / "outputs/demo/pipeline")
    ap.add_argument("--image", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--full-device", default="auto", help="cuda, cpu, none or auto (cuda when present)")
    ap.add_argument("--full-steps-scale", type=float, default=1.0, help="scale the full preset's step counts")
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = [round(x, 2) for x in os.getloadavg()]
    record: dict = {
        "bench": "pipeline",
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": load,
    }

    if not args.skip_tiny:
        print(f"tiny preset on the CPU ({torch.get_num_threads()} threads, load average {load[0]}):", flush=True)
        tiny = tiny_cpu(args.pipeline, args.image, args.repeats)
        record["tiny_cpu"] = tiny
        print(f"\n{'stage':<12}{'first call [s]':>16}{'median [s]':>12}")
        for k in (*STAGES, "total"):
            print(f"{k:<12}{tiny['first_call'][k]:>16.2f}{tiny['median'][k]:>12.2f}")
        ok = tiny["median"]["total"] < TINY_TARGET_S
        print(
            f"tiny preset total {tiny['median']['total']:.1f} s (target < {TINY_TARGET_S:.0f} s: "
            f"{'met' if ok else 'NOT met'})"
        )
        record["tiny_target_met"] = ok

    want = args.full_device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "none"
    if want == "none":
        print("\nfull preset: not measured (no CUDA device; --full-device cpu runs it on the CPU)")
        record["full"] = None
    else:
        print(f"\nfull preset, random weights, on {want} (step scale {args.full_steps_scale}):", flush=True)
        full = full_preset(torch.device(want), args.full_steps_scale)
        record["full"] = full
        for k in ("multiview", "coarse", "fine", "texture", "total"):
            print(f"{k:<12}{full[f'{k}_s']:>10.2f} s")
        if want == "cuda" and args.full_steps_scale == 1.0:
            record["full_target_met"] = full["total_s"] < FULL_TARGET_S
            print(f"full preset total {full['total_s']:.1f} s (target < {FULL_TARGET_S:.0f} s on one H100)")
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(record, default=float))


if __name__ == "__main__":
    main()
