"""The coarse stage's network (METHOD.md, stage 2): condition encoders + dense 3D UNet + sampler, without training code.

``CoarseModel.from_pretrained(folder)`` loads an export (``config.json`` + ``model.safetensors``) and
``model.sample(views, cameras, cond_image, steps, generator)`` returns occupancy ``[B, 1, R, R, R]`` in {-1, +1}.
Frozen pretrained encoders (DINOv2, CLIP) are not stored in exports; their hub id / folder is in the config and they
are loaded from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from ..config import ConfigError, to_object
from .condition_volume import ConditionConfig, ConditionVolume, DenseConditionPyramid, camera_tensors
from .diffusion3d import DiffusionConfig, diffusion_loss, make_postprocess, sample
from .export_io import PretrainedMixin
from .image_features import GlobalEmbeddingConfig, build_global_encoder
from .unet3d import UNet3D, UNet3DConfig

__all__ = ["CoarseCondition", "CoarseModel", "CoarseModelConfig", "coarse_model_config", "shell_iou"]


# ----------------------------------------------------------------------------------------------------------- configs
@dataclass
class CoarseModelConfig:
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)  # unet.resolution is the occupancy grid side
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    global_embedding: GlobalEmbeddingConfig = field(default_factory=GlobalEmbeddingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def coarse_model_config(value) -> CoarseModelConfig:
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


class CoarseModel(PretrainedMixin, nn.Module):
    """Condition encoders + dense 3D UNet + sampler of the coarse stage."""

    export_stage = "coarse"
    checked_config = staticmethod(coarse_model_config)

    def __init__(self, cfg: CoarseModelConfig):
        super().__init__()
        self.cfg = cfg = coarse_model_config(cfg)
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


def shell_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU ``[B]`` of the occupied cells (> 0) of two occupancy grids ``[B, 1, R, R, R]``."""
    p, g = (pred > 0).flatten(1), (target > 0).flatten(1)
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
