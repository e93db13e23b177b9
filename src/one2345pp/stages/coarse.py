"""Stage 2: coarse occupancy-shell diffusion (dense 3D UNet conditioned on the six views; METHOD.md, stage 2).

* :class:`CoarseModel` -- the network and its sampler, independent of Lightning's training loop:
  ``CoarseModel.from_pretrained(folder)`` loads an export (``config.json`` + ``model.safetensors``) and
  ``model.sample(views, cameras, cond_image, steps, generator)`` returns occupancy ``[B, 1, R, R, R]`` in {-1, +1}.
* :class:`CoarseStage` -- the LightningModule over :class:`VolumeDataModule` batches: the target is the occupancy
  shell ``occ`` in {-1, +1}; the condition is the ground-truth views, projected with cameras jittered on their
  viewing sphere (``train.perturb``); x0-prediction with self-conditioning and condition dropout; EMA weights
  (a dict of tensors saved in the checkpoint, used for validation and export); validation logs the loss, the
  coarse-shell IoU of samples against the ground truth and a PNG of central slices.
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
from lightning.pytorch import LightningModule
from omegaconf import OmegaConf
from torch import nn

from ..config import ConfigError, load_config, to_object
from ..data.config import LoaderConfig
from ..models.condition_volume import (
    ConditionConfig,
    ConditionVolume,
    DenseConditionPyramid,
    camera_tensors,
    perturb_cameras,
)
from ..models.diffusion3d import DiffusionConfig, diffusion_loss, make_postprocess, sample
from ..models.export_io import checkpoint_path, read_export, write_export
from ..models.image_features import GlobalEmbeddingConfig, build_global_encoder, frozen_prefixes
from ..models.unet3d import UNet3D, UNet3DConfig
from ..models.volume_targets import reduce_occupancy
from ..training.ema import EMAWeights
from ..training.optim import OptimConfig, adamw_with_schedule
from ..training.runner import RunConfig, TrainerConfig, fit

__all__ = [
    "CoarseConfig",
    "CoarseModel",
    "CoarseModelConfig",
    "CoarseStage",
    "CoarseTrainConfig",
    "EMAWeights",
    "OptimConfig",
    "PerturbConfig",
    "export",
    "shell_iou",
    "train",
]

log = logging.getLogger(__name__)

STAGE = "coarse"


# ----------------------------------------------------------------------------------------------------------- configs
@dataclass
class CoarseModelConfig:
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)  # unet.resolution is the occupancy grid side
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    global_embedding: GlobalEmbeddingConfig = field(default_factory=GlobalEmbeddingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


@dataclass
class PerturbConfig:
    """Jitter of the conditioning cameras in training (not published; METHOD.md only says "random perturbation")."""

    azimuth_deg: float = 4.0  # U(-a, a) per view
    elevation_deg: float = 3.0
    distance_frac: float = 0.04  # distance * (1 + U(-f, f))


@dataclass
class CoarseTrainConfig:
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    ema_decay: float = 0.9999  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    val_sample_batches: int = 1  # validation batches that are also sampled (IoU, slice image)
    val_sample_steps: int = 50
    val_seed: int = 1234  # validation noise (loss and samples) is fixed, so curves are comparable


@dataclass
class CoarseConfig:
    model: CoarseModelConfig = field(default_factory=CoarseModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: CoarseTrainConfig = field(default_factory=CoarseTrainConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _model_config(value) -> CoarseModelConfig:
    """A plain dict / omegaconf node / dataclass -> a checked CoarseModelConfig (unknown keys are errors)."""
    if isinstance(value, CoarseModelConfig):
        cfg = value
    else:
        cfg = to_object(OmegaConf.merge(OmegaConf.structured(CoarseModelConfig), value))
    levels = len(cfg.unet.channel_mults)
    if len(cfg.condition.level_channels) != levels:
        raise ConfigError(
            f"model.condition.level_channels has {len(cfg.condition.level_channels)} entries but the UNet has "
            f"{levels} levels (model.unet.channel_mults)"
        )
    return cfg


# ------------------------------------------------------------------------------------------------------------- model
@dataclass
class CoarseCondition:
    """What the denoiser is conditioned on: one volume per UNet level and the global embedding ``[B, D]``."""

    volumes: list[torch.Tensor]
    global_emb: torch.Tensor


class CoarseModel(nn.Module):
    """Condition encoders + dense 3D UNet + sampler of the coarse stage."""

    def __init__(self, cfg: CoarseModelConfig):
        super().__init__()
        self.cfg = cfg = _model_config(cfg)
        self.condition = ConditionVolume(cfg.condition)
        self.pyramid = DenseConditionPyramid(self.condition.out_channels, list(cfg.condition.level_channels))
        self.global_encoder = build_global_encoder(cfg.global_embedding)
        self.unet = UNet3D(cfg.unet, list(cfg.condition.level_channels), self.global_encoder.out_dim)
        self.pyramid.to(memory_format=self.unet.memory_format)
        make_postprocess(cfg.diffusion)  # fail early on a bad postprocess name

    @property
    def resolution(self) -> int:
        return self.cfg.unet.resolution

    def encode(self, views: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, cond_image: torch.Tensor):  # noqa: N803
        """Views ``[B, V, 3, H, W]`` (cameras ``c2w`` ``[B, V, 4, 4]``, ``K``) and the input image ``[B, 3, h, w]``
        -> :class:`CoarseCondition` (computed once per training step / sampling run)."""
        vf = self.condition.encode_views(views)
        volume = self.condition.dense(vf, c2w, K, self.resolution).contiguous(memory_format=self.unet.memory_format)
        return CoarseCondition(self.pyramid(volume), self.global_encoder(cond_image))

    def denoise(
        self, x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor, drop: torch.Tensor, cond: CoarseCondition
    ) -> torch.Tensor:
        """x0 estimate; samples with ``drop`` True see zero condition volumes and a zero global embedding."""
        keep = (~drop).to(x_t.dtype)
        volumes = [v * keep.to(v.dtype).view(-1, 1, 1, 1, 1) for v in cond.volumes]
        global_emb = cond.global_emb * keep.to(cond.global_emb.dtype).view(-1, 1)
        return self.unet(torch.cat([x_t, self_cond], dim=1), t, volumes, global_emb)

    def denoiser(self, cond: CoarseCondition):
        """The ``denoise(x_t, t, self_cond, drop)`` callable of :mod:`diffusion3d` for one condition."""

        def fn(x_t, t, self_cond, drop):
            return self.denoise(x_t, t, self_cond, drop, cond)

        return fn

    def loss(
        self,
        occ: torch.Tensor,
        cond: CoarseCondition,
        generator: torch.Generator | None = None,
        cond_drop_prob: float | None = None,
    ) -> tuple[torch.Tensor, dict]:
        d = self.cfg.diffusion
        return diffusion_loss(
            self.denoiser(cond),
            occ,
            self_cond_prob=d.self_cond_prob,
            cond_drop_prob=d.cond_drop_prob if cond_drop_prob is None else cond_drop_prob,
            generator=generator,
        )

    @torch.no_grad()
    def sample(
        self,
        views: torch.Tensor,
        cameras,
        cond_image: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Occupancy ``[B, 1, R, R, R]`` in {-1, +1} (indexed [x, y, z]) conditioned on six views.

        ``views`` ``[B, V, 3, H, W]`` or ``[V, 3, H, W]`` in [0, 1] on the data's background; ``cameras`` a
        ``(c2w, K)`` pair of tensors (``[B, V, 4, 4]``, ``[B, 3, 3]`` / ``[B, V, 3, 3]``; unbatched accepted) or
        ``cameras.Camera`` objects (V, or B lists of V); ``cond_image`` ``[B, 3, h, w]`` or ``[3, h, w]``.
        ``steps`` / ``guidance_scale`` default to ``model.diffusion``. The same generator seed gives the same
        samples (initial and ancestral noise are drawn from ``generator``).
        """
        device = next(self.parameters()).device
        views = views[None] if views.dim() == 4 else views
        cond_image = cond_image[None] if cond_image.dim() == 3 else cond_image
        c2w, k = camera_tensors(cameras, device=device)
        b = views.shape[0]
        if c2w.shape[0] != b or cond_image.shape[0] != b:
            raise ValueError(
                f"batch sizes disagree: views {b}, cameras {c2w.shape[0]}, cond_image {cond_image.shape[0]}"
            )
        cond = self.encode(views.to(device), c2w, k, cond_image.to(device))
        r = self.resolution
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((b, 1, r, r, r), generator=generator, device=gen_device).to(device)
        d = self.cfg.diffusion
        return sample(
            self.denoiser(cond),
            noise,
            steps=d.sample_steps if steps is None else steps,
            generator=generator,
            guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            postprocess=make_postprocess(d),
        )

    # ------------------------------------------------------------------------------------------------ export/load
    def frozen_prefixes(self) -> list[str]:
        return frozen_prefixes(self)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen pretrained encoders (what checkpoints and exports store)."""
        frozen = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not any(k.startswith(p) for p in frozen)}

    def save_pretrained(self, folder: str | Path, step: int | None = None) -> Path:
        return _write_export(folder, self.cfg, self.trainable_state_dict(), step)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> CoarseModel:
        """Load an export folder (``config.json`` + ``model.safetensors``); frozen encoders come from their ids."""
        meta, state = read_export(folder, STAGE)
        model = cls(_model_config(meta["model"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        frozen = model.frozen_prefixes()
        missing = [k for k in missing if not any(k.startswith(p) for p in frozen)]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()


def _write_export(folder, model_cfg: CoarseModelConfig, state: dict[str, torch.Tensor], step: int | None) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True)
    return write_export(folder, STAGE, cfg, state, step)


def shell_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU ``[B]`` of the occupied cells (> 0) of two occupancy grids ``[B, 1, R, R, R]``."""
    p, g = (pred > 0).flatten(1), (target > 0).flatten(1)
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


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
class CoarseStage(LightningModule):
    """LightningModule of the coarse stage over :class:`VolumeDataModule` batches (see the module docstring)."""

    def __init__(self, cfg: CoarseConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CoarseModel(cfg.model)
        self.ema = EMAWeights(self.model, cfg.train.ema_decay)
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

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.ema.update(self.model)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return adamw_with_schedule(params, self.cfg.optim, max(1, int(self.cfg.trainer.max_steps)))

    # -------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._ema_ctx = self.ema.applied(self.model)
        self._ema_ctx.__enter__()
        self._val_ious = []

    def on_validation_epoch_end(self) -> None:
        ctx, self._ema_ctx = self._ema_ctx, None
        ctx.__exit__(None, None, None)
        if self._val_ious:
            self.log("val/iou", torch.cat(self._val_ious).mean(), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        occ, views, c2w, k, cond_image = self._inputs(batch, train=False)
        t = self.cfg.train
        cond = self.model.encode(views, c2w, k, cond_image)
        gen = torch.Generator().manual_seed(t.val_seed + batch_idx)
        loss, _ = self.model.loss(occ, cond, generator=gen, cond_drop_prob=0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=occ.shape[0], sync_dist=True)
        if batch_idx < t.val_sample_batches:
            gen = torch.Generator().manual_seed(t.val_seed + 7919 * (batch_idx + 1))
            pred = self.model.sample(views, (c2w, k), cond_image, steps=t.val_sample_steps, generator=gen)
            self._val_ious.append(shell_iou(pred, occ))
            if batch_idx == 0 and self.trainer.is_global_zero:
                self._log_slices(pred[0], occ[0])

    def _log_slices(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        from ..training.media import log_image

        log_image(self.trainer, "val/slices", slice_image(pred, target))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = [f"model.{p}" for p in self.model.frozen_prefixes()]
        state = checkpoint["state_dict"]
        for key in [k for k in state if any(k.startswith(p) for p in frozen)]:
            del state[key]
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["coarse_model_config"] = OmegaConf.to_container(OmegaConf.structured(self.cfg.model), resolve=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = [f"model.{p}" for p in self.model.frozen_prefixes()]
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():  # frozen encoders are not stored: keep the loaded ones
            if any(key.startswith(p) for p in frozen):
                state[key] = value
        if "ema" not in checkpoint:
            raise KeyError("checkpoint has no 'ema' state (not written by the coarse stage?)")
        self.ema.load_state_dict(checkpoint["ema"])

    def export_pretrained(self, folder: str | Path) -> Path:
        """Write the EMA weights as an export folder (what :meth:`CoarseModel.from_pretrained` reads)."""
        with self.ema.applied(self.model):
            return self.model.save_pretrained(folder, step=int(self.global_step))


# ------------------------------------------------------------------------------------------------ train and export
def export(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file -> export folder (EMA weights); ``out``
    defaults to ``RUN/export`` (for a checkpoint file: the run directory above its ``ckpts/``)."""
    ckpt_path = checkpoint_path(run)
    if out is None:
        out = (Path(run) if Path(run).is_dir() else ckpt_path.parent.parent) / "export"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "coarse_model_config" not in ckpt or "ema" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a coarse-stage checkpoint (no model config / EMA state)")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for name, value in ckpt["ema"]["shadow"].items():
        if name not in state:
            raise KeyError(f"{ckpt_path}: EMA parameter {name!r} is not in the model state")
        state[name] = value
    return _write_export(out, _model_config(ckpt["coarse_model_config"]), state, int(ckpt.get("global_step", 0)))


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage coarse``: fit, then export the EMA weights to ``<run dir>/export``."""
    from ..data.datamodule import VolumeDataModule

    cfg = load_config(CoarseConfig, config_path, overrides)
    conf: CoarseConfig = to_object(cfg)
    _model_config(conf.model)
    datamodule = VolumeDataModule(conf.data)
    # built by fit() after seeding with run.seed: the same initial weights on every rank and every rerun
    trainer, directory = fit("coarse", cfg, lambda: CoarseStage(conf), datamodule)
    if trainer.is_global_zero:
        out = trainer.lightning_module.export_pretrained(directory / "export")
        print(f"coarse stage: {trainer.global_step} steps; export in {out}")
    return 0
