"""A TensoRF vector-matrix (VM) colour field over the volume cube [-0.5, 0.5]^3, with a small MLP decoder to RGB.

The feature of a point ``p`` is, for each of the three axis splits (plane xy x line z, plane xz x line y,
plane yz x line x), the product of ``components`` bilinearly sampled plane channels with the matching line channels;
the ``3 * components`` products go through a linear basis (TensoRF's ``basis_mat``) to ``feature_dim`` numbers and an
MLP to RGB through a sigmoid. With ``view_dependent`` the MLP also sees the unit viewing direction (the direction of
the ray, from the camera to the surface) with ``view_frequencies`` sin/cos octaves, as TensoRF's appearance decoder
does; baking then uses the surface normal as the view direction (:mod:`one2345pp.texture.bake`).

Grids use the cell convention of :mod:`one2345pp.cameras`: texel ``i`` of a resolution-``R`` axis has its centre at
``-0.5 + (i + 0.5) / R``; points outside the cube take the border values. The decoder's output layer starts at
zero, so a new field is a flat gray (0.5) everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ColorField", "ColorFieldConfig", "check_config", "encode_directions"]

# (plane axis for grid x, plane axis for grid y, line axis) of the three VM splits
VM_SPLITS = ((0, 1, 2), (0, 2, 1), (1, 2, 0))


@dataclass
class ColorFieldConfig:
    resolution: int = 128  # plane and line resolution over the cube [-0.5, 0.5]^3
    components: int = 12  # plane/line component pairs per split (x 3 splits)
    feature_dim: int = 27  # output of the linear basis (TensoRF's app_dim)
    hidden: int = 64  # width of the decoder MLP
    layers: int = 2  # hidden layers of the decoder MLP
    view_dependent: bool = False  # feed the viewing direction to the decoder
    view_frequencies: int = 2  # sin/cos octaves of the viewing direction (when view_dependent)
    init_std: float = 0.1  # plane/line initialisation: N(0, init_std^2) (TensoRF uses 0.1)


def check_config(cfg: ColorFieldConfig) -> None:
    for key in ("resolution", "components", "feature_dim", "hidden"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"field.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.layers < 0 or cfg.view_frequencies < 0 or cfg.init_std < 0:
        raise ValueError(
            f"field.layers, field.view_frequencies and field.init_std must be >= 0, got {cfg.layers}, "
            f"{cfg.view_frequencies}, {cfg.init_std}"
        )


def encode_directions(d: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Unit directions [N, 3] -> [N, 3 + 6 * frequencies] (the direction, then sin/cos of 2^k pi d)."""
    out = [d]
    for k in range(frequencies):
        out += [torch.sin((2.0**k) * torch.pi * d), torch.cos((2.0**k) * torch.pi * d)]
    return torch.cat(out, dim=-1)


class ColorField(nn.Module):
    """``field(points [N, 3], directions [N, 3] | None) -> rgb [N, 3]`` in [0, 1]."""

    def __init__(self, cfg: ColorFieldConfig | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else ColorFieldConfig()
        check_config(cfg)
        r, c = cfg.resolution, cfg.components

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=generator) * cfg.init_std)

        self.planes = nn.ParameterList([param(1, c, r, r) for _ in VM_SPLITS])
        self.lines = nn.ParameterList([param(1, c, r, 1) for _ in VM_SPLITS])
        self.basis = nn.Linear(3 * c, cfg.feature_dim, bias=False)
        dims = cfg.feature_dim + (3 + 6 * cfg.view_frequencies if cfg.view_dependent else 0)
        mlp: list[nn.Module] = []
        for _ in range(cfg.layers):
            mlp += [nn.Linear(dims, cfg.hidden), nn.ReLU(inplace=True)]
            dims = cfg.hidden
        self.head = nn.Linear(dims, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.mlp = nn.Sequential(*mlp, self.head)

    # --- parameter groups (the optimiser gives grids and decoder their own learning rates) ----------------------
    def grid_parameters(self) -> list[nn.Parameter]:
        return [*self.planes, *self.lines]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.basis.parameters(), *self.mlp.parameters()]

    # --- evaluation -----------------------------------------------------------------------------------------------
    def features(self, points: torch.Tensor) -> torch.Tensor:
        """VM features [N, 3 * components] of points [N, 3] in the cube."""
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape [N, 3], got {tuple(points.shape)}")
        g = (points * 2.0).to(self.planes[0].dtype)  # cube -> grid_sample's [-1, 1] (align_corners=False)
        n = g.shape[0]
        feats = []
        for (a, b, c), plane, line in zip(VM_SPLITS, self.planes, self.lines):
            pg = torch.stack([g[:, a], g[:, b]], dim=-1).view(1, n, 1, 2)
            lg = torch.stack([torch.zeros_like(g[:, c]), g[:, c]], dim=-1).view(1, n, 1, 2)
            pf = F.grid_sample(plane, pg, mode="bilinear", padding_mode="border", align_corners=False)
            lf = F.grid_sample(line, lg, mode="bilinear", padding_mode="border", align_corners=False)
            feats.append((pf * lf).view(-1, n))
        return torch.cat(feats, dim=0).t()

    def forward(self, points: torch.Tensor, directions: torch.Tensor | None = None) -> torch.Tensor:
        h = self.basis(self.features(points))
        if self.cfg.view_dependent:
            if directions is None:
                raise ValueError("this colour field is view dependent: pass unit viewing directions [N, 3]")
            h = torch.cat([h, encode_directions(directions.to(h.dtype), self.cfg.view_frequencies)], dim=-1)
        return torch.sigmoid(self.mlp(h).float())

    @torch.no_grad()
    def query(self, points: torch.Tensor, directions: torch.Tensor | None = None, chunk: int = 1 << 18) -> torch.Tensor:
        """Colours of many points without gradients, ``chunk`` points at a time."""
        out = []
        for s in range(0, points.shape[0], chunk):
            d = directions[s : s + chunk] if directions is not None else None
            out.append(self(points[s : s + chunk], d))
        return torch.cat(out) if out else points.new_zeros((0, 3))

    def tv_loss(self) -> torch.Tensor:
        """Total variation of the planes and lines (mean squared difference of neighbouring texels)."""
        total = self.planes[0].new_zeros(())
        for plane, line in zip(self.planes, self.lines):
            total = total + (plane[..., 1:, :] - plane[..., :-1, :]).square().mean()
            total = total + (plane[..., :, 1:] - plane[..., :, :-1]).square().mean()
            total = total + (line[..., 1:, :] - line[..., :-1, :]).square().mean()
        return total
