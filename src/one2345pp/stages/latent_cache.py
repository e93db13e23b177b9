"""The frozen VAE's posterior of target grids already seen, so that later epochs skip the VAE encoder.

The multi-view stage encodes every target grid with a VAE that no longer trains (pretrained, or fitted before the
diffusion training starts). At the tiny preset that encoder is a third of a CPU training step (0.14 of 0.42 s at
batch 8, 64 px views; ``benchmarks/bench_multiview.py`` measures both paths). The posterior of a grid is a fixed
function of its pixels, so it is kept under a digest of the pixels themselves: a grid composited on another background
or decoded at another size is another key, and nothing about how the batch was made has to be trusted.

A cached batch draws its latent sample from the same posterior with the same generator call as the uncached path, so
the loss is the same either way (up to float rounding where the encoder saw a batch of another size). The cache holds
at most ``capacity`` grids and stops adding once full (a dataset larger than the cache gets a proportional hit rate,
with no eviction churn); it lives in memory only, per process, and is emptied whenever the VAE's weights change
(``clear``).
"""

from __future__ import annotations

import hashlib

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from one2345pp.models.multiview_pipeline import scale_latents, target_posterior

__all__ = ["TargetLatentCache"]


def _digest(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class TargetLatentCache:
    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"target latent cache capacity={capacity} (must be >= 0; 0 turns the cache off)")
        self.capacity = capacity
        self._store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def encode(self, vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``encode_target(vae, images, generator)``, reading the posteriors it has kept."""
        if any(p.requires_grad for p in vae.parameters()):
            raise RuntimeError("the target latent cache needs a frozen VAE (its posteriors would go stale)")
        params = self._posterior_parameters(vae, images)
        z = DiagonalGaussianDistribution(params).sample(generator)
        return scale_latents(z, vae.config.scaling_factor)

    @torch.no_grad()
    def _posterior_parameters(self, vae, images: torch.Tensor) -> torch.Tensor:
        """Mean and log-variance of each grid's posterior ``[B, 2C, h, w]``, encoding only the grids not kept."""
        keys = [_digest(x) for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        fresh = dict(zip(missing, target_posterior(vae, images[missing]).parameters, strict=True)) if missing else {}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for i, row in fresh.items():
            if len(self._store) < self.capacity:
                self._store[keys[i]] = row.clone()
        return torch.stack([fresh[i] if i in fresh else self._store[k].to(images.device) for i, k in enumerate(keys)])
