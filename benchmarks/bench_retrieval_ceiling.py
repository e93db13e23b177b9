"""What copying the nearest training examples reaches: the retrieval ceiling of the multi-view stage's silhouettes,
and how it grows with the number of training conditions.

    .venv/bin/python benchmarks/bench_retrieval_ceiling.py --train 'data/ship-multiview/shard-*.tar'
        --heldout 'data/heldout-follow/shard-*.tar' [--limit 64] [--sizes 2048 8192] [--neighbours 16]
        [--fill 0.665] [--pipeline checkpoints/tiny/multiview/export] [--input-scale] [--seed 0]

Every condition view (the training shards' ``cond{k}``, each with its own target grid ``mv{k}``; the held-out
shards' ``cond0`` with ``mv0``) is framed as the product frames its inputs (``pipeline.preprocess`` at ``--fill``,
gray background). For each held-out condition the training conditions nearest by silhouette IoU are looked up among
a random subset of ``--sizes`` training conditions; the nearest one's target grid (``1-NN``) and the mean of the
``--neighbours`` nearest grids (``k-NN mean``) are scored against the held-out object's own grid by
``bench_multiview_follow``'s rule (silhouette = more than 0.08 from gray in some channel). A model whose samples
track its training data is not expected to beat these rows by much; the trend over the subset sizes says whether
more training objects raise them.

``--pipeline`` adds the 1-NN grid through that pipeline's VAE (what a perfect copy loses to the decoder).
``--input-scale`` also scores targets at the input's scale: every grid zoomed about its views' centres by ``fill /
(the share of its rendered condition view that the object's box spans)``, i.e. the object scaled so that its
condition, as rendered, is already framed (perspective ignored) — a data contract the project does not use, measured
to know what the framing's lost size costs. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_multiview_follow import condition_images, follow_metrics, silhouette, vae_roundtrip

from one2345pp.data.decode import composite, read_rgba
from one2345pp.data.framing import ALPHA_THRESHOLD
from one2345pp.demo.heldout import shard_fields
from one2345pp.models.multiview_pipeline import GRAY, MultiViewDiffusionPipeline

MAX_CONDITIONS = 16  # cond0 .. cond15 are looked for in each sample


# ------------------------------------------------------------------------------------------------------- data
def box_share(rgba: np.ndarray) -> float:
    """Share of the (square) view that the longer side of the object's alpha box spans."""
    ys, xs = np.nonzero(rgba[..., 3] > ALPHA_THRESHOLD)
    if len(ys) == 0:
        raise ValueError("condition view has no object pixel")
    return max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / rgba.shape[0]


def framed_silhouette(rgba: np.ndarray, fill: float) -> np.ndarray:
    """The condition through the product's input path (at its own size), as a flat boolean silhouette."""
    return silhouette(condition_images([{"cond": rgba}], rgba.shape[0], fill)[0]).flatten().numpy()


def read_pairs(patterns: list[str], first_only: bool, limit: int | None, fill: float) -> dict:
    """(condition, target grid) pairs of the shards: framed silhouettes [N, P] bool, RGBA grids [N, 3V, 2V, 4]
    uint8, box shares [N] of the rendered conditions, and the uids."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no shards match {patterns}")
    keys = (0,) if first_only else tuple(range(MAX_CONDITIONS))
    fields = tuple(f for k in keys for f in (f"cond{k}.png", f"mv{k}.png"))
    sil, grids, shares, uids = [], [], [], []
    for uid, f in list(shard_fields(paths, fields).items())[:limit]:
        for k in keys:
            if f"cond{k}.png" in f and f"mv{k}.png" in f:
                cond = read_rgba(f, f"cond{k}.png")
                sil.append(framed_silhouette(cond, fill))
                grids.append(read_rgba(f, f"mv{k}.png"))
                shares.append(box_share(cond))
                uids.append(uid)
    if not sil:
        raise ValueError(f"no cond/mv pairs in {patterns}")
    return {"sil": np.stack(sil), "grids": np.stack(grids), "shares": np.array(shares), "uids": uids}


def grids_on_gray(rgba: np.ndarray, zoom: np.ndarray | None = None) -> torch.Tensor:
    """RGBA grids [N, 3V, 2V, 4] uint8 -> [N, 3, 3V, 2V] on gray; ``zoom`` [N] scales each grid's six views about
    their centres (premultiplied, bilinear) before compositing."""
    if zoom is None:
        return composite(rgba, GRAY)[0]
    x = torch.from_numpy(rgba).float().div(255.0).permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    v = w // 2
    x = torch.cat([x[:, :3] * x[:, 3:], x[:, 3:]], dim=1)  # premultiplied: no background colour bleeds in
    tiles = x.unfold(2, v, v).unfold(3, v, v).permute(0, 2, 3, 1, 4, 5).reshape(n * 6, 4, v, v)
    k = torch.as_tensor(np.repeat(zoom, 6), dtype=torch.float32)
    theta = torch.zeros(n * 6, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / k
    tiles = F.grid_sample(tiles, F.affine_grid(theta, list(tiles.shape), align_corners=False), align_corners=False)
    x = tiles.reshape(n, 3, 2, 4, v, v).permute(0, 3, 1, 4, 2, 5).reshape(n, 4, h, w)
    return x[:, :3] + GRAY * (1.0 - x[:, 3:])


# ---------------------------------------------------------------------------------------------------- ceiling
def nearest(held: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    """Indices [H, k] of the ``k`` training silhouettes of highest IoU with each held-out one, best first."""
    a, b = torch.from_numpy(held).float(), torch.from_numpy(train).float()
    inter = a @ b.T
    iou = inter / (a.sum(1, keepdim=True) + b.sum(1)[None] - inter).clamp_min(1.0)
    return iou.topk(min(k, len(train)), dim=1).indices.numpy()


def score_subset(
    held: dict, train: dict, subset: np.ndarray, k: int, scale_fill: float | None = None, vae=None
) -> dict:
    """1-NN and k-NN-mean scores of the held-out pairs against the training pairs ``subset``; ``scale_fill``: the
    grids at the input's scale, each zoomed by ``scale_fill`` / its condition's box share."""

    def grids(d: dict, rows) -> torch.Tensor:
        return grids_on_gray(d["grids"][rows], None if scale_fill is None else scale_fill / d["shares"][rows])

    truth = grids(held, slice(None))
    top = subset[nearest(held["sil"], train["sil"][subset], k)]  # [H, k] indices into train
    first = grids(train, top[:, 0])
    mean = torch.stack([grids(train, row).mean(0) for row in top])
    one, many = follow_metrics(first, truth), follow_metrics(mean, truth)
    out = {
        "conditions": len(subset),
        "nn1_mask_iou": one["mask_iou"],
        "nn1_psnr": one["psnr"],
        "knn_mean_mask_iou": many["mask_iou"],
        "knn_mean_psnr": many["psnr"],
        "mean_grid_mask_iou": one["mean_grid_mask_iou"],
    }
    if vae is not None:
        out["nn1_vae_mask_iou"] = follow_metrics(vae_roundtrip(vae, first)[0], truth)["mask_iou"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", required=True, help="training shard paths or glob patterns")
    ap.add_argument("--heldout", nargs="+", required=True, help="held-out shard paths or glob patterns")
    ap.add_argument("--limit", type=int, default=64, help="held-out objects")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="training-condition subset sizes (and all)")
    ap.add_argument("--neighbours", type=int, default=16)
    ap.add_argument("--fill", type=float, default=0.665, help="the product's framing share (the pipeline's)")
    ap.add_argument("--pipeline", default=None, help="a multi-view pipeline folder: adds the 1-NN grid through its VAE")
    ap.add_argument("--input-scale", action="store_true", help="also score targets at the input's scale")
    ap.add_argument("--seed", type=int, default=0, help="draw of the subsets")
    args = ap.parse_args(argv)
    if not 0.05 <= args.fill <= 1.0:
        raise ValueError(f"--fill={args.fill} must lie in [0.05, 1]")
    t0 = time.perf_counter()
    held = read_pairs(args.heldout, True, args.limit, args.fill)
    train = read_pairs(args.train, False, None, args.fill)
    if set(held["uids"]) & set(train["uids"]):
        raise ValueError("held-out and training shards share objects: use a held-out seed")
    vae = MultiViewDiffusionPipeline.from_pretrained(args.pipeline).vae if args.pipeline else None
    total = len(train["uids"])
    sizes = sorted({s for s in args.sizes if 0 < s < total} | {total})
    rng = np.random.default_rng(args.seed)
    rows = []
    for size in sizes:
        subset = np.sort(rng.permutation(total)[:size])
        with torch.no_grad():
            row = {"size": size, "rendered": score_subset(held, train, subset, args.neighbours, vae=vae)}
            if args.input_scale:
                row["input_scale"] = score_subset(held, train, subset, args.neighbours, scale_fill=args.fill)
        rows.append(row)
    result = {
        "bench": "retrieval_ceiling",
        "heldout_objects": len(held["uids"]),
        "training_objects": len(set(train["uids"])),
        "training_conditions": total,
        "neighbours": args.neighbours,
        "fill": args.fill,
        "pipeline": args.pipeline,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    k = r["neighbours"]
    print(
        f"retrieval ceiling: {r['heldout_objects']} held-out conditions framed at fill {r['fill']}, against subsets of "
        f"{r['training_conditions']} training conditions ({r['training_objects']} objects); mean grid mask IoU "
        f"{r['rows'][0]['rendered']['mean_grid_mask_iou']:.3f} ({r['seconds']:.0f} s)"
    )
    vae = "nn1_vae_mask_iou" in r["rows"][0]["rendered"]
    scale = "input_scale" in r["rows"][0]
    head = f"| conditions | 1-NN mask IoU | {k}-NN mean mask IoU | 1-NN PSNR |"
    head += " 1-NN through the VAE |" if vae else ""
    head += f" input scale: 1-NN | {k}-NN mean |" if scale else ""
    print(head)
    for row in r["rows"]:
        a = row["rendered"]
        line = f"| {row['size']:10d} | {a['nn1_mask_iou']:13.3f} | {a['knn_mean_mask_iou']:19.3f} |"
        line += f" {a['nn1_psnr']:9.2f} |"
        line += f" {a['nn1_vae_mask_iou']:20.3f} |" if vae else ""
        if scale:
            s = row["input_scale"]
            line += f" {s['nn1_mask_iou']:17.3f} | {s['knn_mean_mask_iou']:11.3f} |"
        print(line)


if __name__ == "__main__":
    main()
