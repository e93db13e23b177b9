"""2D encoders of the 3D stages' conditions: per-view feature maps and the input image's global embedding.

* Per-view feature maps (``ImageFeatureConfig.kind``): ``dinov2`` -- a frozen pretrained DINOv2 through
  ``transformers`` (hub id or local folder, METHOD.md stage 2), patch tokens reshaped to a map; ``cnn`` -- a small
  trainable CNN (tiny preset) at half the view resolution.
* Global embedding of the input image (``GlobalEmbeddingConfig.kind``): ``clip`` -- a frozen
  ``CLIPVisionModelWithProjection`` (its ``image_embeds``; default ViT-H/14, 1024-d, the encoder of the multi-view
  stage); ``cnn`` -- a small trainable CNN pooled to a vector (tiny preset).

All encoders take RGB images ``[N, 3, H, W]`` in [0, 1] (composited on the background, as the data modules return
them) and normalise them themselves. A feature map always covers the whole image, so a continuous pixel position
``(u, v)`` of the image maps to the same normalised ``grid_sample`` position whatever the map's size.

Frozen encoders set ``frozen = True``; they stay in eval mode, take no gradients, and their weights are not part of
exported checkpoints (they are re-read from their hub id / folder, which the exported config records).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CNNBackbone",
    "CNNGlobalEncoder",
    "CLIPGlobalEncoder",
    "DinoBackbone",
    "GlobalEmbeddingConfig",
    "ImageFeatureConfig",
    "build_backbone",
    "build_global_encoder",
    "frozen_prefixes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's input normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageFeatureConfig:
    kind: str = "dinov2"  # "dinov2" (frozen, full preset) or "cnn" (trainable, tiny preset)
    dinov2: str = "facebook/dinov2-base"  # hub id or local folder of a transformers Dinov2Model
    dinov2_image_size: int = 448  # views are resized to this (a multiple of the patch size): 32 x 32 patch map
    cnn_channels: list[int] = field(default_factory=lambda: [32, 32])  # conv widths; the map is at 1/2 resolution


@dataclass
class GlobalEmbeddingConfig:
    kind: str = "clip"  # "clip" (frozen CLIPVisionModelWithProjection) or "cnn" (trainable, tiny preset)
    clip: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # hub id or local folder
    clip_image_size: int = 224
    cnn_channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # stride-2 conv widths, then pooled
    cnn_dim: int = 64  # embedding size of the cnn encoder


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = images.new_tensor(mean).view(1, 3, 1, 1)
    s = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - m) / s


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W], got shape {tuple(images.shape)}")


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _Frozen(nn.Module):
    """A pretrained encoder that never trains: eval mode, no gradients."""

    frozen = True

    def train(self, mode: bool = True):  # noqa: ARG002 - always eval
        return super().train(False)


class CNNBackbone(nn.Module):
    """Small trainable CNN: a stride-1 stem, one stride-2 conv, then stride-1 convs; map at half resolution."""

    frozen = False

    def __init__(self, channels: list[int]):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"image_features.cnn_channels needs at least two widths (stem, stride 2), got {channels}")
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i == 1 else 1, padding=1), nn.GroupNorm(_groups(c), c)]
            layers.append(nn.SiLU())
            c_in = c
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.net(images * 2.0 - 1.0)


class DinoBackbone(_Frozen):
    """Frozen DINOv2 (``transformers.Dinov2Model``): patch tokens as a feature map ``[N, hidden, S/p, S/p]``."""

    def __init__(self, path: str, image_size: int):
        super().__init__()
        from transformers import Dinov2Model

        try:
            self.model = Dinov2Model.from_pretrained(path)
        except OSError as exn:
            raise OSError(f"cannot load DINOv2 from {path!r} (image_features.dinov2): {exn}") from exn
        self.model.requires_grad_(False)
        self.model.eval()
        patch = int(self.model.config.patch_size)
        if image_size % patch:
            raise ValueError(f"image_features.dinov2_image_size={image_size} is not a multiple of the patch {patch}")
        self.image_size, self.patch = image_size, patch
        self.out_channels = int(self.model.config.hidden_size)
        self.extra_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)  # CLS (+ registers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        s = self.image_size
        x = F.interpolate(images.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = _normalise(x, IMAGENET_MEAN, IMAGENET_STD).to(next(self.model.parameters()).dtype)
        tokens = self.model(pixel_values=x).last_hidden_state[:, self.extra_tokens :]
        g = s // self.patch
        return tokens.transpose(1, 2).reshape(images.shape[0], self.out_channels, g, g)


class CNNGlobalEncoder(nn.Module):
    """Small trainable CNN: stride-2 convs, global average pooling, a linear layer -> ``[N, cnn_dim]``."""

    frozen = False

    def __init__(self, channels: list[int], dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)
        self.out_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.proj(self.net(images * 2.0 - 1.0).mean(dim=(2, 3)))


class CLIPGlobalEncoder(_Frozen):
    """Frozen ``CLIPVisionModelWithProjection``: the projected image embedding ``[N, projection_dim]``."""

    def __init__(self, path: str, image_size: int):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(path)
        except OSError as exn:
            raise OSError(f"cannot load CLIP from {path!r} (global_embedding.clip): {exn}") from exn
        self.model.requires_grad_(False)
        self.model.eval()
        self.image_size = image_size
        self.out_dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        s = self.image_size
        x = F.interpolate(images.float(), size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        x = _normalise(x.clamp(0.0, 1.0), CLIP_MEAN, CLIP_STD).to(next(self.model.parameters()).dtype)
        return self.model(pixel_values=x).image_embeds


def build_backbone(cfg: ImageFeatureConfig) -> nn.Module:
    """Per-view feature extractor with ``out_channels``: ``[N, 3, H, W]`` -> ``[N, C, h, w]``."""
    if cfg.kind == "dinov2":
        return DinoBackbone(cfg.dinov2, cfg.dinov2_image_size)
    if cfg.kind == "cnn":
        return CNNBackbone(list(cfg.cnn_channels))
    raise ValueError(f"image_features.kind must be 'dinov2' or 'cnn', got {cfg.kind!r}")


def build_global_encoder(cfg: GlobalEmbeddingConfig) -> nn.Module:
    """Input-image encoder with ``out_dim``: ``[N, 3, H, W]`` -> ``[N, D]``."""
    if cfg.kind == "clip":
        return CLIPGlobalEncoder(cfg.clip, cfg.clip_image_size)
    if cfg.kind == "cnn":
        return CNNGlobalEncoder(list(cfg.cnn_channels), cfg.cnn_dim)
    raise ValueError(f"global_embedding.kind must be 'clip' or 'cnn', got {cfg.kind!r}")


def frozen_prefixes(module: nn.Module) -> list[str]:
    """State-dict prefixes (``"a.b."``) of the frozen pretrained encoders inside ``module``."""
    out = []
    for name, m in module.named_modules():
        if getattr(m, "frozen", False) and not any(name.startswith(p) for p in out):
            out.append(f"{name}." if name else "")
    return out
