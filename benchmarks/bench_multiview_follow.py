"""Does the multi-view stage follow its input? Scores an exported multi-view pipeline on held-out objects.

    .venv/bin/python benchmarks/bench_multiview_follow.py --pipeline RUN/export --shards data/heldout/shard-*.tar
        [--limit 16] [--steps N] [--guidance G] [--candidates K] [--sampler euler_a|ddim] [--raw-condition]
        [--diagnose] [--out DIR]

The held-out shards are built by ``one2345pp data build`` from a procedural seed the model never trained on (``make
bench-multiview-follow`` builds 16 objects of seed 3000 with the tiny data recipe). Each object's condition view goes
through the product's own input path (``pipeline.preprocess``: framing, gray background) and the pipeline's default
sampling (Euler-ancestral, the folder's own ``num_inference_steps``, ``guidance_scale`` and ``num_candidates``: grids
drawn per input, the one nearest their mean kept); the generated 3x2 grid
is compared, at the pipeline's view size on gray, with the object's ground-truth grid:

* ``identification``: share of objects whose generated grid is nearer (mean squared error) to their own ground-truth
  grid than to any other held-out object's;
* ``mask_iou``: silhouette IoU per view (a pixel is object where it differs from the gray background by more than
  0.08 in some channel, the same rule for both grids), mean over views and objects;
* ``psnr``: PSNR per view, mean; ``mean_grid_psnr`` / ``mean_grid_mask_iou``: the same scores of the mean of all
  held-out ground-truth grids, i.e. what a model that ignores its input can reach;
* ``cond_gain``: the relative increase of the training loss (Min-SNR-``gamma`` weighted, as ``val/cond_gain``) when
  every object gets another object's condition, with the same noise and timesteps.

``--diagnose`` adds what the record in ``docs/multiview_conditioning.md`` was built from: the unweighted v-loss per
timestep bucket with the object's own condition, another object's and the unconditional branch; the share of
attention each ``attn1`` layer gives the reference tokens; the VAE's reconstruction of the ground-truth grids; the
spread of the CLIP image embeddings between objects. Prints a table and one JSON line; ``--out`` also writes
``follow.json`` and ``sheet.png`` (input | generated | ground truth per object).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from one2345pp.cameras import untile
from one2345pp.data.config import DataConfig
from one2345pp.data.decode import composite, read_rgba
from one2345pp.data.sample import camera_distance
from one2345pp.demo.heldout import shard_fields
from one2345pp.models.multiview_pipeline import (
    GRAY,
    MultiViewDiffusionPipeline,
    clip_pixels,
    concat_condition,
    condition_inputs,
    encode_target,
    scale_image,
    unconditional_condition,
    unscale_image,
    with_condition_channels,
)
from one2345pp.models.reference_attention import ReferenceAttnProcessor, noisy_reference, reference_forward
from one2345pp.pipeline.build import condition_fill, data_facts, resolve_run
from one2345pp.pipeline.preprocess import PreprocessConfig, preprocess_image
from one2345pp.utils.atomic import write_json

SILHOUETTE_THRESHOLD = 0.08
BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))


# ------------------------------------------------------------------------------------------------------- data
def read_heldout(patterns: list[str], limit: int | None) -> list[dict]:
    """Condition view 0 (RGBA uint8) and its ground-truth grid (on gray, float [3, 3h, 2w]) of each shard sample."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no shards match {patterns}")
    out = []
    for uid, fields in list(shard_fields(paths, ("cond0.png", "mv0.png")).items())[:limit]:
        if set(fields) != {"cond0.png", "mv0.png"}:
            raise ValueError(f"held-out sample {uid} lacks cond0.png or mv0.png")
        grid, _ = composite(read_rgba(fields, "mv0.png"), GRAY)
        out.append({"uid": uid, "cond": read_rgba(fields, "cond0.png"), "grid": grid})
    return out


def heldout_config(patterns: list[str]) -> Path:
    """The data config (``config.yaml`` beside the shards) the held-out shards were built with."""
    first = sorted(p for pattern in patterns for p in glob.glob(pattern))[0]
    return Path(first).parent / "config.yaml"


def heldout_seed(patterns: list[str]) -> int | None:
    """The procedural seed of the held-out shards, when their config is there."""
    config = heldout_config(patterns)
    if not config.is_file():
        return None
    return int(OmegaConf.select(OmegaConf.load(config), "data.procedural.seed", default=-1))


def check_framing(pipeline: str, patterns: list[str]) -> tuple[str, float]:
    """Refuse held-out views framed unlike the views the pipeline trained on (camera layout, distance, extent,
    view size): their silhouettes would differ in size whatever the model draws. Returns what was compared and the
    fill ratio the product's preprocessing frames inputs with for this run (``pipeline.build.condition_fill``)."""
    run, config = Path(pipeline).parent, heldout_config(patterns)
    if not (run / "config.yaml").is_file() or not config.is_file():
        fill = PreprocessConfig().fill
        return f"not checked (no run config beside the pipeline folder or no shard config); fill {fill}", fill
    trained = data_facts(resolve_run("multiview", run), {})
    held = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(config).data))
    pairs = {
        "camera layout": (trained.layout, held.layout),
        "camera distance": (round(trained.distance, 4), round(camera_distance(held), 4)),
        "normalisation extent": (trained.extent, held.normalize_extent),
        "view size": (trained.view_size, held.view_resolution),
    }
    wrong = [f"{k}: trained {a} ({trained.source}), held-out {b} ({config})" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        raise ValueError(
            "the held-out shards are framed unlike the pipeline's training views; rebuild them with the run's data "
            "config: " + "; ".join(wrong)
        )
    fill = condition_fill(trained)
    return f"layout {trained.layout}, distance {trained.distance:.3f}, {trained.view_size} px views; fill {fill}", fill


def condition_images(samples: list[dict], size: int, fill: float, raw: bool = False) -> torch.Tensor:
    """The product's input path: each RGBA condition through ``preprocess_image`` (framing at ``fill``, gray) ->
    [N, 3, s, s]; ``raw``: the rendered condition as the training shards hold it, only composited on gray."""
    if raw:
        return composite(np.stack([s["cond"] for s in samples]), GRAY)[0]
    cfg = PreprocessConfig(size=size, fill=fill)
    rgb = [preprocess_image(Image.fromarray(s["cond"]), cfg)[0] for s in samples]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------------------- metrics
def silhouette(images: torch.Tensor) -> torch.Tensor:
    """Object pixels of images on gray ``[..., 3, H, W]``: farther than the threshold from gray in some channel."""
    return ((images - GRAY).abs() > SILHOUETTE_THRESHOLD).any(dim=-3)


def view_scores(generated: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object mean over views of PSNR and silhouette IoU; grids [N, 3, 3h, 2w] in [0, 1]."""
    g, t = untile(generated), untile(truth)
    mse = (g - t).square().mean(dim=(2, 3, 4)).clamp_min(1e-10)
    psnr = (10.0 * torch.log10(1.0 / mse)).mean(dim=1)
    a, b = silhouette(g), silhouette(t)
    inter, union = (a & b).sum(dim=(2, 3)).float(), (a | b).sum(dim=(2, 3)).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean(dim=1)
    return psnr, iou


def follow_metrics(generated: torch.Tensor, truth: torch.Tensor) -> dict:
    dist = (generated[:, None] - truth[None]).square().mean(dim=(2, 3, 4))  # [generated, truth]
    nearest = dist.argmin(dim=1)
    psnr, iou = view_scores(generated, truth)
    mean_grid = truth.mean(dim=0, keepdim=True).expand_as(truth)
    base_psnr, base_iou = view_scores(mean_grid, truth)
    cross = (generated[:, None] - generated[None]).square().mean(dim=(2, 3, 4))
    n = len(truth)
    return {
        "objects": n,
        "identification": float((nearest == torch.arange(n)).float().mean()),
        "mask_iou": float(iou.mean()),
        "psnr": float(psnr.mean()),
        "mean_grid_psnr": float(base_psnr.mean()),
        "mean_grid_mask_iou": float(base_iou.mean()),
        # how different the outputs for different inputs are (0: the same grid for every input)
        "cross_input_mse": float(cross.sum() / max(1, n * (n - 1))),
        "per_object": {"psnr": psnr.tolist(), "mask_iou": iou.tolist(), "nearest": nearest.tolist()},
    }


# ------------------------------------------------------------------------------------------- loss diagnostics
def encode(pipe, images: torch.Tensor, generator: torch.Generator, unconditional: bool = False) -> tuple:
    """(hidden states, reference latents, concatenated-condition grid and reference or None) of condition images,
    or of the unconditional branch for as many images."""
    size = int(pipe.config.cond_size)
    if unconditional:
        hidden, ref = unconditional_condition(pipe.conditioner, pipe.vae, len(images), size, generator)
        refs = torch.full((len(images), 3, size, size), GRAY)
    else:
        refs, clip_input = condition_inputs(images, size, pipe.feature_extractor)
        hidden, ref = pipe.encode_inputs(refs, clip_input, guided=False, generator=generator)
    concat = (None, None)
    if pipe.config.condition_concat:
        concat = concat_condition(pipe.vae, refs, int(pipe.config.view_size))
    return hidden, ref, *concat


def _prediction(pipe, enc: tuple, x_t: torch.Tensor, t: torch.Tensor, ref_noise: torch.Tensor) -> torch.Tensor:
    hidden, ref, grid, own = enc
    ref_t = noisy_reference(ref, t, ref_noise, pipe.scheduler.alphas_cumprod)
    x, ref_t = with_condition_channels(x_t, grid), with_condition_channels(ref_t, own)
    return reference_forward(pipe.unet, x, t, hidden, ref_t)


def _losses(pipe, enc: tuple, z0, t, noise, ref_noise) -> torch.Tensor:
    """Unweighted per-sample v-prediction MSE for one condition encoding."""
    a = pipe.scheduler.alphas_cumprod.to(z0.device)[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * z0
    return (_prediction(pipe, enc, x_t, t, ref_noise).float() - v).square().mean(dim=(1, 2, 3))


@torch.no_grad()
def condition_response(pipe, cond: torch.Tensor, grids: torch.Tensor, gamma: float | None, draws: int, seed: int):
    """Loss with the object's own condition, another object's (rolled by one) and the unconditional branch, at the
    same noise and timesteps: per timestep bucket (unweighted) and overall (``gamma``-weighted, as val/cond_gain)."""
    g = torch.Generator().manual_seed(seed)
    own = encode(pipe, cond, g)
    other = tuple(x if x is None else x.roll(1, dims=0) for x in own)
    uncond = encode(pipe, cond, g, unconditional=True)
    acp = pipe.scheduler.alphas_cumprod
    rows = {b: {"own": [], "other": [], "uncond": []} for b in BUCKETS}
    weighted = {"own": [], "other": []}
    n = len(cond)
    for _ in range(draws):
        for lo, hi in BUCKETS:
            t = torch.randint(lo, hi, (n,), generator=g)
            z0 = encode_target(pipe.vae, grids, g).float()
            noise, ref_noise = torch.randn(z0.shape, generator=g), torch.randn(own[1].shape, generator=g)
            losses = {
                k: _losses(pipe, enc, z0, t, noise, ref_noise)
                for k, enc in (("own", own), ("other", other), ("uncond", uncond))
            }
            for k, v in losses.items():
                rows[(lo, hi)][k].append(v)
            snr = acp[t] / (1 - acp[t])
            w = snr.clamp(max=gamma) / (snr + 1) if gamma is not None else torch.ones_like(snr)
            for k in weighted:
                weighted[k].append(w * losses[k])
    buckets = []
    for (lo, hi), r in rows.items():
        own_l, other_l, un_l = (float(torch.cat(r[k]).mean()) for k in ("own", "other", "uncond"))
        buckets.append(
            {
                "t": f"{lo}-{hi - 1}",
                "own": own_l,
                "other": other_l,
                "uncond": un_l,
                "gain_other": (other_l - own_l) / other_l,
                "gain_uncond": (un_l - own_l) / un_l,
            }
        )
    own_w, other_w = float(torch.cat(weighted["own"]).mean()), float(torch.cat(weighted["other"]).mean())
    return {"cond_gain": (other_w - own_w) / other_w, "buckets": buckets}


@torch.no_grad()
def reference_attention_share(pipe, cond: torch.Tensor, grids: torch.Tensor, t_values=(100, 500, 900), seed: int = 0):
    """Softmax mass each ``attn1`` query puts on the reference tokens (mean over heads, queries and objects), per
    layer and timestep, with the share uniform attention would give (reference tokens / all keys) beside it."""
    g = torch.Generator().manual_seed(seed)
    shares: dict[str, list] = {}
    processors = [p for p in pipe.unet.attn_processors.values() if isinstance(p, ReferenceAttnProcessor)]
    originals = {id(p): p._attend for p in processors}

    def wrap(proc, t_now):
        def attend(attn, hidden, context, mask, temb):
            if context is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden))
                k = attn.head_to_batch_dim(attn.to_k(context))
                probs = (q @ k.transpose(1, 2) * attn.scale).softmax(dim=-1)
                n_target = hidden.shape[1]
                share = float(probs[..., n_target:].sum(-1).mean())
                uniform = (context.shape[1] - n_target) / context.shape[1]
                shares.setdefault(proc.name, []).append({"t": t_now, "share": share, "uniform": uniform})
            return originals[id(proc)](attn, hidden, context, mask, temb)

        return attend

    enc = encode(pipe, cond, g)
    z0 = encode_target(pipe.vae, grids, g).float()
    try:
        for t_now in t_values:
            for p in processors:
                p._attend = wrap(p, t_now)
            t = torch.full((len(cond),), t_now, dtype=torch.long)
            a = pipe.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            x_t = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=g)
            _prediction(pipe, enc, x_t, t, torch.randn(enc[1].shape, generator=g))
    finally:
        for p in processors:
            p._attend = originals[id(p)]
    return [
        {
            "layer": name.replace(".processor", ""),
            **{f"t{r['t']}": round(r["share"], 4) for r in rows},
            "uniform": round(rows[0]["uniform"], 4),
        }
        for name, rows in shares.items()
    ]


@torch.no_grad()
def vae_roundtrip(vae, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids in [0, 1] through the VAE (posterior mean, the diffusion's image scaling): (decoded grids, latents)."""
    z = vae.encode(scale_image(grids * 2.0 - 1.0)).latent_dist.mode()
    return ((unscale_image(vae.decode(z).sample) + 1.0) / 2.0).clamp(0, 1), z


def vae_retention(pipe, grids: torch.Tensor) -> dict:
    """The ground-truth grids through the VAE: PSNR, silhouette IoU."""
    rec, z = vae_roundtrip(pipe.vae, grids)
    psnr, iou = view_scores(rec, grids)
    return {"latent_shape": list(z.shape[1:]), "psnr": float(psnr.mean()), "mask_iou": float(iou.mean())}


@torch.no_grad()
def clip_spread(pipe, cond: torch.Tensor) -> dict:
    """Mean pairwise cosine similarity of the CLIP image embeddings of different objects, and of the global
    condition (hidden states) they produce."""
    emb = pipe.image_encoder(pixel_values=clip_pixels(cond, pipe.feature_extractor)).image_embeds
    hid = pipe.conditioner(emb).flatten(1)

    def mean_cos(x):
        x = torch.nn.functional.normalize(x.float(), dim=1)
        sim = x @ x.T
        n = len(x)
        return float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))

    return {"embedding_cosine": mean_cos(emb), "hidden_cosine": mean_cos(hid)}


# ------------------------------------------------------------------------------------------------------- main
def sheet(cond: torch.Tensor, generated: torch.Tensor, truth: torch.Tensor) -> Image.Image:
    from one2345pp.stages.multiview import sample_sheet

    grid = sample_sheet(cond, generated, truth)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", required=True, help="exported multi-view pipeline folder")
    ap.add_argument("--shards", nargs="+", required=True, help="held-out shard paths or glob patterns")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="default: the pipeline folder's own")
    ap.add_argument("--guidance", type=float, default=None, help="default: the pipeline folder's own")
    ap.add_argument("--candidates", type=int, default=None, help="grids per input; default: the folder's own")
    ap.add_argument("--sampler", default="euler_a", help="euler_a (the pipeline's default) or ddim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gamma", type=float, default=5.0, help="Min-SNR gamma of cond_gain (<= 0: unweighted)")
    ap.add_argument("--draws", type=int, default=2, help="noise draws per timestep bucket for the loss figures")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--raw-condition",
        action="store_true",
        help="feed the rendered condition as the shards hold it instead of the pipeline's preprocessing (framing)",
    )
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    framing, fill = check_framing(args.pipeline, args.shards)
    pipe = MultiViewDiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    samples = read_heldout(args.shards, args.limit)
    if len(samples) < 2:
        raise ValueError(f"need at least 2 held-out objects, got {len(samples)}")
    cond = condition_images(samples, int(pipe.config.cond_size), fill, raw=args.raw_condition)
    truth = torch.stack([s["grid"] for s in samples]).float()
    steps, guidance, candidates = pipe.sampling_defaults(args.steps, args.guidance, args.candidates)
    out = pipe(
        cond,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_candidates=candidates,
        sampler=args.sampler,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    )
    generated = out.grid.float()
    if generated.shape != truth.shape:
        raise ValueError(
            f"generated grids {tuple(generated.shape)} and ground truth {tuple(truth.shape)} differ "
            "in size: build the held-out shards with the pipeline's view size"
        )
    result = {
        "pipeline": str(args.pipeline),
        "heldout_seed": heldout_seed(args.shards),
        "framing": framing,
        "sampling": {"steps": steps, "guidance": guidance, "candidates": candidates, "sampler": args.sampler},
        **follow_metrics(generated, truth),
    }
    gamma = args.gamma if args.gamma > 0 else None
    response = condition_response(pipe, cond, truth, gamma, args.draws, args.seed)
    result["cond_gain"] = response["cond_gain"]
    if args.diagnose:
        result["loss_buckets"] = response["buckets"]
        result["reference_attention"] = reference_attention_share(pipe, cond, truth)
        result["vae"] = vae_retention(pipe, truth)
        result["clip"] = clip_spread(pipe, cond)
    result["seconds"] = time.perf_counter() - t0
    print_table(result)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "follow.json", result)
        sheet(cond, generated, truth).save(out_dir / "sheet.png")
    print(json.dumps({k: v for k, v in result.items() if k != "per_object"}))
    return result


def print_table(r: dict) -> None:
    rows = [
        ("identification (own grid nearest)", f"{r['identification']:.3f}", ">= 0.75"),
        ("view mask IoU", f"{r['mask_iou']:.3f}", ">= 0.80"),
        ("view PSNR (dB)", f"{r['psnr']:.2f}", f">= mean grid {r['mean_grid_psnr']:.2f}"),
        ("mean-of-ground-truth grid PSNR (dB)", f"{r['mean_grid_psnr']:.2f}", "baseline"),
        ("mean-of-ground-truth grid mask IoU", f"{r['mean_grid_mask_iou']:.3f}", "baseline"),
        ("cond_gain (Min-SNR weighted)", f"{r['cond_gain']:.3f}", ">= 0.2"),
        ("cross-input MSE of generated grids", f"{r['cross_input_mse']:.4f}", "> 0"),
    ]
    smp = r["sampling"]
    print(
        f"multi-view follow-the-input, {r['objects']} held-out objects of seed {r['heldout_seed']}, "
        f"{smp['steps']} {smp['sampler']} steps, guidance {smp['guidance']:g}, consensus of {smp['candidates']} "
        f"({r['seconds']:.0f} s)"
    )
    print(f"| {'figure':38s} | {'measured':>9s} | target |")
    for name, value, target in rows:
        print(f"| {name:38s} | {value:>9s} | {target} |")
    for b in r.get("loss_buckets", []):
        print(
            f"  t {b['t']:>8s}: v-loss own {b['own']:.4f} other {b['other']:.4f} uncond {b['uncond']:.4f}  "
            f"gain vs other {b['gain_other']:+.3f} vs uncond {b['gain_uncond']:+.3f}"
        )
    for a in r.get("reference_attention", []):
        print(f"  ref attention {a['layer']}: " + " ".join(f"{k}={v}" for k, v in a.items() if k != "layer"))
    if "vae" in r:
        print(f"  VAE {r['vae']['latent_shape']}: PSNR {r['vae']['psnr']:.2f} dB, mask IoU {r['vae']['mask_iou']:.3f}")
    if "clip" in r:
        print(
            f"  CLIP cosine between objects: embeddings {r['clip']['embedding_cosine']:.3f}, "
            f"hidden states {r['clip']['hidden_cosine']:.3f}"
        )


if __name__ == "__main__":
    main()
