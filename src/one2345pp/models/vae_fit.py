"""Fitting the VAE of a randomly initialised multi-view model as an autoencoder (``train.vae_fit``): its config and
the hand-written Adam loop. The starting point is :func:`one2345pp.models.vae_init.isometric_vae_init`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from .multiview_pipeline import scale_image, unscale_image

__all__ = ["VAEFitConfig", "fit_vae"]


@dataclass
class VAEFitConfig:
    """Fitting the VAE of a randomly initialised model (``model.pretrained: null``) as an autoencoder on the training
    views before diffusion training starts; a random VAE's decoder cannot turn any latent into an image. Pretrained
    VAEs (SD2, Zero123++, an earlier export) stay frozen, so ``steps`` must then be 0."""

    steps: int = 0  # optimizer steps of the autoencoder fit (0: keep the VAE as built)
    # Adam, cosine decay to 5% over the steps. From the fit's isometric initialisation (see fit_vae) small steps
    # learn fastest: on the tiny VAE 1e-4 beat 2e-4, 5e-4 and 1e-3 on held-out views.
    lr: float = 1e-4
    kl_weight: float = 1e-5  # weight of the KL term of the posterior against N(0, I)
    log_every: int = 50


def fit_vae(vae, batches, f: VAEFitConfig, device, log_every: int = 50, stream=None, tag: str = "multiview") -> dict:
    """Fit ``vae`` as an autoencoder on ``batches`` (dicts with ``target`` and ``cond`` in [0, 1]) for ``f.steps``
    Adam steps: L1 reconstruction of the target grids (scaled as the diffusion encodes them) and of the condition
    images, plus ``kl_weight`` x KL; progress lines on ``stream`` (default stderr) start with ``[tag]``.
    Afterwards the VAE is frozen again and its ``scaling_factor`` set to 1 / std of the target latents, as Stable
    Diffusion's 0.18215 was chosen. Returns the final L1 (mean of the last ``log_every`` steps), the PSNR of the
    last batch's target grids reconstructed through the posterior mean, the scaling factor, the fit's wall time
    in ``seconds`` and ``sample`` (the last batch's first target and its reconstruction, [3, H, W] in [0, 1])."""
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=f.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(i, f.steps) / f.steps))
    )
    stream = stream or sys.stderr

    def images(batch):
        target = scale_image(batch["target"].to(device).float() * 2.0 - 1.0)
        return [target, batch["cond"].to(device).float() * 2.0 - 1.0]

    recent: list[float] = []
    step, last, start = 0, None, time.monotonic()
    vae.requires_grad_(True)
    try:
        with torch.enable_grad():
            while step < f.steps:
                got = False
                for batch in batches:
                    got = True
                    l1 = kl = 0.0
                    for x in images(batch):
                        post = vae.encode(x).latent_dist
                        rec = vae.decode(post.sample()).sample
                        l1 = l1 + (rec - x).abs().mean()
                        kl = kl + post.kl().mean() / x[0].numel()
                    loss = l1 + f.kl_weight * kl
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    recent = (recent + [float(l1.detach()) / 2])[-log_every:]
                    if step % log_every == 0 or step == f.steps:
                        print(
                            f"[{tag}] VAE fit step {step}/{f.steps}  L1 {sum(recent) / len(recent):.4f}  "
                            f"{time.monotonic() - start:.0f}s",
                            file=stream,
                            flush=True,
                        )
                    last = batch
                    if step >= f.steps:
                        break
                if not got:
                    raise RuntimeError("train.vae_fit: the training data yielded no batch")
    finally:
        vae.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        target = scale_image(last["target"].to(device).float() * 2.0 - 1.0)
        z = vae.encode(target).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.float().std().clamp_min(1e-6)))
        rec = ((unscale_image(vae.decode(z).sample) + 1.0) / 2.0).clamp(0, 1)
        truth = last["target"].to(device).float()
        mse = float((rec - truth).square().mean())
    return {
        "steps": step,
        "l1": sum(recent) / max(1, len(recent)),
        "psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
        "scaling_factor": float(vae.config.scaling_factor),
        "seconds": time.monotonic() - start,
        "sample": (truth[0].cpu(), rec[0].cpu()),
    }
