"""Dense 3D UNet of the coarse stage (METHOD.md, stage 2).

Full preset: five levels 64 -> 32 -> 16 -> 8 -> 4, base width 32, multipliers (1, 2, 4, 8, 8), self-attention at
8^3 and 4^3. Every residual block takes the time embedding (sinusoidal features of ``t`` in [0, 1] through an MLP;
the global condition -- the input image's embedding -- is added to it, a choice: METHOD.md leaves FiLM or addition
open) and the condition volume of its level concatenated to its input (``cond_channels[l]`` channels at the
level's resolution; see :class:`condition_volume.DenseConditionPyramid`). Input: ``x_t`` and the self-condition
(2 channels); output: the x0 estimate (1 channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet3D", "UNet3DConfig", "timestep_embedding"]


@dataclass
class UNet3DConfig:
    resolution: int = 64  # input grid side; must be divisible by 2^(levels - 1)
    in_channels: int = 2  # x_t + self-condition
    out_channels: int = 1
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 8])  # one per level
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: list[int] = field(default_factory=lambda: [8, 4])  # grid sides with self-attention
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0
    # channels-last (NDHWC) activations and conv weights: on CPU the 3D convolutions' backward runs ~2x faster
    # (oneDNN); on GPUs measure before switching it on (the full preset keeps the default layout there)
    channels_last: bool = False


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of continuous ``t`` ``[B]`` (scaled by 1000 so t in [0, 1] spans the usual range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0), c)


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between (scale-free shift), residual 1x1 if needed."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv3d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv3d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention3D(nn.Module):
    """Multi-head self-attention over all voxels of a (small) grid, residual."""

    def __init__(self, c: int, head_channels: int):
        super().__init__()
        self.heads = max(1, c // head_channels)
        self.norm = _norm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *sp = x.shape
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # [B, L, C]
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # backend (flash / memory-efficient / math) picked at run time
        h = self.out(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, *sp)


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock3D], attn: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class UNet3D(nn.Module):
    """``forward(x [B, in, R, R, R], t [B], cond_volumes [per level], global_emb [B, emb] | None) -> [B, out, R^3]``.

    ``cond_channels`` lists the channels of the condition volume concatenated at each level (0: none).
    ``global_dim`` > 0 adds a linear map of the global condition to the time embedding.
    """

    def __init__(self, cfg: UNet3DConfig, cond_channels: list[int] | None = None, global_dim: int = 0):
        super().__init__()
        levels = len(cfg.channel_mults)
        if levels < 1:
            raise ValueError("unet.channel_mults needs at least one level")
        if cfg.resolution % (2 ** (levels - 1)):
            raise ValueError(f"unet.resolution={cfg.resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        cond = list(cond_channels) if cond_channels is not None else [0] * levels
        if len(cond) != levels:
            raise ValueError(f"{len(cond)} condition volumes for {levels} UNet levels (channel_mults)")
        self.cfg, self.cond_channels = cfg, cond
        self.resolutions = [cfg.resolution // 2**i for i in range(levels)]
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.global_embed = nn.Linear(global_dim, emb_dim) if global_dim > 0 else None
        self.conv_in = nn.Conv3d(cfg.in_channels, widths[0], 3, padding=1)

        def attn(level: int, c: int) -> nn.Module:
            return Attention3D(c, cfg.head_channels) if self.resolutions[level] in cfg.attention_resolutions else None

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips = [widths[0]]
        c = widths[0]
        for i, w in enumerate(widths):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3D(c + cond[i], w, emb_dim, cfg.dropout))
                c = w
                a = attn(i, c)
                attns.append(a if a is not None else nn.Identity())
                skips.append(c)
            self.down.append(_Level(blocks, attns))
            if i < levels - 1:
                self.downsample.append(nn.Conv3d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock3D(c + cond[-1], c, emb_dim, cfg.dropout)
        self.mid_attn = Attention3D(c, cfg.head_channels)
        self.mid2 = ResBlock3D(c, c, emb_dim, cfg.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            w = widths[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock3D(c + skips.pop() + cond[i], w, emb_dim, cfg.dropout))
                c = w
                a = attn(i, c)
                attns.append(a if a is not None else nn.Identity())
            self.up.append(_Level(blocks, attns))
            if i > 0:
                self.upsample.append(nn.Conv3d(c, c, 3, padding=1))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv3d(c, cfg.out_channels, 3, padding=1)
        self.memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def _embed(self, t: torch.Tensor, global_emb: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(self.conv_in.weight.dtype))
        if self.global_embed is not None:
            if global_emb is None:
                raise ValueError("this UNet was built with a global condition; pass global_emb")
            emb = emb + self.global_embed(global_emb.to(emb.dtype))
        return emb

    @staticmethod
    def _cat(h: torch.Tensor, cond: list[torch.Tensor] | None, level: int) -> torch.Tensor:
        if cond is None or cond[level] is None:
            return h
        return torch.cat([h, cond[level].to(h.dtype)], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond_volumes: list[torch.Tensor] | None = None,
        global_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r = self.cfg.resolution
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels or tuple(x.shape[2:]) != (r, r, r):
            raise ValueError(f"UNet3D expects [B, {self.cfg.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        if any(self.cond_channels) and cond_volumes is None:
            raise ValueError("this UNet was built with condition volumes; pass cond_volumes")
        if cond_volumes is not None:
            for i, (v, res) in enumerate(zip(cond_volumes, self.resolutions, strict=True)):
                if v.shape[1] != self.cond_channels[i] or tuple(v.shape[2:]) != (res, res, res):
                    raise ValueError(
                        f"condition volume {i} has shape {tuple(v.shape)}, expected "
                        f"[B, {self.cond_channels[i]}, {res}, {res}, {res}]"
                    )
        emb = self._embed(t, global_emb)
        fmt = self.memory_format
        if cond_volumes is not None:
            cond_volumes = [v.contiguous(memory_format=fmt) for v in cond_volumes]
        h = self.conv_in(x.contiguous(memory_format=fmt))
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(self._cat(h, cond_volumes, i), emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(self._cat(h, cond_volumes, len(self.down) - 1), emb)), emb)
        for j, level in enumerate(self.up):
            i = len(self.up) - 1 - j
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(self._cat(torch.cat([h, skips.pop()], dim=1), cond_volumes, i), emb))
            if i > 0:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
