"""Export folders of the 3D stages: ``config.json`` (stage, format, step, model config) + ``model.safetensors``.

Both files are written under temporary names and renamed into place, so an interrupted export never leaves a
half-written file under the final name. Loading needs no training code: the config rebuilds the model and the
safetensors file holds its weights (frozen pretrained encoders excepted: they are re-read from their hub id / folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_FORMAT = 1

__all__ = ["CONFIG_NAME", "EXPORT_FORMAT", "WEIGHTS_NAME", "checkpoint_path", "read_export", "write_export"]


def write_export(
    folder: str | Path, stage: str, model_cfg: dict, state: dict[str, torch.Tensor], step: int | None
) -> Path:
    """Write ``state`` (tensors) and ``{"stage", "format", "step", "model": model_cfg}`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp_w = folder / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    save_file(tensors, str(tmp_w), metadata={"stage": stage, "format": str(EXPORT_FORMAT)})
    meta = {"stage": stage, "format": EXPORT_FORMAT, "step": step, "model": model_cfg}
    tmp_c = folder / f".{CONFIG_NAME}.tmp{os.getpid()}"
    tmp_c.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_w, folder / WEIGHTS_NAME)
    os.replace(tmp_c, folder / CONFIG_NAME)
    return folder


def read_export(folder: str | Path, stage: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state)`` of an export folder of ``stage``; clear errors for missing files or another stage."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{stage} export {folder} lacks {f.name}")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{config_file} is not valid JSON: {exn}") from exn
    if not isinstance(meta, dict) or meta.get("stage") != stage or "model" not in meta:
        got = meta.get("stage") if isinstance(meta, dict) else None
        raise ValueError(f"{config_file} is not a {stage}-stage export (stage={got!r})")
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file} has export format {meta.get('format')!r}; this code reads {EXPORT_FORMAT}")
    return meta, load_file(str(weights_file))


def checkpoint_path(run: str | Path) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file -> the checkpoint path (must exist)."""
    run = Path(run)
    path = run / "ckpts" / "last.ckpt" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run directory with ckpts/last.ckpt or a .ckpt file)")
    return path
