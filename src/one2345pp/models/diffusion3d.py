"""Continuous-time x0-prediction diffusion shared by the 3D stages (coarse dense occupancy, fine sparse SDF/colour).

The schedule is LAS-Diffusion's (METHOD.md, stage 2): ``logSNR(t) = -log(expm1(1e-4 + 10 t^2))`` for t in [0, 1],
``alpha = sqrt(sigmoid(logSNR))``, ``sigma = sqrt(sigmoid(-logSNR))`` (variance preserving: alpha^2 + sigma^2 = 1).

Everything here works on a plain tensor ``x`` of any shape whose first dimension is the batch (dense volumes
``[B, C, R, R, R]``) or on packed sparse features ``[N, C]`` together with ``batch_index`` ``[N]`` (the batch index of
every row, as in the sparse stage's coordinates ``[N, 4]``). The network is a callable

    ``denoise(x_t, t, self_cond, drop) -> x0_hat``

with ``x_t`` and ``self_cond`` shaped like ``x``, ``t`` float ``[B]`` in [0, 1] and ``drop`` bool ``[B]`` (True: drop
the condition of that sample -- classifier-free-guidance training and the unconditional branch at sampling). The
caller closes over whatever conditions the network (condition volumes computed once, global embeddings).

Choices (not published; config keys of :class:`DiffusionConfig`):

* self-conditioning is decided once per batch (probability ``self_cond_prob``, 0.5 as in the method): the first pass
  runs without gradient on a zero self-condition, its x0 estimate is fed to the second pass; at sampling the
  previous step's (post-processed) x0 estimate is fed back;
* the sampler is ancestral (the posterior q(x_s | x_t, x0_hat) of the VP process) on a uniform time grid from 1 to 0;
  the final step returns the post-processed x0 estimate itself, so coarse samples are exactly binary;
* classifier-free guidance combines ``x0_uncond + scale * (x0_cond - x0_uncond)`` (scale 1: a single conditional
  pass); training drops the condition per sample with probability ``cond_drop_prob``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "DiffusionConfig",
    "Denoiser",
    "PostProcess",
    "alpha_sigma",
    "binarize_below",
    "broadcast_time",
    "clamp_x0",
    "diffusion_loss",
    "log_snr",
    "make_postprocess",
    "posterior_step",
    "q_sample",
    "sample",
    "time_grid",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PostProcess = Callable[[torch.Tensor, float], torch.Tensor]

LOGSNR_SHIFT = 1e-4  # the constants of the schedule (METHOD.md)
LOGSNR_SCALE = 10.0


@dataclass
class DiffusionConfig:
    self_cond_prob: float = 0.5  # probability of a self-conditioning pass per training batch (method: 0.5)
    cond_drop_prob: float = 0.1  # per-sample condition dropout in training, for classifier-free guidance
    sample_steps: int = 50  # default sampler steps (coarse 50, fine 20)
    guidance_scale: float = 1.0  # classifier-free guidance at sampling; 1 = conditional only (one pass per step)
    # x0 post-processing at sampling: "binarize" (sign() once t < binarize_below, clamp to [-1, 1] before) for the
    # coarse occupancy, "clamp" (clamp to [-1, 1]) for the fine SDF/colour, "none"
    postprocess: str = "binarize"
    binarize_below: float = 0.7


# ----------------------------------------------------------------------------------------------------------- schedule
def log_snr(t: torch.Tensor) -> torch.Tensor:
    """LAS-Diffusion's log signal-to-noise ratio, decreasing in t (about 9.2 at t=0, -10 at t=1)."""
    t = torch.as_tensor(t)
    t = t.to(torch.float64) if t.dtype == torch.float64 else t.float()
    return -torch.log(torch.expm1(LOGSNR_SHIFT + LOGSNR_SCALE * t * t))


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at time t: ``sqrt(sigmoid(logSNR))``, ``sqrt(sigmoid(-logSNR))``."""
    lam = log_snr(t)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def broadcast_time(values: torch.Tensor, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample values ``[B]`` -> a tensor broadcastable against ``x``.

    Dense ``x`` ``[B, ...]``: ``[B, 1, ..., 1]``. Packed sparse ``x`` ``[N, C]`` with ``batch_index`` ``[N]``:
    ``[N, 1]`` (the value of each row's sample).
    """
    values = values.to(device=x.device, dtype=x.dtype)
    if batch_index is not None:
        if batch_index.shape != x.shape[:1]:
            raise ValueError(f"batch_index has shape {tuple(batch_index.shape)}, expected [{x.shape[0]}] (rows of x)")
        v = values[batch_index.long()]
        return v.reshape(-1, *([1] * (x.dim() - 1)))
    if values.shape[0] != x.shape[0]:
        raise ValueError(f"{values.shape[0]} time values for a batch of {x.shape[0]}")
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, batch_index: torch.Tensor | None = None
) -> torch.Tensor:
    """``x_t = alpha(t) x0 + sigma(t) noise`` with per-sample ``t`` ``[B]``."""
    alpha, sigma = alpha_sigma(t)
    return broadcast_time(alpha, x0, batch_index) * x0 + broadcast_time(sigma, x0, batch_index) * noise


def time_grid(steps: int) -> list[float]:
    """Sampling times ``1 = t_0 > t_1 > ... > t_steps = 0`` (uniform)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got steps={steps}")
    return [1.0 - i / steps for i in range(steps + 1)]


def posterior_step(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    t: float,
    s: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One ancestral step t -> s < t: a draw from q(x_s | x_t, x0 = x0_hat) of the variance-preserving process.

    With ``c = 1 - SNR(t)/SNR(s) = -expm1(logSNR(t) - logSNR(s))``: mean ``alpha_s (x_t (1 - c) / alpha_t + c x0)``,
    variance ``c sigma_s^2``. ``noise=None`` returns the mean.
    """
    if not 0.0 <= s < t <= 1.0:
        raise ValueError(f"posterior step needs 0 <= s < t <= 1, got t={t}, s={s}")
    lt, ls = log_snr(torch.tensor(t, dtype=torch.float64)), log_snr(torch.tensor(s, dtype=torch.float64))
    c = float(-torch.expm1(lt - ls))
    a_t, _ = alpha_sigma(torch.tensor(t, dtype=torch.float64))
    a_s, s_s = alpha_sigma(torch.tensor(s, dtype=torch.float64))
    mean = float(a_s) * (x_t * ((1.0 - c) / float(a_t)) + c * x0_hat)
    if noise is None:
        return mean
    return mean + math.sqrt(c) * float(s_s) * noise


# ------------------------------------------------------------------------------------------------------ post-process
def binarize_below(threshold: float = 0.7) -> PostProcess:
    """x0 -> sign(x0) once ``t < threshold`` (coarse occupancy, METHOD.md), clamp to [-1, 1] before."""

    def post(x0: torch.Tensor, t: float) -> torch.Tensor:
        if t < threshold:
            return torch.where(x0 >= 0, torch.ones_like(x0), -torch.ones_like(x0))
        return x0.clamp(-1.0, 1.0)

    return post


def clamp_x0(x0: torch.Tensor, t: float) -> torch.Tensor:
    """x0 -> clamp(x0, -1, 1) (fine SDF / colour)."""
    return x0.clamp(-1.0, 1.0)


def _identity(x0: torch.Tensor, t: float) -> torch.Tensor:
    return x0


def make_postprocess(cfg: DiffusionConfig) -> PostProcess:
    if cfg.postprocess == "binarize":
        return binarize_below(cfg.binarize_below)
    if cfg.postprocess == "clamp":
        return clamp_x0
    if cfg.postprocess == "none":
        return _identity
    raise ValueError(f"diffusion.postprocess must be 'binarize', 'clamp' or 'none', got {cfg.postprocess!r}")


# ------------------------------------------------------------------------------------------------------------- noise
def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on the generator's device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=dev).to(device)


# -------------------------------------------------------------------------------------------------------- training
def diffusion_loss(
    denoise: Denoiser,
    x0: torch.Tensor,
    batch_size: int | None = None,
    batch_index: torch.Tensor | None = None,
    self_cond_prob: float = 0.5,
    cond_drop_prob: float = 0.0,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x0-prediction MSE at ``t ~ U(0, 1)`` per sample, with self-conditioning and condition dropout.

    ``x0`` is dense ``[B, ...]`` or packed ``[N, C]`` with ``batch_index`` (then ``batch_size`` = B is required).
    ``t`` may be given ``[B]`` (e.g. a fixed grid for validation). Returns the loss (mean over all elements) and
    ``{"t", "x0_hat", "self_cond", "drop"}`` for logging.
    """
    if batch_index is None:
        batch_size = x0.shape[0]
    elif batch_size is None:
        raise ValueError("packed inputs (batch_index given) need batch_size")
    device = x0.device
    if t is None:
        t = _rand(batch_size, generator, device)
    t = t.to(device=device, dtype=torch.float32)
    noise = _randn_like(x0, generator)
    x_t = q_sample(x0, t, noise, batch_index)
    drop = _rand(batch_size, generator, device) < cond_drop_prob
    use_self_cond = bool(_rand(1, generator, device)[0] < self_cond_prob)
    self_cond = torch.zeros_like(x0)
    if use_self_cond:
        with torch.no_grad():
            self_cond = denoise(x_t, t, self_cond, drop).detach()
    x0_hat = denoise(x_t, t, self_cond, drop)
    loss = torch.nn.functional.mse_loss(x0_hat.float(), x0.float())
    flag = torch.tensor(use_self_cond, device=device)
    return loss, {"t": t, "x0_hat": x0_hat.detach(), "self_cond": flag, "drop": drop}


# ---------------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    batch_size: int | None = None,
    steps: int = 50,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    postprocess: PostProcess = clamp_x0,
    batch_index: torch.Tensor | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling from ``x_1 = noise`` (``[B, ...]`` or packed ``[N, C]`` with ``batch_index``).

    Every step predicts x0 (with classifier-free guidance when ``guidance_scale != 1``), post-processes it
    (``postprocess(x0, t)``), feeds it back as self-condition and draws x_s from the posterior with noise from
    ``generator``; the last step returns the post-processed x0. The same ``noise`` and generator state give the same
    result. ``callback(step, t, x0_hat)`` sees every post-processed estimate.
    """
    if batch_index is None:
        batch_size = noise.shape[0]
    elif batch_size is None:
        raise ValueError("packed inputs (batch_index given) need batch_size")
    device = noise.device
    keep = torch.zeros(batch_size, dtype=torch.bool, device=device)
    drop = torch.ones(batch_size, dtype=torch.bool, device=device)
    grid = time_grid(steps)
    x = noise
    x0_hat = torch.zeros_like(noise)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        tt = torch.full((batch_size,), t, device=device)
        pred = denoise(x, tt, x0_hat, keep)
        if guidance_scale != 1.0:
            uncond = denoise(x, tt, x0_hat, drop)
            pred = uncond + guidance_scale * (pred - uncond)
        x0_hat = postprocess(pred, t)
        if callback is not None:
            callback(i, t, x0_hat)
        if s <= 0.0:
            x = x0_hat
        else:
            x = posterior_step(x, x0_hat, t, s, _randn_like(x, generator))
    return x
