"""Six views -> coloured mesh with the exported coarse and fine stages, and the geometry metrics of the benchmark.

:class:`Reconstructor` chains :class:`~one2345pp.models.coarse.CoarseModel` (occupancy shell) and
:class:`~one2345pp.models.fine.FineModel` (sparse SDF + colour on the children of the occupied cells) and extracts
meshes in the normalised frame ([-0.5, 0.5]^3, the frame of the shards' volumes). Metrics against ground-truth
meshes live in :mod:`one2345pp.evaluation.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..geometry.extraction import ExtractionConfig, extract_mesh
from ..geometry.mesh import Mesh
from .coarse import CoarseModel
from .fine import FineModel

__all__ = ["Reconstruction", "Reconstructor"]


@dataclass
class Reconstruction:
    occupancy: torch.Tensor  # [B, 1, C, C, C] in {-1, +1}
    fine: object  # SparseTensor [N, 4]: SDF / truncation, RGB in [-1, 1]
    meshes: list[Mesh | None]  # None where extraction found no surface
    errors: list[str | None]


class Reconstructor:
    """Coarse then fine sampling, then mesh extraction; both models come from their export folders."""

    def __init__(self, coarse: CoarseModel, fine: FineModel):
        if fine.coarse_resolution != coarse.resolution:
            raise ValueError(
                f"the fine model expects a {fine.coarse_resolution}^3 coarse grid but the coarse model makes "
                f"{coarse.resolution}^3 (model.unet.resolution / model.coarse_factor of the fine export)"
            )
        self.coarse, self.fine = coarse.eval(), fine.eval()

    @classmethod
    def from_exports(cls, coarse: str | Path, fine: str | Path, device: str | torch.device = "cpu") -> Reconstructor:
        return cls(CoarseModel.from_pretrained(coarse, device), FineModel.from_pretrained(fine, device))

    @torch.no_grad()
    def __call__(
        self,
        views,
        cameras,
        cond_image,
        generator: torch.Generator | None = None,
        coarse_steps: int | None = None,
        fine_steps: int | None = None,
    ) -> Reconstruction:
        occ = self.coarse.sample(views, cameras, cond_image, steps=coarse_steps, generator=generator)
        empty = (occ > 0).flatten(1).sum(1) == 0
        meshes: list[Mesh | None] = [None] * occ.shape[0]
        errors: list[str | None] = ["the coarse stage predicted no occupied cell" if e else None for e in empty]
        fine = None
        if not bool(empty.all()):
            fine = self.fine.sample(views, cameras, cond_image, coarse_occ=occ, steps=fine_steps, generator=generator)
            cfg = ExtractionConfig(resolution=self.fine.resolution, truncation=1.0)
            for i, (coords, feats) in enumerate(fine.unbind()):
                if len(coords) == 0:
                    continue
                colors = (feats[:, 1:4].float().clamp(-1, 1) + 1) / 2
                try:
                    meshes[i] = extract_mesh(coords, feats[:, 0], colors, cfg, source=f"sample {i}")
                except ValueError as exn:  # no zero crossing, or nothing left after cleanup
                    errors[i] = str(exn)
        return Reconstruction(occ, fine, meshes, errors)
