"""Sparse-convolution speed: the pure-PyTorch backend against dense conv3d (and against torchsparse on CUDA).

    .venv/bin/python benchmarks/bench_sparse.py [--resolution 128] [--channels 32] [--repeats 3] [--threads N]
                                                [--device cpu|cuda]

Input: a sphere shell (radius 0.35 R, about 3.2 voxels thick: ~4% of the R^3 cells at R = 128), batch 1, C channels
in and out. Timed: median over ``--repeats`` runs (more for fast operations: about 2 s of runs, at most 50) after one
warm-up:

* 3x3x3 convolution: dense ``conv3d`` (padding 1) on the whole grid vs the sparse submanifold convolution at the
  active sites, forward and forward + backward (input and weight gradients), kernel map cached as inside a UNet;
  plus a forward pass on a fresh tensor, which first builds the kernel map (as each training step with new
  coordinates does);
* kernel 2 stride 2: dense ``conv3d`` vs the sparse strided convolution, and dense ``conv_transpose3d`` vs the sparse
  transposed convolution back to the shell (forward + backward).

``--threads N`` sets torch's CPU threads (default: torch's choice). The machine's load average before and after is
printed and recorded: on a shared CPU, other processes stall the OpenMP barriers of the many short parallel regions of
the gather loops far more than dense conv3d's few long ones, so multi-threaded sparse timings swing with the load;
``--threads 1`` is the stable comparison. ``--device cuda`` also times the torchsparse backend when it imports.

Targets (issue 4): the torch backend at least 5x faster than dense on this CPU; on a GPU not slower than 2x
torchsparse. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from one2345pp.sparse import (
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    available_backends,
    backends,
)


def shell_coords(res: int, device) -> torch.Tensor:
    r = torch.arange(res, dtype=torch.float32) + 0.5 - res / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    d = (x * x + y * y + z * z).sqrt()
    mask = (d - 0.35 * res).abs() < 1.6
    idx = torch.nonzero(mask).int()
    return torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1).to(device)


MIN_TOTAL_S = 2.0


def timed(fn, device, repeats: int) -> float:
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = once()  # warm-up (allocator, kernel selection, cached maps)
    # at least `repeats` runs, more for fast operations (up to MIN_TOTAL_S of runs, at most 50) so that a burst of
    # load from other processes moves the median of the short sparse timings no more than the long dense ones
    runs = max(repeats, min(50, math.ceil(MIN_TOTAL_S / max(warm, 1e-6))))
    return statistics.median(once() for _ in range(runs))


def bench_backend(backend: str, coords, res: int, ch: int, device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(coords.shape[0], ch, generator=gen).to(device)
    subm = SubmanifoldConv3d(ch, ch, backend=backend).to(device)
    down = StridedConv3d(ch, ch, backend=backend).to(device)
    up = TransposedConv3d(ch, ch, backend=backend).to(device)
    x = SparseTensor(coords, feats, batch_size=1)
    out = {}
    with torch.no_grad():
        out["subm_fwd_s"] = timed(lambda: subm(x), device, repeats)
        # new coordinates (as every training step brings): the kernel map is built, then the forward pass runs
        out["first_call_s"] = timed(lambda: subm(SparseTensor(coords, feats, batch_size=1)), device, repeats)
    xg = x.replace(feats.clone().requires_grad_(True))
    g = torch.randn(coords.shape[0], ch, generator=gen).to(device)
    out["subm_fwdbwd_s"] = timed(lambda: subm(xg).feats.backward(g), device, repeats)
    coarse = down(xg)
    gc = torch.randn(coarse.num_points, ch, generator=gen).to(device)
    out["down_fwdbwd_s"] = timed(lambda: down(xg).feats.backward(gc), device, repeats)
    h = coarse.replace(coarse.feats.detach().clone().requires_grad_(True))
    out["up_fwdbwd_s"] = timed(lambda: up(h).feats.backward(g), device, repeats)
    out["kernel_maps_built"] = x.cache.builds
    return out


def bench_dense(res: int, ch: int, device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, ch, res, res, res, generator=gen).to(device)
    w3 = (torch.randn(ch, ch, 3, 3, 3, generator=gen) * 0.02).to(device)
    w2 = (torch.randn(ch, ch, 2, 2, 2, generator=gen) * 0.05).to(device)
    out = {}
    with torch.no_grad():
        out["subm_fwd_s"] = timed(lambda: F.conv3d(x, w3, padding=1), device, repeats)
    xg, w3g, w2g = x.clone().requires_grad_(True), w3.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    g = torch.randn_like(x)
    out["subm_fwdbwd_s"] = timed(lambda: F.conv3d(xg, w3g, padding=1).backward(g), device, repeats)
    gc = g[:, :, ::2, ::2, ::2].contiguous()
    out["down_fwdbwd_s"] = timed(lambda: F.conv3d(xg, w2g, stride=2).backward(gc), device, repeats)
    hg = gc.clone().requires_grad_(True)
    out["up_fwdbwd_s"] = timed(lambda: F.conv_transpose3d(hg, w2g, stride=2).backward(g), device, repeats)
    return out


def torchsparse_status(device) -> str:
    """Why the torchsparse rows are missing ("" when they are measured)."""
    if "torchsparse" in available_backends(device):
        return ""
    error = backends.torchsparse_load_error()
    if error:
        return f"not available: does not import ({error})"
    return f"not available: torchsparse {backends.torchsparse_info().version_text} needs a CUDA device"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.environ.pop(backends.ENV_VAR, None)  # the backends are chosen explicitly here
    load_before = os.getloadavg()[0]
    coords = shell_coords(args.resolution, device)
    occupancy = coords.shape[0] / args.resolution**3
    results = {"dense": bench_dense(args.resolution, args.channels, device, args.repeats)}
    for backend in available_backends(device):
        results[backend] = bench_backend(backend, coords, args.resolution, args.channels, device, args.repeats)
    ts_status = torchsparse_status(device)
    load_after = os.getloadavg()[0]

    rows = [
        ("3x3x3 forward", "subm_fwd_s"),
        ("3x3x3 forward+backward", "subm_fwdbwd_s"),
        ("k2s2 forward+backward", "down_fwdbwd_s"),
        ("transposed k2s2 fwd+bwd", "up_fwdbwd_s"),
    ]
    names = ["dense", "torch", "torchsparse"]
    print(
        f"\nsparse convolution, {args.resolution}^3, {coords.shape[0]} active cells ({occupancy:.1%}), "
        f"{args.channels} -> {args.channels} channels, batch 1, {device.type}, {torch.get_num_threads()} threads, "
        f"median of >= {args.repeats} runs after a warm-up; load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
    )

    def cell(name: str, key: str) -> str:
        value = results.get(name, {}).get(key)
        return f"{value:>16.4f}" if value is not None else f"{'-' if name in results else 'n/a':>16}"

    print(f"{'operation':<28}" + "".join(f"{n + ' [s]':>16}" for n in names) + f"{'dense / torch':>15}")
    speedups = {}
    for label, key in rows:
        speedups[key] = results["dense"][key] / results["torch"][key]
        print(f"{label:<28}" + "".join(cell(n, key) for n in names) + f"{speedups[key]:>14.1f}x")
    print(f"{'3x3x3 fwd, new coords (+map)':<28}" + "".join(cell(n, "first_call_s") for n in names))
    ratios = {}
    if ts_status:
        print(f"torchsparse: {ts_status}")
    else:
        ratios = {key: results["torch"][key] / results["torchsparse"][key] for _, key in rows}
        for label, key in rows:
            print(f"torch / torchsparse, {label}: {ratios[key]:.2f}x")
    record = {
        "bench": "sparse_conv",
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "resolution": args.resolution,
        "channels": args.channels,
        "active": int(coords.shape[0]),
        "occupancy": round(occupancy, 4),
        "repeats": args.repeats,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "results": results,
        "speedup_dense_over_torch": {k: round(v, 2) for k, v in speedups.items()},
        "target_5x_met": bool(min(speedups.values()) >= 5.0),
        "torchsparse": ts_status or "measured",
        "torch_over_torchsparse": {k: round(v, 2) for k, v in ratios.items()} or None,
        "target_2x_torchsparse_met": bool(max(ratios.values()) <= 2.0) if ratios else None,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
