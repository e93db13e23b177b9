"""Copy a trained multi-view run into the repository as a shipped checkpoint, with its model card.

    python tools/ship_run.py --run checkpoints/multiview/ship --data data/ship-multiview \
        --bench outputs/bench-multiview-follow/follow.json --train-seconds S --command "make ship-multiview" \
        --out checkpoints/tiny/multiview

Writes OUT/ (under a temporary name, then renamed): ``config.yaml`` (the run's resolved config, unchanged),
``export/`` (the diffusers folder, safetensors), ``logs/metrics.csv`` (the training curves), the last validation
sheet under ``media/``, ``data_config.yaml`` (the training shards' config.yaml, which the pipeline export reads when
the shards themselves are not there) and ``MODEL_CARD.md`` (command, config, data, seed, steps, wall time, metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from one2345pp.demo.steps import training_metrics
from one2345pp.pipeline.build import RUN_DATA_CONFIG
from one2345pp.utils.atomic import atomic_folder


def manifest_count(data: Path) -> int:
    lines = (data / "manifest.jsonl").read_text().splitlines()
    return sum(json.loads(ln).get("status") == "done" for ln in lines if ln.strip())


def model_card(run: Path, data: Path, bench: dict, seconds: float, command: str, note: str = "") -> str:
    cfg = OmegaConf.load(run / "config.yaml")
    data_cfg = OmegaConf.load(data / "config.yaml").data
    orientation = OmegaConf.select(data_cfg, "procedural.orientation", default="any")  # older builds: "any"
    m = training_metrics(run)
    size = sum(p.stat().st_size for p in (run / "export").rglob("*") if p.is_file())
    rows = [
        ("identification (own ground-truth grid nearest)", f"{bench['identification']:.3f}", ">= 0.75"),
        ("view mask IoU", f"{bench['mask_iou']:.3f}", ">= 0.80"),
        ("view PSNR", f"{bench['psnr']:.2f} dB", f">= mean-grid baseline {bench['mean_grid_psnr']:.2f} dB"),
        ("cond_gain on the held-out objects (Min-SNR 5 weighted)", f"{bench['cond_gain']:.3f}", ">= 0.2"),
        (
            "val/cond_gain at the end of training (the run's own loss weighting)",
            f"{m.get('val/cond_gain', float('nan')):.3f}",
            ">= 0.2",
        ),
        ("val/loss at the end of training", f"{m.get('val/loss', float('nan')):.4f}", ""),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""# Shipped tiny multi-view model (stage 1)

The tiny preset of the multi-view stage, trained on this repository's procedural objects. `make demo` uses it by
default; `one2345pp demo --from-scratch` trains every stage instead. Why it is shipped rather than trained inside the
demo, and why the tiny recipe departs from the paper (`model.condition_concat`), is in
`docs/multiview_conditioning.md`.

- **Command**: `{command}` (written {time.strftime("%Y-%m-%d")}, {platform.machine()}, {os.cpu_count()} CPU cores)
- **Config**: `config.yaml` here (the run's resolved config; recipe `experiments/tiny/multiview.yaml`)
- **Data**: {manifest_count(data)} procedural objects ({orientation}), seed {data_cfg.procedural.seed}, the tiny
  data recipe (`experiments/tiny/data.yaml`: {data_cfg.view_resolution} px views, {data_cfg.cond_samples} condition
  views per object); their shard config is `{RUN_DATA_CONFIG}`. The last shard was held out for validation.
- **Seed**: run.seed {cfg.run.seed}, model.init_seed {cfg.model.init_seed}
- **Steps**: {cfg.trainer.max_steps} optimizer steps at batch {cfg.data.batch_size} (VAE fit first:
  {cfg.train.vae_fit.steps} steps)
- **Wall time**: {seconds / 60:.1f} min for the training command
- **Weights**: `export/` (a `MultiViewDiffusionPipeline` folder, safetensors, {size / 2**20:.1f} MiB);
  `MultiViewDiffusionPipeline.from_pretrained("checkpoints/tiny/multiview/export")` loads it alone.

## Measured on held-out objects (procedural seed {bench.get("heldout_seed", "3000")}, never trained on)

`make bench-multiview-follow` ({bench["objects"]} objects, the pipeline's input path and default sampling:
{bench["sampling"]["steps"]} {bench["sampling"]["sampler"]} steps, guidance {bench["sampling"]["guidance"]:g}, the
consensus of {bench["sampling"].get("candidates", 1)} grids per input (the export's defaults), 64 px views on gray):

| figure | measured | target (issue 13) |
|---|---|---|
{table}

Mean-of-ground-truth-grids baseline (what ignoring the input reaches): PSNR {bench["mean_grid_psnr"]:.2f} dB, mask
IoU {bench["mean_grid_mask_iou"]:.3f}.
{f"{chr(10)}Note: {note}{chr(10)}" if note else ""}"""


def ship(run: Path, data: Path, bench_json: Path, seconds: float, command: str, out: Path, note: str = "") -> Path:
    for need in (
        run / "config.yaml",
        run / "export" / "model_index.json",
        run / "logs" / "metrics.csv",
        data / "config.yaml",
        data / "manifest.jsonl",
        bench_json,
    ):
        if not need.is_file():
            raise FileNotFoundError(f"ship: {need} is missing")
    bench = json.loads(bench_json.read_text())
    with atomic_folder(out) as tmp:
        shutil.copy2(run / "config.yaml", tmp / "config.yaml")
        shutil.copytree(run / "export", tmp / "export")
        (tmp / "logs").mkdir()
        shutil.copy2(run / "logs" / "metrics.csv", tmp / "logs" / "metrics.csv")
        sheets = sorted((run / "media").glob("val_samples/step*.png"))
        if sheets:
            (tmp / "media" / "val_samples").mkdir(parents=True)
            shutil.copy2(sheets[-1], tmp / "media" / "val_samples" / sheets[-1].name)
        shutil.copy2(data / "config.yaml", tmp / RUN_DATA_CONFIG)
        (tmp / "MODEL_CARD.md").write_text(model_card(run, data, bench, seconds, command, note))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the training shards' folder (config.yaml, manifest)")
    ap.add_argument("--bench", type=Path, required=True, help="follow.json of benchmarks/bench_multiview_follow.py")
    ap.add_argument("--train-seconds", type=float, required=True)
    ap.add_argument("--command", required=True, help="the command that produced the run (for the model card)")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny/multiview"))
    ap.add_argument("--note", default="", help="a line for the model card (what else was done to the run)")
    args = ap.parse_args(argv)
    path = ship(args.run, args.data, args.bench, args.train_seconds, args.command, args.out, args.note)
    print(f"shipped {args.run} -> {path} (model card: {path / 'MODEL_CARD.md'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
