"""Where a training run keeps its checkpoints: ``RUN/ckpts/``, and ``RUN/ckpts/last.ckpt`` the latest state.

Training writes this layout, and resume, the exports and the pipeline builder read it; they all name the paths
through here so that none of them can drift from what the trainer writes.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINT_DIR", "LAST_CHECKPOINT", "checkpoint_dir", "last_checkpoint", "run_of_checkpoint"]

CHECKPOINT_DIR = "ckpts"
LAST_CHECKPOINT = "last.ckpt"


def checkpoint_dir(run: str | Path) -> Path:
    return Path(run) / CHECKPOINT_DIR


def last_checkpoint(run: str | Path) -> Path:
    """``RUN/ckpts/last.ckpt``, whether or not it exists yet."""
    return checkpoint_dir(run) / LAST_CHECKPOINT


def run_of_checkpoint(ckpt: str | Path) -> Path:
    """The run directory of a checkpoint file: ``RUN`` for ``RUN/ckpts/X.ckpt``, else the file's own folder."""
    parent = Path(ckpt).parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent
