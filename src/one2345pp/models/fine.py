"""The fine stage's network (METHOD.md, stage 3): sparse SDF + colour diffusion, without training code.

``FineModel.from_pretrained(folder)`` loads an export (``config.json`` + ``model.safetensors``);
``model.sample(views, cameras, cond_image, coarse_occ, steps, generator)`` returns a stride-1
:class:`~one2345pp.sparse.SparseTensor` on the children of the occupied coarse cells with features
``[SDF / truncation, R, G, B]`` in [-1, 1]; ``model.meshes(out)`` extracts coloured meshes.

Conditioning: the pooled view features (:class:`ConditionVolume`, the same projection / shared MLP / masked max as the
coarse stage) at every support cell centre, a sparse 3D CNN giving one sparse condition volume per UNet level, the
global embedding of the input image added to the time embedding, and -- before the UNet's output head -- the RGB of
every view sampled at the cell centre's projection (``(rgb * 2 - 1, valid)`` per view, zero where the projection
leaves the image or lies behind the camera; occlusion is for the network to sort out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from ..cameras import NUM_VIEWS
from ..config import ConfigError, to_object
from ..geometry.extraction import ExtractionConfig, extract_meshes
from ..sparse import SparseTensor
from .condition_volume import ConditionConfig, ConditionVolume, camera_tensors, sample_views_at
from .diffusion3d import DiffusionConfig, diffusion_loss, make_postprocess, sample
from .export_io import PretrainedMixin
from .image_features import GlobalEmbeddingConfig, build_global_encoder
from .sparse_unet import SparseConditionPyramid, SparseUNet, SparseUNetConfig
from .volume_targets import children_coords

__all__ = [
    "FineCondition",
    "FineModel",
    "FineModelConfig",
    "cell_centres",
    "fine_model_config",
    "projected_rgb",
    "support_from_occupancy",
]

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


def fine_model_config(value) -> FineModelConfig:
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


class FineModel(PretrainedMixin, nn.Module):
    """Condition encoders + sparse UNet + sampler of the fine stage."""

    export_stage = "fine"
    checked_config = staticmethod(fine_model_config)

    def __init__(self, cfg: FineModelConfig):
        super().__init__()
        self.cfg = cfg = fine_model_config(cfg)
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
        cfg = extraction or ExtractionConfig(resolution=self.resolution, truncation=1.0)
        if cfg.resolution != self.resolution or cfg.truncation != 1.0:
            raise ValueError(
                f"extraction must run at resolution {self.resolution} with truncation 1 (SDF units of "
                f"the output), got {cfg.resolution} / {cfg.truncation}"
            )
        return extract_meshes(out, cfg)
