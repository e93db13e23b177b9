"""Stage 2: coarse occupancy-shell diffusion as a training stage (METHOD.md, stage 2).

* :class:`CoarseStage` -- the LightningModule over :class:`VolumeDataModule` batches, around the network
  :class:`~one2345pp.models.coarse.CoarseModel` (built by :func:`build_model` from ``model`` and injected): the
  target is the occupancy shell ``occ`` in {-1, +1}; the condition is the ground-truth views, projected with cameras
  jittered on their viewing sphere (``train.perturb``); x0-prediction with self-conditioning and condition dropout;
  EMA weights (``ema.*``, :class:`~one2345pp.stages.base.Stage`) for validation and export; validation logs the
  loss, the coarse-shell IoU of samples against the ground truth and a PNG of central slices.
* :func:`train` (``one2345pp train --stage coarse``) and :func:`export` (a run or checkpoint -> export folder).

Frozen pretrained encoders (DINOv2, CLIP) are not stored in checkpoints or exports; their hub id / folder is in
the config and they are loaded from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import to_object
from ..data.config import LoaderConfig
from ..data.datamodule import VolumeDataModule
from ..models.coarse import CoarseModel, CoarseModelConfig, coarse_model_config, shell_iou
from ..models.condition_volume import perturb_cameras
from ..models.volume_targets import reduce_occupancy
from ..training.config import RunConfig, TrainerConfig
from ..training.media import log_image
from ..training.optim import OptimConfig
from ..training.runner import fit
from .base import EMAConfig, Stage, export_dir, export_from_checkpoint, read_stage_config

__all__ = [
    "CoarseConfig",
    "CoarseStage",
    "CoarseTrainConfig",
    "CoarseValConfig",
    "PerturbConfig",
    "build_model",
    "export",
    "load_stage_config",
    "run_training",
    "train",
]

log = logging.getLogger(__name__)

STAGE = "coarse"
MODEL_CONFIG_KEY = "coarse_model_config"  # checkpoint entry with the network's config


# ----------------------------------------------------------------------------------------------------------- configs
@dataclass
class PerturbConfig:
    """Jitter of the conditioning cameras in training (not published; METHOD.md only says "random perturbation")."""

    azimuth_deg: float = 4.0  # U(-a, a) per view
    elevation_deg: float = 3.0
    distance_frac: float = 0.04  # distance * (1 + U(-f, f))


@dataclass
class CoarseTrainConfig:
    perturb: PerturbConfig = field(default_factory=PerturbConfig)


@dataclass
class CoarseValConfig:
    sample_batches: int = 1  # validation batches that are also sampled (IoU, slice image)
    sample_steps: int = 50
    seed: int = 1234  # validation noise (loss and samples) is fixed, so curves are comparable


# keys of the 3D stages renamed to the names every stage uses; the old names are still read, with a warning
RENAMED_KEYS = {
    "train.ema_decay": "ema.decay",
    "train.val_seed": "val.seed",
    "train.val_sample_batches": "val.sample_batches",
    "train.val_sample_steps": "val.sample_steps",
}


@dataclass
class CoarseConfig:
    model: CoarseModelConfig = field(default_factory=CoarseModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: CoarseTrainConfig = field(default_factory=CoarseTrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    val: CoarseValConfig = field(default_factory=CoarseValConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def slice_image(pred: torch.Tensor, target: torch.Tensor, scale: int = 4) -> np.ndarray:
    """uint8 RGB image: central x / y / z slices of ``target`` (top row) and ``pred`` (bottom row), one sample."""
    rows = []
    for vol in (target, pred):
        v = (vol.detach().float().cpu().reshape(vol.shape[-3:]) > 0).numpy()
        r = v.shape[0] // 2
        tiles = [v[r, :, :], v[:, r, :], v[:, :, r]]  # planes x=r, y=r, z=r
        tiles = [np.rot90(t).astype(np.uint8) * 255 for t in tiles]  # second axis up
        sep = np.full((v.shape[1], 1), 128, np.uint8)
        rows.append(np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], axis=1))
    img = np.concatenate([rows[0], np.full((1, rows[0].shape[1]), 128, np.uint8), rows[1]], axis=0)
    img = np.kron(img, np.ones((scale, scale), np.uint8))
    return np.repeat(img[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------------------------------------- stage
def build_model(cfg: CoarseConfig) -> CoarseModel:
    """The network the stage trains, from the ``model`` config."""
    return CoarseModel(cfg.model)


class CoarseStage(Stage):
    """LightningModule of the coarse stage over :class:`VolumeDataModule` batches (see the module docstring)."""

    def __init__(self, cfg: CoarseConfig, model: CoarseModel | None = None):
        super().__init__(cfg)
        self.model = model if model is not None else build_model(cfg)
        self.track_ema(cfg.ema)
        self._val_ious: list[torch.Tensor] = []

    # ----------------------------------------------------------------------------------------------- helpers
    def _inputs(self, batch: dict, train: bool):
        for key in ("occ", "views", "views_c2w", "views_K", "cond"):
            if key not in batch:
                raise KeyError(f"coarse stage batch lacks {key!r} (use VolumeDataModule); has {sorted(batch)}")
        occ = batch["occ"]
        if occ.dim() != 5 or len(set(occ.shape[-3:])) != 1:
            raise ValueError(f"batch 'occ' must be [B, 1, R, R, R], got shape {tuple(occ.shape)}")
        occ = reduce_occupancy(occ, self.model.resolution)  # shards at a finer grid (tiny preset on 64^3 data)
        c2w = batch["views_c2w"]
        if train:
            p = self.cfg.train.perturb
            c2w = perturb_cameras(c2w, p.azimuth_deg, p.elevation_deg, p.distance_frac)
        return occ, batch["views"], c2w, batch["views_K"], batch["cond"]

    # ---------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        occ, views, c2w, k, cond_image = self._inputs(batch, train=True)
        cond = self.model.encode(views, c2w, k, cond_image)
        loss, info = self.model.loss(occ, cond)
        bs = occ.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/t_mean", info["t"].mean(), batch_size=bs)
        return loss

    # -------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_ious = []

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._val_ious:
            self.log("val/iou", torch.cat(self._val_ious).mean(), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        occ, views, c2w, k, cond_image = self._inputs(batch, train=False)
        v = self.cfg.val
        cond = self.model.encode(views, c2w, k, cond_image)
        gen = torch.Generator().manual_seed(v.seed + batch_idx)
        loss, _ = self.model.loss(occ, cond, generator=gen, cond_drop_prob=0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=occ.shape[0], sync_dist=True)
        if batch_idx < v.sample_batches:
            gen = torch.Generator().manual_seed(v.seed + 7919 * (batch_idx + 1))
            pred = self.model.sample(views, (c2w, k), cond_image, steps=v.sample_steps, generator=gen)
            self._val_ious.append(shell_iou(pred, occ))
            if batch_idx == 0 and self.trainer.is_global_zero:
                log_image(self.trainer, "val/slices", slice_image(pred[0], occ[0]))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODEL_CONFIG_KEY] = OmegaConf.to_container(OmegaConf.structured(self.cfg.model), resolve=True)


# ------------------------------------------------------------------------------------------------ train and export
def export(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file -> export folder (EMA weights); ``out``
    defaults to ``RUN/export`` (for a checkpoint file: the run directory above its ``ckpts/``)."""
    return export_from_checkpoint(run, out, CoarseModel, MODEL_CONFIG_KEY)


def load_stage_config(config_path=None, overrides=()) -> DictConfig:
    """The stage's config (old key names read with a warning), checked as ``train`` runs it."""
    cfg = read_stage_config(CoarseConfig, config_path, overrides, RENAMED_KEYS)
    coarse_model_config(to_object(cfg).model)
    return cfg


def run_training(cfg: DictConfig, callbacks=()):
    """Build module and data from a resolved config and fit (the end of training writes ``RUN/export``, the EMA
    weights); returns ``(trainer, run directory)``."""
    conf: CoarseConfig = to_object(cfg)
    # built by fit() after seeding with run.seed: the same initial weights on every rank and every rerun
    return fit(STAGE, cfg, lambda: CoarseStage(conf), VolumeDataModule(conf.data), callbacks)


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage coarse``: fit, then export the EMA weights to ``<run dir>/export``."""
    trainer, directory = run_training(load_stage_config(config_path, overrides))
    if trainer.is_global_zero:
        print(f"coarse stage: {trainer.global_step} steps; export in {export_dir(directory)}")
    return 0
