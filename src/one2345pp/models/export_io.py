"""Export folders of the 3D stages: ``config.json`` (stage, format, step, model config) + ``model.safetensors``.

Both files are written under temporary names and moved into place together, ``config.json`` (the file that marks
an export folder) last, so an interrupted export never leaves a half-written file under the final name. Loading
needs no training code: the config rebuilds the model and the safetensors file holds its weights (frozen pretrained
encoders excepted: they are re-read from their hub id / folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ..utils.atomic import atomic_files
from ..utils.run_layout import last_checkpoint
from .image_features import frozen_prefixes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_FORMAT = 1

__all__ = [
    "CONFIG_NAME",
    "EXPORT_FORMAT",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "checkpoint_path",
    "read_export",
    "write_export",
]


def write_export(
    folder: str | Path, stage: str, model_cfg: dict, state: dict[str, torch.Tensor], step: int | None
) -> Path:
    """Write ``state`` (tensors) and ``{"stage", "format", "step", "model": model_cfg}`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"stage": stage, "format": EXPORT_FORMAT, "step": step, "model": model_cfg}
    with atomic_files(folder, last=CONFIG_NAME) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"stage": stage, "format": str(EXPORT_FORMAT)})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))  # no final newline: exports stay byte-identical
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
    path = last_checkpoint(run) if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run directory with ckpts/last.ckpt or a .ckpt file)")
    return path


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` of a 3D-stage network (an ``nn.Module`` with ``self.cfg``).

    A subclass sets ``export_stage`` (the ``stage`` recorded in ``config.json``) and ``checked_config`` (a plain dict /
    omegaconf node / dataclass -> its checked model config). Frozen pretrained encoders are left out of the weights
    and re-read from their hub id / folder when the config rebuilds the model.
    """

    export_stage: str
    checked_config: Callable[[Any], Any]  # set by the subclass: staticmethod(<its config checker>)

    def frozen_prefixes(self) -> list[str]:
        return frozen_prefixes(self)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen pretrained encoders (what checkpoints and exports store)."""
        frozen = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not any(k.startswith(p) for p in frozen)}

    def save_pretrained(self, folder: str | Path, step: int | None = None) -> Path:
        return self.write_pretrained(folder, self.cfg, self.trainable_state_dict(), step)

    @classmethod
    def write_pretrained(cls, folder, model_cfg, state: dict[str, torch.Tensor], step: int | None) -> Path:
        """Write an export folder from a model config and weights (also used on a checkpoint's EMA weights)."""
        cfg = OmegaConf.to_container(OmegaConf.structured(cls.checked_config(model_cfg)), resolve=True)
        return write_export(folder, cls.export_stage, cfg, state, step)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu"):
        """Load an export folder (``config.json`` + ``model.safetensors``); frozen encoders come from their ids."""
        meta, state = read_export(folder, cls.export_stage)
        model = cls(cls.checked_config(meta["model"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        frozen = model.frozen_prefixes()
        missing = [k for k in missing if not any(k.startswith(p) for p in frozen)]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()
