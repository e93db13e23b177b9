"""Stage 3: fine sparse SDF + colour diffusion (sparse 3D UNet conditioned on the six views; METHOD.md, stage 3).

* :class:`FineModel` -- the network and its sampler, independent of Lightning's training loop:
  ``FineModel.from_pretrained(folder)`` loads an export (``config.json`` + ``model.safetensors``);
  ``model.sample(views, cameras, cond_image, coarse_occ, steps, generator)`` returns a stride-1
  :class:`~one2345pp.sparse.SparseTensor` on the children of the occupied coarse cells with features
  ``[SDF / truncation, R, G, B]`` in [-1, 1]; ``model.meshes(out)`` extracts coloured meshes.
* :class:`FineStage` -- the LightningModule over :class:`VolumeDataModule` batches. Ground truth at the model's
  resolution (:mod:`one2345pp.models.volume_targets`: finer shards are reduced), support = children of the coarse
  shell cells with the shell threshold jittered per cell (``train.shell_jitter``, +-30%) in training and exact for
  validation; x0-prediction with self-conditioning and condition dropout; camera perturbation as in the coarse
  stage; EMA weights for validation and export.
* :func:`train` (``one2345pp train --stage fine``) and :func:`export` (a run or checkpoint -> export folder).

Conditioning: the pooled view features (:class:`ConditionVolume`, the same projection / shared MLP / masked max as the
coarse stage) at every support cell centre, a sparse 3D CNN giving one sparse condition volume per UNet level, the
global embedding of the input image added to the time embedding, and -- before the UNet's output head -- the RGB of
every view sampled at the cell centre's projection (``(rgb * 2 - 1, valid)`` per view, zero where the projection
leaves the image or lies behind the camera; occlusion is for the network to sort out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from omegaconf import OmegaConf
from torch import nn

from ..cameras import NUM_VIEWS
from ..config import ConfigError, load_config, to_object
from ..data.config import LoaderConfig
from ..models.condition_volume import (
    ConditionConfig,
    ConditionVolume,
    camera_tensors,
    perturb_cameras,
    sample_views_at,
)
from ..models.diffusion3d import DiffusionConfig, diffusion_loss, make_postprocess, sample
from ..models.export_io import checkpoint_path, read_export, write_export
from ..models.image_features import GlobalEmbeddingConfig, build_global_encoder, frozen_prefixes
from ..models.sparse_unet import SparseConditionPyramid, SparseUNet, SparseUNetConfig
from ..models.volume_targets import (
    children_coords,
    fine_targets,
    reduce_factor,
    reduce_fine,
    reduce_occupancy,
    training_support,
)
from ..sparse import SparseTensor
from ..training.ema import EMAWeights
from ..training.optim import OptimConfig, adamw_with_schedule
from ..training.runner import RunConfig, TrainerConfig, fit
from .coarse import PerturbConfig

__all__ = [
    "FineConfig",
    "FineModel",
    "FineModelConfig",
    "FineStage",
    "FineTrainConfig",
    "export",
    "projected_rgb",
    "support_from_occupancy",
    "train",
]

log = logging.getLogger(__name__)

STAGE = "fine"
RGB_FEATURES = 4  # per view: RGB in [-1, 1] and the validity of the projection


# ----------------------------------------------------------------------------------------------------------- configs
def _fine_diffusion() -> DiffusionConfig:
    return DiffusionConfig(sample_steps=20, postprocess="clamp")


def _fine_unet() -> SparseUNetConfig:
    return SparseUNetConfig()


def _fine_condition() -> ConditionConfig:
    return ConditionConfig(level_channels=[16, 32, 64, 64])


@dataclass
class FineModelConfig:
    unet: SparseUNetConfig = field(default_factory=_fine_unet)  # unet.resolution is the fine grid side (128)
    condition: ConditionConfig = field(default_factory=_fine_condition)  # level_channels: one per UNet level
    global_embedding: GlobalEmbeddingConfig = field(default_factory=GlobalEmbeddingConfig)
    diffusion: DiffusionConfig = field(default_factory=_fine_diffusion)
    coarse_factor: int = 2  # fine cells per coarse cell and axis: support = children of occupied 64^3 cells
    # SDF truncation in normalised units ([-0.5, 0.5]^3 frame): the target is clip(SDF / truncation, -1, 1).
    # LAS-Diffusion clips at 0.05 in a [-1, 1] frame = 0.025 here (3.2 fine voxels at 128^3).
    sdf_truncation: float = 0.025
    projected_rgb: bool = True  # pixel-wise projected RGB of the views before the output head


@dataclass
class FineTrainConfig:
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    shell_threshold: float = 1.0  # coarse voxels: the shell the support is built from (as the data's)
    shell_jitter: float = 0.3  # per-cell threshold factor 1 + U(-j, j) in training (METHOD.md: +-30%)
    # Training on crops (a choice for CPUs, not the method's): keep the support inside a random box of crop^3 coarse
    # cells centred on a random shell cell of each sample; 0 = the whole support (the full preset)
    crop: int = 0
    ema_decay: float = 0.9999
    val_sample_batches: int = 1  # validation batches that are also sampled (sign accuracy, colour error)
    val_sample_steps: int = 20
    val_seed: int = 1234


@dataclass
class FineConfig:
    model: FineModelConfig = field(default_factory=FineModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: FineTrainConfig = field(default_factory=FineTrainConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _model_config(value) -> FineModelConfig:
    """A plain dict / omegaconf node / dataclass -> a checked FineModelConfig (unknown keys are errors)."""
    cfg = (
        value
        if isinstance(value, FineModelConfig)
        else to_object(OmegaConf.merge(OmegaConf.structured(FineModelConfig), value))
    )
    levels = len(cfg.unet.channel_mults)
    if len(cfg.condition.level_channels) != levels:
        raise ConfigError(
            f"model.condition.level_channels has {len(cfg.condition.level_channels)} entries but the sparse UNet has "
            f"{levels} levels (model.unet.channel_mults)"
        )
    if cfg.coarse_factor < 1 or cfg.unet.resolution % cfg.coarse_factor:
        raise ConfigError(
            f"model.coarse_factor={cfg.coarse_factor} must be >= 1 and divide "
            f"model.unet.resolution={cfg.unet.resolution}"
        )
    if cfg.sdf_truncation <= 0:
        raise ConfigError(f"model.sdf_truncation must be > 0, got {cfg.sdf_truncation}")
    if cfg.unet.out_channels != 4 or cfg.unet.in_channels != 8:
        raise ConfigError("model.unet.in_channels / out_channels must be 8 / 4 (SDF + RGB, with self-condition)")
    return cfg


# ------------------------------------------------------------------------------------------------------- helpers
def cell_centres(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centres ``[N, 3]`` in the normalised frame of cells ``coords`` ``[N, 4]`` (batch first) of an ``R^3`` grid."""
    return -0.5 + (coords[:, 1:].float() + 0.5) / resolution


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


def support_from_occupancy(occ: torch.Tensor, factor: int) -> torch.Tensor:
    """Children ``[M, 4]`` (int32, batch first) of the occupied cells (> 0) of ``occ`` ``[B, 1, C, C, C]``."""
    parents = torch.nonzero(occ[:, 0] > 0)
    return children_coords(parents, factor).to(torch.int32)


def projected_rgb(
    points: torch.Tensor,
    batch_index: torch.Tensor,
    views: torch.Tensor,
    c2w: torch.Tensor,
    K: torch.Tensor,  # noqa: N803
) -> torch.Tensor:
    """Per view, the RGB of ``views`` ``[B, V, 3, H, W]`` (in [0, 1]) bilinearly sampled at the projection of each
    packed point ``[N, 3]``, mapped to [-1, 1], and the validity of that projection: ``[N, V * 4]``."""
    b, v = views.shape[:2]
    k = K if K.dim() == 4 else (K[:, None] if K.dim() == 3 else K[None, None]).expand(b, v, 3, 3)
    out = points.new_zeros(points.shape[0], v * RGB_FEATURES)
    for i in range(b):
        rows = (batch_index == i).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        vals, valid, _ = sample_views_at(points[rows][None], views[i : i + 1].float(), c2w[i : i + 1], k[i : i + 1])
        rgb = (vals[0] * 2 - 1) * valid[0, ..., None]  # [V, n, 3]
        feats = torch.cat([rgb, valid[0, ..., None].to(rgb.dtype)], dim=-1)  # [V, n, 4]
        out[rows] = feats.permute(1, 0, 2).reshape(len(rows), -1).to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------------------------- model
@dataclass
class FineCondition:
    """Per-run condition: sparse condition volumes per level, global embedding ``[B, D]``, head features ``[N, E]``,
    the stride-1 support tensor (its cache holds the kernel maps reused at every step) and the batch size."""

    volumes: list[SparseTensor]
    global_emb: torch.Tensor
    extra: torch.Tensor | None
    support: SparseTensor
    batch_size: int


class FineModel(nn.Module):
    """Condition encoders + sparse UNet + sampler of the fine stage."""

    def __init__(self, cfg: FineModelConfig):
        super().__init__()
        self.cfg = cfg = _model_config(cfg)
        be = cfg.unet.backend
        self.condition = ConditionVolume(cfg.condition)
        self.pyramid = SparseConditionPyramid(self.condition.out_channels, list(cfg.condition.level_channels), be)
        self.global_encoder = build_global_encoder(cfg.global_embedding)
        extra = NUM_VIEWS * RGB_FEATURES if cfg.projected_rgb else 0
        self.unet = SparseUNet(cfg.unet, list(cfg.condition.level_channels), self.global_encoder.out_dim, extra)
        make_postprocess(cfg.diffusion)

    @property
    def resolution(self) -> int:
        return self.cfg.unet.resolution

    @property
    def coarse_resolution(self) -> int:
        return self.cfg.unet.resolution // self.cfg.coarse_factor

    def encode(self, views, c2w, K, cond_image, coords: torch.Tensor, batch_size: int) -> FineCondition:  # noqa: N803
        """Views ``[B, V, 3, H, W]`` (cameras ``c2w`` ``[B, V, 4, 4]``, ``K``), input image ``[B, 3, h, w]`` and the
        support ``coords`` int ``[N, 4]`` (batch first, fine grid) -> :class:`FineCondition`."""
        if views.shape[1] != NUM_VIEWS:
            raise ValueError(f"the fine stage is conditioned on {NUM_VIEWS} views, got {views.shape[1]}")
        bi = coords[:, 0].long()
        points = cell_centres(coords, self.resolution)
        vf = self.condition.encode_views(views)
        feats = self.condition.features_at(points, vf, c2w, K, batch_index=bi)
        support = SparseTensor(coords, feats, batch_size=batch_size)
        volumes = self.pyramid(support)
        extra = projected_rgb(points, bi, views, c2w, K) if self.cfg.projected_rgb else None
        return FineCondition(volumes, self.global_encoder(cond_image), extra, support, batch_size)

    def denoise(self, x_t, t, self_cond, drop, cond: FineCondition) -> torch.Tensor:
        """x0 estimate ``[N, 4]``; samples with ``drop`` True see no condition (zero volumes, embedding, RGB)."""
        keep_s = (~drop).to(x_t.dtype)
        keep = cond.support.broadcast(keep_s)[:, None]
        volumes = [v.replace(v.feats * v.broadcast(keep_s)[:, None].to(v.dtype)) for v in cond.volumes]
        global_emb = cond.global_emb * keep_s.to(cond.global_emb.dtype)[:, None]
        extra = cond.extra * keep.to(cond.extra.dtype) if cond.extra is not None else None
        x = cond.support.replace(torch.cat([x_t, self_cond], dim=1))
        return self.unet(x, t, volumes, global_emb, extra).feats

    def denoiser(self, cond: FineCondition):
        def fn(x_t, t, self_cond, drop):
            return self.denoise(x_t, t, self_cond, drop, cond)

        return fn

    def loss(self, x0: torch.Tensor, cond: FineCondition, generator=None, cond_drop_prob: float | None = None):
        d = self.cfg.diffusion
        return diffusion_loss(
            self.denoiser(cond),
            x0,
            batch_size=cond.batch_size,
            batch_index=cond.support.batch_indices,
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
        coarse_occ: torch.Tensor | None = None,
        support: torch.Tensor | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
    ) -> SparseTensor:
        """SDF + colour on the support: ``[SDF / truncation, R, G, B]`` in [-1, 1], stride-1 SparseTensor.

        The support is the children of the occupied cells of ``coarse_occ`` ``[B, 1, C, C, C]`` (C = the model's
        coarse resolution; a coarse-stage sample) or given as ``support`` int ``[N, 4]`` (batch first). ``views``,
        ``cameras`` and ``cond_image`` as in :meth:`CoarseModel.sample`; the same generator seed gives the same
        output.
        """
        device = next(self.parameters()).device
        views = views[None] if views.dim() == 4 else views
        cond_image = cond_image[None] if cond_image.dim() == 3 else cond_image
        c2w, k = camera_tensors(cameras, device=device)
        b = views.shape[0]
        if (coarse_occ is None) == (support is None):
            raise ValueError("give exactly one of coarse_occ and support")
        if coarse_occ is not None:
            c = self.coarse_resolution
            if coarse_occ.dim() == 4:
                coarse_occ = coarse_occ[None]
            if tuple(coarse_occ.shape[1:]) != (1, c, c, c):
                raise ValueError(f"coarse_occ must be [B, 1, {c}, {c}, {c}], got {tuple(coarse_occ.shape)}")
            support = support_from_occupancy(coarse_occ.to(device), self.cfg.coarse_factor)
        support = support.to(device=device, dtype=torch.int32)
        if c2w.shape[0] != b or cond_image.shape[0] != b:
            raise ValueError(
                f"batch sizes disagree: views {b}, cameras {c2w.shape[0]}, cond_image {cond_image.shape[0]}"
            )
        if support.numel() == 0:
            raise ValueError("the fine stage got an empty support (no occupied coarse cell)")
        cond = self.encode(views.to(device), c2w, k, cond_image.to(device), support, b)
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((support.shape[0], 4), generator=generator, device=gen_device).to(device)
        d = self.cfg.diffusion
        x0 = sample(
            self.denoiser(cond),
            noise,
            batch_size=b,
            steps=d.sample_steps if steps is None else steps,
            generator=generator,
            guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            postprocess=make_postprocess(d),
            batch_index=support[:, 0].long(),
        )
        return SparseTensor(support, x0, batch_size=b)

    def meshes(self, out: SparseTensor, extraction=None) -> list:
        """Coloured meshes (normalised frame) of a :meth:`sample` output (:func:`geometry.extraction.extract_meshes`
        at this model's resolution; SDF in truncation units, so empty cells are +-1)."""
        from ..geometry.extraction import ExtractionConfig, extract_meshes

        cfg = extraction or ExtractionConfig(resolution=self.resolution, truncation=1.0)
        if cfg.resolution != self.resolution or cfg.truncation != 1.0:
            raise ValueError(
                f"extraction must run at resolution {self.resolution} with truncation 1 (SDF units of "
                f"the output), got {cfg.resolution} / {cfg.truncation}"
            )
        return extract_meshes(out, cfg)

    # ------------------------------------------------------------------------------------------------ export/load
    def frozen_prefixes(self) -> list[str]:
        return frozen_prefixes(self)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        frozen = self.frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not any(k.startswith(p) for p in frozen)}

    def save_pretrained(self, folder: str | Path, step: int | None = None) -> Path:
        return _write_export(folder, self.cfg, self.trainable_state_dict(), step)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> FineModel:
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


def _write_export(folder, model_cfg: FineModelConfig, state: dict[str, torch.Tensor], step: int | None) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True)
    return write_export(folder, STAGE, cfg, state, step)


# ------------------------------------------------------------------------------------------------------------- stage
class FineStage(LightningModule):
    """LightningModule of the fine stage over :class:`VolumeDataModule` batches (see the module docstring)."""

    def __init__(self, cfg: FineConfig):
        super().__init__()
        self.cfg = cfg
        self.model = FineModel(cfg.model)
        self.ema = EMAWeights(self.model, cfg.train.ema_decay)
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
        self._val_stats = []

    def on_validation_epoch_end(self) -> None:
        ctx, self._ema_ctx = self._ema_ctx, None
        ctx.__exit__(None, None, None)
        if self._val_stats:
            stats = torch.stack(self._val_stats).mean(0)
            self.log("val/sign_acc", stats[0], sync_dist=True)
            self.log("val/rgb_l1", stats[1], sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        t = self.cfg.train
        support, x0 = self.targets(batch, 0.0)
        b = batch["occ"].shape[0]
        views, c2w, k, cond_image = batch["views"], self._cameras(batch, False), batch["views_K"], batch["cond"]
        cond = self.model.encode(views, c2w, k, cond_image, support, b)
        gen = torch.Generator().manual_seed(t.val_seed + batch_idx)
        loss, _ = self.model.loss(x0, cond, generator=gen, cond_drop_prob=0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        if batch_idx < t.val_sample_batches:
            gen = torch.Generator().manual_seed(t.val_seed + 7919 * (batch_idx + 1))
            out = self.model.sample(
                views, (c2w, k), cond_image, support=support, steps=t.val_sample_steps, generator=gen
            )
            near = x0[:, 0].abs() < 0.999  # cells inside the truncation band
            right = (out.feats[:, 0] > 0) == (x0[:, 0] > 0)
            sign = right[near].float().mean() if near.any() else right.float().mean()
            rgb = (out.feats[:, 1:] - x0[:, 1:]).abs().mean()
            self._val_stats.append(torch.stack([sign, rgb]))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = [f"model.{p}" for p in self.model.frozen_prefixes()]
        state = checkpoint["state_dict"]
        for key in [k for k in state if any(k.startswith(p) for p in frozen)]:
            del state[key]
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["fine_model_config"] = OmegaConf.to_container(OmegaConf.structured(self.cfg.model), resolve=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        frozen = [f"model.{p}" for p in self.model.frozen_prefixes()]
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if any(key.startswith(p) for p in frozen):
                state[key] = value
        if "ema" not in checkpoint:
            raise KeyError("checkpoint has no 'ema' state (not written by the fine stage?)")
        self.ema.load_state_dict(checkpoint["ema"])

    def export_pretrained(self, folder: str | Path) -> Path:
        """Write the EMA weights as an export folder (what :meth:`FineModel.from_pretrained` reads)."""
        with self.ema.applied(self.model):
            return self.model.save_pretrained(folder, step=int(self.global_step))


# ------------------------------------------------------------------------------------------------ train and export
def export(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file -> export folder (EMA weights); ``out``
    defaults to ``RUN/export``."""
    ckpt_path = checkpoint_path(run)
    if out is None:
        out = (Path(run) if Path(run).is_dir() else ckpt_path.parent.parent) / "export"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "fine_model_config" not in ckpt or "ema" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a fine-stage checkpoint (no model config / EMA state)")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for name, value in ckpt["ema"]["shadow"].items():
        if name not in state:
            raise KeyError(f"{ckpt_path}: EMA parameter {name!r} is not in the model state")
        state[name] = value
    return _write_export(out, _model_config(ckpt["fine_model_config"]), state, int(ckpt.get("global_step", 0)))


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage fine``: fit, then export the EMA weights to ``<run dir>/export``."""
    from ..data.datamodule import VolumeDataModule

    cfg = load_config(FineConfig, config_path, overrides)
    conf: FineConfig = to_object(cfg)
    _model_config(conf.model)
    datamodule = VolumeDataModule(conf.data)
    # built by fit() after seeding with run.seed: the same initial weights on every rank and every rerun
    trainer, directory = fit(STAGE, cfg, lambda: FineStage(conf), datamodule)
    if trainer.is_global_zero:
        out = trainer.lightning_module.export_pretrained(directory / "export")
        print(f"fine stage: {trainer.global_step} steps; export in {out}")
    return 0
