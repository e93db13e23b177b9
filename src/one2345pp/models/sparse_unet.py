"""Sparse 3D UNet of the fine stage (METHOD.md, stage 3) on :mod:`one2345pp.sparse`.

The input lives on the fine support (children of occupied coarse cells at 128^3 in the full preset). Levels go down
by stride-2 sparse convolutions (one site per occupied parent cell) and back up by the matching transposed
convolutions; skips are concatenated. Every residual block takes the time embedding (plus the global condition, as
in :mod:`.unet3d`) as a per-sample scale and shift, and the sparse condition volume of its level concatenated to its
input (:class:`SparseConditionPyramid`, built on the same coordinates so the strided levels coincide). The output
head concatenates per-site extra features -- the pixel-wise projected RGB of the views -- before its last layers:
GroupNorm-SiLU, concat, submanifold 3x3x3 conv, GroupNorm-SiLU, linear to the output channels (SDF + RGB).

Choices (not published): widths ``base * mults`` per level, ``num_res_blocks`` blocks per level on the way down and
one more on the way up, no attention (the sparse levels are large), an extra middle block at the coarsest level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..sparse import (
    Activation,
    SparseGroupNorm,
    SparseLinear,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    cat,
)
from .unet3d import timestep_embedding

__all__ = ["SparseConditionPyramid", "SparseResBlock", "SparseUNet", "SparseUNetConfig"]


@dataclass
class SparseUNetConfig:
    resolution: int = 128  # fine grid side; must be divisible by 2^(levels - 1)
    in_channels: int = 8  # x_t (SDF + RGB) + self-condition
    out_channels: int = 4  # SDF + RGB
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # 128 -> 64 -> 32 -> 16
    num_res_blocks: int = 1
    dropout: float = 0.0
    backend: str = "auto"  # sparse convolution backend: auto | torch | torchsparse (env ONE2345PP_SPARSE_BACKEND wins)


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


def _norm_act(c: int) -> nn.Sequential:
    return nn.Sequential(SparseGroupNorm(_groups(c), c), Activation("silu"))


class SparseResBlock(nn.Module):
    """GroupNorm-SiLU-subm conv twice, per-sample scale/shift from the embedding in between, residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, backend: str):
        super().__init__()
        self.act1 = _norm_act(c_in)
        self.conv1 = SubmanifoldConv3d(c_in, c_out, backend=backend)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = SparseGroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SubmanifoldConv3d(c_out, c_out, backend=backend)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = SparseLinear(c_in, c_out) if c_in != c_out else None

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        h = self.conv1(self.act1(x))
        scale, shift = x.broadcast(self.emb(nn.functional.silu(emb))).chunk(2, dim=1)
        h = self.norm2(h)
        h = h.replace(nn.functional.silu(h.feats * (1 + scale.to(h.dtype)) + shift.to(h.dtype)))
        h = self.conv2(h.apply(self.dropout))
        return (self.skip(x) if self.skip is not None else x) + h


class _ConvBlock(nn.Module):
    """Optional stride-2 conv, then subm conv - GroupNorm - SiLU."""

    def __init__(self, c_in: int, c_out: int, down: bool, backend: str):
        super().__init__()
        self.down = StridedConv3d(c_in, c_out, backend=backend) if down else None
        c = c_out if down else c_in
        self.conv = SubmanifoldConv3d(c, c_out, backend=backend)
        self.act = _norm_act(c_out)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.down is not None:
            x = self.down(x)
        return self.act(self.conv(x))


class SparseConditionPyramid(nn.Module):
    """Sparse 3D CNN: pooled view features on the support (stride 1) -> one sparse volume per UNet level, level ``l``
    at stride ``2^l`` with ``level_channels[l]`` channels (same coordinates and order as the UNet's level)."""

    def __init__(self, in_channels: int, level_channels: list[int], backend: str = "auto"):
        super().__init__()
        if not level_channels:
            raise ValueError("condition.level_channels must list one width per UNet level")
        self.levels = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(level_channels):
            self.levels.append(_ConvBlock(c_prev, c, down=i > 0, backend=backend))
            c_prev = c
        self.out_channels = list(level_channels)

    def forward(self, x: SparseTensor) -> list[SparseTensor]:
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out


class SparseUNet(nn.Module):
    """``forward(x, t [B], cond [per level] | None, global_emb [B, D] | None, extra [N, E] | None) -> SparseTensor``
    with ``out_channels`` features on ``x``'s sites (same order). ``x``: stride-1 :class:`SparseTensor` with
    ``in_channels`` features; ``extra``: per-site features concatenated before the output head (``extra_channels``)."""

    def __init__(
        self,
        cfg: SparseUNetConfig,
        cond_channels: list[int] | None = None,
        global_dim: int = 0,
        extra_channels: int = 0,
    ):
        super().__init__()
        levels = len(cfg.channel_mults)
        if levels < 1:
            raise ValueError("unet.channel_mults needs at least one level")
        if cfg.resolution % (2 ** (levels - 1)):
            raise ValueError(f"unet.resolution={cfg.resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        cond = list(cond_channels) if cond_channels is not None else [0] * levels
        if len(cond) != levels:
            raise ValueError(f"{len(cond)} condition volumes for {levels} UNet levels (channel_mults)")
        self.cfg, self.cond_channels, self.extra_channels = cfg, cond, int(extra_channels)
        be = cfg.backend
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.global_embed = nn.Linear(global_dim, emb_dim) if global_dim > 0 else None
        self.conv_in = SubmanifoldConv3d(cfg.in_channels, widths[0], backend=be)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(SparseResBlock(c + cond[i], w, emb_dim, cfg.dropout, be))
                c = w
            self.down.append(nn.ModuleList(blocks))
            if i < levels - 1:
                self.downsample.append(StridedConv3d(c, widths[i + 1], backend=be))
                c = widths[i + 1]
        self.mid = SparseResBlock(c, c, emb_dim, cfg.dropout, be)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            w = widths[i]
            if i < levels - 1:
                self.upsample.append(TransposedConv3d(c, w, backend=be))
                c = w
            blocks = []
            for j in range(cfg.num_res_blocks + 1):
                c_in = c + (w if j == 0 else 0)  # the skip of this level joins the first block
                blocks.append(SparseResBlock(c_in, w, emb_dim, cfg.dropout, be))
                c = w
            self.up.append(nn.ModuleList(blocks))
        self.head_act = _norm_act(c)
        self.head_conv = SubmanifoldConv3d(c + self.extra_channels, c, backend=be)
        self.head_act2 = _norm_act(c)
        self.head_out = SparseLinear(c, cfg.out_channels)
        self.levels = levels

    def _embed(self, t: torch.Tensor, global_emb: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(self.conv_in.weight.dtype))
        if self.global_embed is not None:
            if global_emb is None:
                raise ValueError("this UNet was built with a global condition; pass global_emb")
            emb = emb + self.global_embed(global_emb.to(emb.dtype))
        return emb

    def forward(
        self,
        x: SparseTensor,
        t: torch.Tensor,
        cond: list[SparseTensor] | None = None,
        global_emb: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> SparseTensor:
        if x.stride != 1 or x.num_channels != self.cfg.in_channels:
            raise ValueError(f"SparseUNet expects a stride-1 tensor with {self.cfg.in_channels} channels, got {x!r}")
        if any(self.cond_channels) and cond is None:
            raise ValueError("this UNet was built with condition volumes; pass cond")
        if cond is not None:
            for i, v in enumerate(cond):
                if v.num_channels != self.cond_channels[i] or v.stride != 2**i:
                    raise ValueError(
                        f"condition volume {i} has {v.num_channels} channels at stride {v.stride}, "
                        f"expected {self.cond_channels[i]} at stride {2**i}"
                    )
        if self.extra_channels and (extra is None or extra.shape != (x.num_points, self.extra_channels)):
            got = None if extra is None else tuple(extra.shape)
            raise ValueError(f"extra head features must be [{x.num_points}, {self.extra_channels}], got {got}")
        emb = self._embed(t, global_emb)
        h = self.conv_in(x)
        skips = []
        for i, blocks in enumerate(self.down):
            if cond is not None:
                h = cat([h, cond[i].replace(cond[i].feats.to(h.dtype))])
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, blocks in enumerate(self.up):
            i = self.levels - 1 - j
            if i < self.levels - 1:
                h = self.upsample[j - 1](h, like=skips[i])
            h = cat([h, skips[i]])
            for block in blocks:
                h = block(h, emb)
        h = self.head_act(h)
        if self.extra_channels:
            h = h.replace(torch.cat([h.feats, extra.to(h.dtype)], dim=1))
        return self.head_out(self.head_act2(self.head_conv(h)))
