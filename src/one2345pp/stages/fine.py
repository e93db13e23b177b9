"""Stage 3: fine sparse SDF + colour diffusion as a training stage (METHOD.md, stage 3).

* :class:`FineStage` -- the LightningModule over :class:`VolumeDataModule` batches, around the network
  :class:`~one2345pp.models.fine.FineModel` (built by :func:`build_model` from ``model`` and injected). Ground truth
  at the model's resolution (:mod:`one2345pp.models.volume_targets`: finer shards are reduced), support = children
  of the coarse shell cells with the shell threshold jittered per cell (``train.shell_jitter``, +-30%) in training
  and exact for validation; x0-prediction with self-conditioning and condition dropout; camera perturbation as in
  the coarse stage; EMA weights (``ema.*``) for validation and export.
* :func:`train` (``one2345pp train --stage fine``) and :func:`export` (a run or checkpoint -> export folder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import to_object
from ..data.config import LoaderConfig
from ..data.datamodule import VolumeDataModule
from ..models.condition_volume import perturb_cameras
from ..models.fine import (
    FineModel,
    FineModelConfig,
    fine_model_config,
)
from ..models.volume_targets import fine_targets, reduce_factor, reduce_fine, reduce_occupancy, training_support
from ..training.config import RunConfig, TrainerConfig
from ..training.optim import OptimConfig
from ..training.runner import fit
from .base import EMAConfig, Stage, export_dir, export_from_checkpoint, read_stage_config
from .coarse import RENAMED_KEYS, CoarseValConfig, PerturbConfig

__all__ = [
    "FineConfig",
    "FineStage",
    "FineTrainConfig",
    "FineValConfig",
    "build_model",
    "crop_occupancy",
    "export",
    "load_stage_config",
    "run_training",
    "train",
]

log = logging.getLogger(__name__)

STAGE = "fine"
MODEL_CONFIG_KEY = "fine_model_config"  # checkpoint entry with the network's config


# ----------------------------------------------------------------------------------------------------------- configs
@dataclass
class FineTrainConfig:
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    shell_threshold: float = 1.0  # coarse voxels: the shell the support is built from (as the data's)
    shell_jitter: float = 0.3  # per-cell threshold factor 1 + U(-j, j) in training (METHOD.md: +-30%)
    # Training on crops (a choice for CPUs, not the method's): keep the support inside a random box of crop^3 coarse
    # cells centred on a random shell cell of each sample; 0 = the whole support (the full preset)
    crop: int = 0


@dataclass
class FineValConfig(CoarseValConfig):
    """``sample_batches``: validation batches that are also sampled (sign accuracy, colour error)."""

    sample_steps: int = 20


@dataclass
class FineConfig:
    model: FineModelConfig = field(default_factory=FineModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: FineTrainConfig = field(default_factory=FineTrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    val: FineValConfig = field(default_factory=FineValConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ------------------------------------------------------------------------------------------------------- helpers
def crop_occupancy(occ: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Occupancy ``[B, 1, C, C, C]`` with every cell outside a box of ``size^3`` cells set to -1; the box of each
    sample is centred on one of its occupied cells drawn at random (kept inside the grid)."""
    out = torch.full_like(occ, -1.0)
    c = occ.shape[-1]
    size = min(size, c)
    for i in range(occ.shape[0]):
        cells = torch.nonzero(occ[i, 0] > 0)
        if len(cells) == 0:
            continue
        pick = int(torch.randint(len(cells), (1,), generator=generator))
        lo = (cells[pick] - size // 2).clamp(0, c - size).tolist()
        box = (i, 0, *(slice(a, a + size) for a in lo))
        out[box] = occ[box]
    return out


# ------------------------------------------------------------------------------------------------------------- stage
def build_model(cfg: FineConfig) -> FineModel:
    """The network the stage trains, from the ``model`` config."""
    return FineModel(cfg.model)


class FineStage(Stage):
    """LightningModule of the fine stage over :class:`VolumeDataModule` batches (see the module docstring)."""

    def __init__(self, cfg: FineConfig, model: FineModel | None = None):
        super().__init__(cfg)
        self.model = model if model is not None else build_model(cfg)
        self.track_ema(cfg.ema)
        self._val_stats: list[torch.Tensor] = []

    def targets(self, batch: dict, jitter: float, generator: torch.Generator | None = None, crop: int = 0):
        """Ground truth at the model's resolution -> ``(support [N, 4], x0 [N, 4])`` (see the module docstring);
        ``crop`` > 0 keeps a random box of ``crop^3`` coarse cells per sample."""
        for key in ("occ", "fine_coords", "fine_sdf", "fine_rgb", "views", "views_c2w", "views_K", "cond", "meta"):
            if key not in batch:
                raise KeyError(f"fine stage batch lacks {key!r} (use VolumeDataModule); has {sorted(batch)}")
        m = self.model
        occ = reduce_occupancy(batch["occ"], m.coarse_resolution)
        data_fine = {int(meta.get("fine_resolution", batch["occ"].shape[-1] * 2)) for meta in batch["meta"]}
        if len(data_fine) != 1:
            raise ValueError(f"samples of one batch come from shards of different fine resolutions: {data_fine}")
        factor = reduce_factor(data_fine.pop(), m.resolution, "fine cells (fine.npz)")
        coords, sdf, rgb = reduce_fine(batch["fine_coords"], batch["fine_sdf"], batch["fine_rgb"], factor)
        if crop > 0:
            occ = crop_occupancy(occ, crop, generator)
        t = self.cfg.train
        support, s, col = training_support(
            occ, coords, sdf, rgb, m.cfg.coarse_factor, t.shell_threshold, jitter, generator
        )
        return support, fine_targets(s, col, m.cfg.sdf_truncation)

    def _cameras(self, batch: dict, train: bool) -> torch.Tensor:
        c2w = batch["views_c2w"]
        if train:
            p = self.cfg.train.perturb
            c2w = perturb_cameras(c2w, p.azimuth_deg, p.elevation_deg, p.distance_frac)
        return c2w

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        support, x0 = self.targets(batch, self.cfg.train.shell_jitter, crop=self.cfg.train.crop)
        b = batch["occ"].shape[0]
        cond = self.model.encode(
            batch["views"], self._cameras(batch, True), batch["views_K"], batch["cond"], support, b
        )
        loss, info = self.model.loss(x0, cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/support", float(support.shape[0]) / b, batch_size=b)
        return loss

    # -------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_stats = []

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._val_stats:
            stats = torch.stack(self._val_stats).mean(0)
            self.log("val/sign_acc", stats[0], sync_dist=True)
            self.log("val/rgb_l1", stats[1], sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        v = self.cfg.val
        support, x0 = self.targets(batch, 0.0)
        b = batch["occ"].shape[0]
        views, c2w, k, cond_image = batch["views"], self._cameras(batch, False), batch["views_K"], batch["cond"]
        cond = self.model.encode(views, c2w, k, cond_image, support, b)
        gen = torch.Generator().manual_seed(v.seed + batch_idx)
        loss, _ = self.model.loss(x0, cond, generator=gen, cond_drop_prob=0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        if batch_idx < v.sample_batches:
            gen = torch.Generator().manual_seed(v.seed + 7919 * (batch_idx + 1))
            out = self.model.sample(views, (c2w, k), cond_image, support=support, steps=v.sample_steps, generator=gen)
            near = x0[:, 0].abs() < 0.999  # cells inside the truncation band
            right = (out.feats[:, 0] > 0) == (x0[:, 0] > 0)
            sign = right[near].float().mean() if near.any() else right.float().mean()
            rgb = (out.feats[:, 1:] - x0[:, 1:]).abs().mean()
            self._val_stats.append(torch.stack([sign, rgb]))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODEL_CONFIG_KEY] = OmegaConf.to_container(OmegaConf.structured(self.cfg.model), resolve=True)


# ------------------------------------------------------------------------------------------------ train and export
def export(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file -> export folder (EMA weights); ``out``
    defaults to ``RUN/export``."""
    return export_from_checkpoint(run, out, FineModel, MODEL_CONFIG_KEY)


def load_stage_config(config_path=None, overrides=()) -> DictConfig:
    """The stage's config (old key names read with a warning), checked as ``train`` runs it."""
    cfg = read_stage_config(FineConfig, config_path, overrides, RENAMED_KEYS)
    fine_model_config(to_object(cfg).model)
    return cfg


def run_training(cfg: DictConfig, callbacks=()):
    """Build module and data from a resolved config and fit (the end of training writes ``RUN/export``, the EMA
    weights); returns ``(trainer, run directory)``."""
    conf: FineConfig = to_object(cfg)
    # built by fit() after seeding with run.seed: the same initial weights on every rank and every rerun
    return fit(STAGE, cfg, lambda: FineStage(conf), VolumeDataModule(conf.data), callbacks)


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage fine``: fit, then export the EMA weights to ``<run dir>/export``."""
    trainer, directory = run_training(load_stage_config(config_path, overrides))
    if trainer.is_global_zero:
        print(f"fine stage: {trainer.global_step} steps; export in {export_dir(directory)}")
    return 0
