"""Multi-view stage throughput: training samples/s and seconds per 28-step sample (guidance 4, two UNet passes per
branch: record + read), at the tiny preset on the CPU and, when CUDA is present, at the full preset (random weights,
SD2-size UNet, 320 px views = 640x960 grids, bf16).

    .venv/bin/python benchmarks/bench_multiview.py [--steps 8] [--samples 2] [--threads N] [--full-batch 6]

The tiny preset runs twice: as configured (target latents kept after their first step, ``train.target_latent_cache``;
the synthetic batch repeats, so every timed step reads them) and with every target grid encoded at every step.
Prints a table and one JSON line. Target (issue 3): at most 4 s per 28-step sample with guidance at full size on one
H100 (bf16). Synthetic batches (smooth random images): data loading is measured by ``bench_data.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from one2345pp.config import load_config, to_object
from one2345pp.models.multiview_builders import random_components
from one2345pp.stages.multiview import MultiViewConfig, MultiViewModule

ROOT = Path(__file__).resolve().parents[1]
STEPS, GUIDANCE = 28, 4.0


def smooth_images(n: int, height: int, width: int, device, seed: int) -> torch.Tensor:
    """Low-frequency random images in [0, 1]: random 4x4 colour fields, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(m: MultiViewModule, batch: dict, steps: int, device: torch.device, bf16: bool) -> float:
    """Seconds per optimisation step (loss, backward, clip at 1.0, AdamW, EMA), after two warm-up steps."""
    opt = m.configure_optimizers()["optimizer"]
    params = m.trainable_parameters()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            loss = m.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if m.ema is not None:
            m.ema.update(m)

    m.train()
    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def time_sampling(pipe, cond: torch.Tensor, samples: int, device: torch.device) -> float:
    """Seconds per 28-step Euler-ancestral sample with guidance 4, after a short warm-up (one grid per input: a
    folder's ``num_candidates`` multiplies it)."""
    pipe.set_progress_bar_config(disable=True)
    one = {"guidance_scale": GUIDANCE, "num_candidates": 1, "output_type": "pt"}
    pipe(cond, num_inference_steps=2, **one)
    sync(device)
    t0 = time.perf_counter()
    for k in range(samples):
        gen = torch.Generator(device=device).manual_seed(k)
        pipe(cond, num_inference_steps=STEPS, generator=gen, **one)
    sync(device)
    return (time.perf_counter() - t0) / samples


def build_module(cfg: MultiViewConfig, device: torch.device, batch_size: int) -> tuple[MultiViewModule, dict]:
    """The stage's module with random weights of its preset on ``device`` and a synthetic batch of ``batch_size``."""
    components = random_components(
        cfg.model.preset, cfg.model.init_seed, device=device, condition_concat=cfg.model.condition_concat
    )
    m = MultiViewModule(cfg, components).to(device)
    view, cond_px = cfg.model.view_size, cfg.model.cond_size
    batch = {
        "cond": smooth_images(batch_size, cond_px, cond_px, device, seed=0),
        "target": smooth_images(batch_size, 3 * view, 2 * view, device, seed=1),
    }
    return m, batch


def bench(
    name: str, cfg: MultiViewConfig, device: torch.device, batch_size: int, steps: int, samples: int, bf16: bool
) -> dict:
    m, batch = build_module(cfg, device, batch_size)
    n_unet = sum(p.numel() for p in m.unet.parameters())
    n_train = sum(p.numel() for p in m.trainable_parameters())
    view = cfg.model.view_size
    t_step = time_training(m, batch, steps, device, bf16)
    if device.type == "cuda":
        peak_train = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    m.eval()
    pipe = m.pipeline()
    if bf16:
        pipe.to(torch.bfloat16)
    with torch.no_grad():
        t_sample = time_sampling(pipe, batch["cond"][:1].float(), samples, device)
    row = {
        "preset": name,
        "device": str(device),
        "dtype": "bf16" if bf16 else "fp32",
        "grid": f"{2 * view}x{3 * view}",
        "unet_params_m": n_unet / 1e6,
        "trainable_params_m": n_train / 1e6,
        "trainable": cfg.train.trainable,
        "batch": batch_size,
        "train_s_per_step": t_step,
        "train_samples_per_s": batch_size / t_step,
        "sample_s_28_steps_cfg4": t_sample,
    }
    if device.type == "cuda":
        row["peak_train_gib"] = peak_train
        row["peak_sample_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per preset")
    ap.add_argument("--samples", type=int, default=2, help="timed 28-step samples per preset")
    ap.add_argument("--batch", type=int, default=4, help="tiny-preset batch size (the tiny config's)")
    ap.add_argument("--full-batch", type=int, default=6, help="full-preset batch per GPU (the full config's)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads, as train.cpu_threads of the tiny config (0: torch's default)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    tiny_yaml = ROOT / "experiments" / "tiny" / "multiview.yaml"
    tiny = to_object(load_config(MultiViewConfig, tiny_yaml))
    rows.append(bench("tiny", tiny, torch.device("cpu"), args.batch, args.steps, args.samples, bf16=False))
    rows[-1]["target_latent_cache"] = tiny.train.target_latent_cache
    # the same preset encoding every target grid with the VAE at every step (train.target_latent_cache=0)
    uncached = to_object(load_config(MultiViewConfig, tiny_yaml, ["train.target_latent_cache=0"]))
    rows.append(bench("tiny", uncached, torch.device("cpu"), args.batch, args.steps, args.samples, bf16=False))
    rows[-1]["target_latent_cache"] = 0
    full_note = None
    if torch.cuda.is_available():
        full = to_object(
            load_config(MultiViewConfig, ROOT / "experiments" / "multiview.yaml", ["model.pretrained=null"])
        )
        device = torch.device("cuda")
        rows.append(bench("full", full, device, args.full_batch, args.steps, args.samples, bf16=True))
        rows[-1]["gpu"] = torch.cuda.get_device_name(device)
    else:
        full_note = "full preset (640x960, bf16): not available (no CUDA device)"

    print(
        f"multi-view stage, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"{'preset':<6} {'device':<7} {'dtype':<5} {'grid':<8} {'UNet M':>7} {'train M':>8} {'batch':>5} "
        f"{'latent cache':>12} {'s/step':>8} {'samples/s':>10} {'s/sample(28, cfg 4)':>20}"
    )
    for r in rows:
        cache = r.get("target_latent_cache", 0)
        print(
            f"{r['preset']:<6} {r['device']:<7} {r['dtype']:<5} {r['grid']:<8} {r['unet_params_m']:>7.1f} "
            f"{r['trainable_params_m']:>8.1f} {r['batch']:>5} {(str(cache) if cache else 'off'):>12} "
            f"{r['train_s_per_step']:>8.3f} {r['train_samples_per_s']:>10.2f} {r['sample_s_28_steps_cfg4']:>20.2f}"
        )
    if full_note:
        print(full_note)
    result = {"bench": "multiview", "threads": torch.get_num_threads(), "rows": rows}
    if full_note:
        result["full"] = "not available (no CUDA)"
    else:
        result["full_target_s_per_sample"] = 4.0
        result["full_meets_target"] = rows[-1]["sample_s_28_steps_cfg4"] <= 4.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
