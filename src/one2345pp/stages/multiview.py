"""Stage 1: tiled 3x2 multi-view diffusion (Zero123++ style), trained as a LightningModule, exported as a diffusers
pipeline. The method's facts (schedule, conditioning, normalisation, recipe) are in ``shared/design/METHOD.md``.

    one2345pp train --stage multiview --config experiments/tiny/multiview.yaml [key=value ...]

Training step: global condition (CLIP image embedding of the condition added to the stored empty-prompt embedding
with the learned ramp) and reference latent (VAE posterior sample, unscaled, of the condition resized with the bicubic
filter to a random square size in ``[train.cond_size_min, train.cond_size_max]``, snapped to multiples of the UNet's
total downsampling, 64 px for SD2); condition dropout (probability ``train.cond_dropout``) gives a sample the
sampler's unconditional branch instead (``unconditional_condition``: the plain empty-prompt embedding and the
reference latent of a gray image) -> target latents (posterior
sample, Zero123++ normalisation) noised with DDPM noise at t ~ U{0..999} -> reference latent noised to the same t
with fresh noise -> record pass + read pass -> MSE against the v-target, optionally Min-SNR-gamma weighted
(``min(SNR, gamma) / (SNR + 1)`` for v-prediction).

Checkpoints hold the UNet and the conditioner, the EMA averages of the trained tensors (``ema.enabled``) and the
optimizer state; the frozen VAE and CLIP encoder are left out and rebuilt from ``model`` (pretrained source or seeded
random init) on resume and export. A randomly initialised model (``model.pretrained: null``) first fits its VAE as an
autoencoder on the training views (``train.vae_fit``, see :meth:`MultiViewStage.fit_vae`); that VAE is then stored in
the checkpoints and the export. Validation and export use the EMA weights when EMA is on. The end of training
writes ``RUN/export/`` (a :class:`MultiViewDiffusionPipeline` folder; :meth:`Stage.on_train_end`); :func:`export` does
the same from any run directory or checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from one2345pp.config import ConfigError, load_config, to_object
from one2345pp.data.config import LoaderConfig
from one2345pp.data.datamodule import MultiViewDataModule
from one2345pp.models.multiview_builders import MultiViewComponents, MultiViewModelConfig, build_components
from one2345pp.models.multiview_pipeline import (
    GRAY,
    SAMPLERS,
    MultiViewDiffusionPipeline,
    bicubic_resize,
    bilinear_resize,
    clip_pixels,
    concat_condition,
    encode_reference,
    encode_target,
    global_condition,
    training_scheduler,
    unconditional_condition,
    vae_scale_factor,
    with_condition_channels,
)
from one2345pp.models.reference_attention import noisy_reference, reference_forward
from one2345pp.models.vae_fit import VAEFitConfig, fit_vae
from one2345pp.models.vae_init import isometric_vae_init
from one2345pp.training.config import RunConfig, TrainerConfig
from one2345pp.training.media import log_image
from one2345pp.training.optim import OptimConfig, check_optim
from one2345pp.training.runner import fit
from one2345pp.utils.atomic import atomic_folder
from one2345pp.utils.run_layout import last_checkpoint, run_of_checkpoint

from .base import EMAConfig, Stage, export_dir
from .latent_cache import TargetLatentCache

__all__ = [
    "EMAConfig",
    "MultiViewConfig",
    "MultiViewModule",
    "MultiViewStage",
    "TrainConfig",
    "VAEFitConfig",
    "ValConfig",
    "export",
    "run_training",
    "sample_sheet",
    "train",
]

log = logging.getLogger(__name__)

STAGE = "multiview"
FROZEN_PREFIXES = ("vae.", "image_encoder.")  # rebuilt from the model config, not stored (unless fitted / trained)
TRAINABLE_PRESETS = ("attn", "full")


# ------------------------------------------------------------------------------------------------------- configs
@dataclass
class TrainConfig:
    trainable: str = "attn"  # "attn": self-attention + cross-attention K/V (+ ramp); "full": the whole UNet (+ ramp)
    cond_dropout: float = 0.1  # probability of a gray condition image (classifier-free guidance)
    cond_size_min: int = 128  # random square resize of the condition, snapped to the UNet's downsampling multiple
    cond_size_max: int = 512
    min_snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weighting; None: plain MSE
    gradient_checkpointing: bool = False
    # torch intra-op threads of the training process (None: torch's default). The tiny preset's small tensors gain
    # little from a second thread, and on a busy 2-core machine OpenMP threads that wait for a core slowed a step
    # 5-10x; the tiny config sets 1.
    cpu_threads: int | None = None
    vae_fit: VAEFitConfig = field(default_factory=VAEFitConfig)
    # train the CLIP image encoder with the UNet (stored in checkpoints and exports, EMA'd with them). The method
    # keeps the pretrained CLIP frozen; a frozen *random* one (the tiny preset) maps every image to nearly the same
    # embedding (cosine 0.96-0.996 between different objects), so the global condition carries nothing.
    image_encoder_trainable: bool = False
    # target grids whose frozen-VAE posterior is kept in memory, keyed by their pixels, so that later epochs skip the
    # VAE encoder (0: off). One grid of 64 px views keeps 12 KiB, of 320 px views 300 KiB.
    target_latent_cache: int = 0


def _multiview_ema() -> EMAConfig:
    return EMAConfig(enabled=False)


@dataclass
class ValConfig:
    num_images: int = 4  # conditions of the first validation batch sampled at each validation (0: none)
    num_inference_steps: int = 28  # also the exported pipeline's default
    guidance_scale: float = 4.0  # also the exported pipeline's default guidance
    # also the exported pipeline's default: grids drawn per condition, the one nearest their mean kept (1: as published)
    num_candidates: int = 1
    sampler: str = "euler_a"  # "euler_a" or "ddim"
    seed: int = 0


@dataclass
class MultiViewConfig:
    model: MultiViewModelConfig = field(default_factory=MultiViewModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # phase 1 of the published recipe: AdamW, peak lr 7e-5, 1000 warm-up steps, cosine decay
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=7e-5, weight_decay=0.01, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.0
        )
    )
    ema: EMAConfig = field(default_factory=_multiview_ema)
    val: ValConfig = field(default_factory=ValConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def check_config(cfg: MultiViewConfig) -> None:
    """Values the schema cannot check; each error names the key."""
    t = cfg.train
    check_optim(cfg.optim)
    problems = []
    if t.trainable not in TRAINABLE_PRESETS:
        problems.append(f"train.trainable={t.trainable!r} (choose {', '.join(TRAINABLE_PRESETS)})")
    if not 0.0 <= t.cond_dropout <= 1.0:
        problems.append(f"train.cond_dropout={t.cond_dropout} (must lie in [0, 1])")
    if not 0 < t.cond_size_min <= t.cond_size_max:
        problems.append(f"train.cond_size_min/max={t.cond_size_min}/{t.cond_size_max} (need 0 < min <= max)")
    if t.target_latent_cache < 0:
        problems.append(f"train.target_latent_cache={t.target_latent_cache} (must be >= 0; 0 turns it off)")
    if t.cpu_threads is not None and t.cpu_threads < 1:
        problems.append(f"train.cpu_threads={t.cpu_threads} (must be >= 1 or null)")
    if t.vae_fit.steps < 0 or t.vae_fit.lr <= 0 or t.vae_fit.kl_weight < 0 or t.vae_fit.log_every < 1:
        problems.append(
            f"train.vae_fit steps={t.vae_fit.steps} lr={t.vae_fit.lr} kl_weight={t.vae_fit.kl_weight} "
            f"log_every={t.vae_fit.log_every} (need steps >= 0, lr > 0, kl_weight >= 0, log_every >= 1)"
        )
    if t.vae_fit.steps > 0 and cfg.model.pretrained is not None:
        problems.append(
            f"train.vae_fit.steps={t.vae_fit.steps} with model.pretrained={cfg.model.pretrained!r}: the VAE of a "
            "pretrained model stays frozen (set train.vae_fit.steps=0)"
        )
    if t.min_snr_gamma is not None and t.min_snr_gamma <= 0:
        problems.append(f"train.min_snr_gamma={t.min_snr_gamma} (must be > 0 or null)")
    if not 0.0 <= cfg.ema.decay < 1.0:
        problems.append(f"ema.decay={cfg.ema.decay} (must lie in [0, 1))")
    if cfg.val.sampler not in SAMPLERS:
        problems.append(f"val.sampler={cfg.val.sampler!r} (choose {', '.join(SAMPLERS)})")
    if cfg.val.num_images < 0 or cfg.val.num_inference_steps < 1:
        problems.append(f"val.num_images={cfg.val.num_images} val.num_inference_steps={cfg.val.num_inference_steps}")
    if cfg.val.num_candidates < 1:
        problems.append(f"val.num_candidates={cfg.val.num_candidates} (must be >= 1)")
    if problems:
        raise ConfigError("bad multiview config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------- helpers
def _rand(shape, generator: torch.Generator | None, device, randn: bool = True) -> torch.Tensor:
    """Random numbers from ``generator`` (drawn on its device, then moved) or from the global RNG on ``device``."""
    draw = torch.randn if randn else torch.rand
    if generator is None:
        return draw(shape, device=device)
    return draw(shape, generator=generator, device=generator.device).to(device)


def sample_sheet(cond: torch.Tensor, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One row per sample: input | generated 3x2 grid | ground-truth 3x2 grid, on gray; ``[3, N * 3h, 3 * 2w]``.

    The input is shown as a 2h x 2h square at the top of its panel; the generated grids are resized to the
    ground-truth size.
    """
    n, _, gh, gw = target.shape
    generated = bilinear_resize(generated.float(), (gh, gw))
    side = min(gw, gh)
    panel = torch.full((n, 3, gh, gw), GRAY, device=target.device)
    panel[:, :, :side, :side] = bilinear_resize(cond.float(), (side, side))
    rows = torch.cat([panel, generated.to(target.device), target.float()], dim=-1)  # [N, 3, gh, 3 gw]
    return torch.cat(list(rows), dim=-2)


# -------------------------------------------------------------------------------------------------------- module
class MultiViewStage(Stage):
    """The multi-view diffusion stage; ``components`` (e.g. shared between tests) default to ``build_components``."""

    def __init__(self, cfg: MultiViewConfig, components: MultiViewComponents | None = None):
        super().__init__(cfg)
        check_config(cfg)
        c = components if components is not None else build_components(cfg.model)
        self.unet, self.vae, self.image_encoder, self.conditioner = c.unet, c.vae, c.image_encoder, c.conditioner
        self.feature_extractor = c.feature_extractor
        self.sampler_scheduler = c.scheduler
        self.noise_scheduler = training_scheduler(self.sampler_scheduler.config)  # the folder's schedule
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.size_multiple = vae_scale_factor(self.vae) * 2 ** (len(self.unet.config.block_out_channels) - 1)
        lo = math.ceil(cfg.train.cond_size_min / self.size_multiple)
        hi = cfg.train.cond_size_max // self.size_multiple
        if lo > hi:
            raise ConfigError(
                f"train.cond_size_min/max={cfg.train.cond_size_min}/{cfg.train.cond_size_max} contain no multiple of "
                f"{self.size_multiple} (VAE factor x UNet downsampling)"
            )
        self.cond_size_range = (lo * self.size_multiple, hi * self.size_multiple)
        self.vae.requires_grad_(False)
        self.image_encoder.requires_grad_(cfg.train.image_encoder_trainable)
        self._set_trainable(cfg.train.trainable)
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # EMA of every trained tensor (UNet parameters of the preset, the ramp, a trained image encoder)
        self.track_ema(cfg.ema)
        # checkpoints leave out the frozen parts; on_load_checkpoint checks that everything else is there
        self.strict_loading = False
        self.vae_fitted = False  # set by fit_vae or by loading a checkpoint that holds the fitted VAE
        self.target_cache = TargetLatentCache(cfg.train.target_latent_cache)

    def ema_module(self) -> torch.nn.Module:  # the EMA spans the UNet, the ramp and a trained image encoder
        return self

    def unstored_prefixes(self) -> tuple[str, ...]:
        """Prefixes of the parts checkpoints leave out (a fitted VAE is stored)."""
        stored = {"vae.": self.cfg.train.vae_fit.steps > 0, "image_encoder.": self.cfg.train.image_encoder_trainable}
        return tuple(p for p in FROZEN_PREFIXES if not stored[p])

    # ------------------------------------------------------------------------------------------ parameters
    def _set_trainable(self, preset: str) -> None:
        self.unet.requires_grad_(preset == "full")
        if preset == "attn":
            for name, module in self.unet.named_modules():
                if name.endswith(".attn1"):
                    module.requires_grad_(True)
                elif name.endswith(".attn2"):
                    module.to_k.requires_grad_(True)
                    module.to_v.requires_grad_(True)
        self.conditioner.ramp.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        encoder = [p for p in self.image_encoder.parameters() if p.requires_grad]
        return [p for p in self.unet.parameters() if p.requires_grad] + [self.conditioner.ramp] + encoder

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        self.image_encoder.eval()
        return self

    # ---------------------------------------------------------------------------------------------- diffusion
    def encode_condition(
        self, images: torch.Tensor, refs: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition images in [0, 1] -> (encoder hidden states [B, 77, D], reference latents), as the pipeline: the
        CLIP input from the images as given, the reference from ``refs`` (the images resized for the reference;
        default: the images as given)."""
        # (a frozen image encoder has requires_grad off: no graph through it)
        hidden = global_condition(self.image_encoder, self.conditioner, clip_pixels(images, self.feature_extractor))
        with torch.no_grad():
            ref = encode_reference(self.vae, images if refs is None else refs, generator)
        return hidden, ref

    def diffusion_targets(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(noisy latents x_t, v-target) of the training schedule."""
        return self.noise_scheduler.add_noise(z0, noise, t), self.noise_scheduler.get_velocity(z0, noise, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights for v-prediction, ``min(SNR, gamma) / (SNR + 1)``; ones when gamma is None."""
        gamma = self.cfg.train.min_snr_gamma
        if gamma is None:
            return torch.ones(t.shape, device=t.device)
        a = self.alphas_cumprod.to(t.device)[t].float()
        snr = a / (1.0 - a)
        return snr.clamp(max=gamma) / (snr + 1.0)

    def random_cond_size(self, generator: torch.Generator | None = None) -> int:
        lo, hi = self.cond_size_range
        k = int(torch.randint(lo // self.size_multiple, hi // self.size_multiple + 1, (), generator=generator))
        return k * self.size_multiple

    def prepare_condition(
        self, cond: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder hidden states, reference latents, reference images) of a batch of conditions. ``augment``
        (training): the reference from a random square resize, and with probability ``cond_dropout`` a sample gets
        the sampler's unconditional branch (:func:`unconditional_condition`: plain empty-prompt embedding, gray-image
        reference; the gray image is also what ``model.condition_concat`` concatenates for it)."""
        if not augment:
            return (*self.encode_condition(cond, generator=generator), cond)
        drop = _rand((cond.shape[0],), generator, cond.device, randn=False) < self.cfg.train.cond_dropout
        size = self.random_cond_size(generator)
        images = bicubic_resize(cond, (size, size))
        hidden, ref = self.encode_condition(cond, images, generator)
        if drop.any():
            idx = drop.nonzero().flatten()
            with torch.no_grad():
                u_hidden, u_ref = unconditional_condition(self.conditioner, self.vae, len(idx), size, generator)
            hidden = hidden.index_copy(0, idx, u_hidden.to(hidden.dtype))
            ref = ref.index_copy(0, idx, u_ref.to(ref.dtype))
            images = images.index_fill(0, idx, GRAY)
        return hidden, ref, images

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None, augment: bool = True):
        """Loss of one batch (``cond`` [B, 3, Hc, Wc], ``target`` [B, 3, 3H, 2W], both in [0, 1]).

        Randomness (dropout, resize, timesteps, noise, posterior sample) comes from ``generator`` when given, else
        from the global RNG; ``augment=False`` (validation) keeps the condition as it is.
        """
        hidden, ref, images = self.prepare_condition(batch["cond"], generator, augment)
        target = batch["target"]
        with torch.no_grad():
            z0 = self._encode_target(target, generator).float()
        b, device = z0.shape[0], z0.device
        if generator is None:
            t = torch.randint(0, len(self.alphas_cumprod), (b,), device=device)
        else:
            t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator).to(device)
        x_t, v = self.diffusion_targets(z0, _rand(z0.shape, generator, device), t)
        ref_t = noisy_reference(ref, t, _rand(ref.shape, generator, device), self.alphas_cumprod)
        if self.cfg.model.condition_concat:
            with torch.no_grad():
                grid, own = concat_condition(self.vae, images, target.shape[-1] // 2)  # one view of the 3x2 grid
            x_t, ref_t = with_condition_channels(x_t, grid), with_condition_channels(ref_t, own)
        pred = reference_forward(self.unet, x_t, t, hidden, ref_t)
        per_sample = (pred.float() - v.float()).square().mean(dim=(1, 2, 3))
        return (self.loss_weights(t) * per_sample).mean()

    def _encode_target(self, target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # training only: validation and the VAE fit see the VAE as it is, never a kept posterior
        if self.training and self.target_cache.capacity > 0:
            return self.target_cache.encode(self.vae, target, generator)
        return encode_target(self.vae, target, generator)

    # ------------------------------------------------------------------------------------------------ lightning
    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        cache = self.target_cache
        if cache.capacity > 0:  # share of target grids read from the cache so far (the encoder skipped)
            self.log("train/latent_cache_hits", cache.hits / max(1, cache.hits + cache.misses), batch_size=1)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch["target"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        seed, b = self.cfg.val.seed + batch_idx, batch["target"].shape[0]
        loss = self.compute_loss(batch, generator=torch.Generator().manual_seed(seed), augment=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        if b > 1:  # how much the condition explains: the same noise and timesteps with another object's condition
            swapped = {**batch, "cond": batch["cond"].roll(1, dims=0)}
            other = self.compute_loss(swapped, generator=torch.Generator().manual_seed(seed), augment=False)
            self.log("val/cond_gain", (other - loss) / other.clamp_min(1e-12), batch_size=b, sync_dist=True)
        if batch_idx == 0 and self.cfg.val.num_images > 0 and self.trainer.is_global_zero:
            self.log_samples(batch)

    def optimizer_groups(self) -> list:
        """No weight decay on the ramp coefficients."""
        unet = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": unet}, {"params": [self.conditioner.ramp], "weight_decay": 0.0}]
        if self.cfg.train.image_encoder_trainable:
            groups.append({"params": [p for p in self.image_encoder.parameters() if p.requires_grad]})
        return groups

    def total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return max(1, self.cfg.trainer.max_steps)
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return max(1, int(trainer.estimated_stepping_batches))

    def on_train_start(self) -> None:
        # (runner.fit already seeds every rank with run.seed + rank, so timesteps and noise differ per rank)
        if self.cfg.train.vae_fit.steps > 0 and not self.vae_fitted:
            self._fit_vae_all_ranks()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.vae_fitted:
            checkpoint["vae_fit"] = {"scaling_factor": float(self.vae.config.scaling_factor)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        super().on_load_checkpoint(checkpoint)
        if "vae_fit" in checkpoint:  # the VAE weights arrive with the state dict
            self.vae.register_to_config(scaling_factor=float(checkpoint["vae_fit"]["scaling_factor"]))
            self.vae_fitted = True
            self.target_cache.clear()

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Every UNet / conditioner tensor (and the EMA state when EMA is on) must be in a checkpoint; unknown keys
        are errors. The frozen VAE and CLIP encoder are not stored."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise KeyError("checkpoint has no 'state_dict' (not a Lightning checkpoint of the multiview stage?)")
        expected = {k for k in self.state_dict() if not k.startswith(self.unstored_prefixes())}
        missing, unexpected = expected - set(state), set(state) - set(self.state_dict())
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match this multiview model (model sizes / preset?): missing "
                f"{sorted(missing)[:4]} ({len(missing)}), unexpected {sorted(unexpected)[:4]} ({len(unexpected)})"
            )
        if self.ema is not None and "ema" not in checkpoint:
            raise KeyError("ema.enabled=true but the checkpoint has no 'ema' state (trained with ema.enabled=false?)")
        if self.cfg.train.vae_fit.steps > 0 and "vae_fit" not in checkpoint:
            raise KeyError("train.vae_fit.steps > 0 but the checkpoint holds no fitted VAE (saved before the fit?)")

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Weights (and EMA state) of a checkpoint dict, as written by the trainer."""
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"], strict=False)

    # ---------------------------------------------------------------------------------------------- VAE fit
    def _fit_vae_all_ranks(self) -> None:
        """Rank 0 fits the VAE on its training batches; the weights and scaling factor go to every rank."""
        trainer = self.trainer
        if trainer.is_global_zero:
            batches = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
            if batches is None:
                raise RuntimeError("train.vae_fit needs the trainer's datamodule for its training batches")
            summary = self.fit_vae(batches, log_every=self.cfg.train.vae_fit.log_every)
            sample = summary.pop("sample")
            log_image(trainer, "vae_fit/reconstruction", torch.cat([sample[0], sample[1]], dim=-1), step=0)
            for logger in trainer.loggers:
                logger.log_hyperparams({"vae_fit": summary})
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(
                ({k: v.cpu() for k, v in self.vae.state_dict().items()}, float(self.vae.config.scaling_factor)), src=0
            )
            self.vae.load_state_dict(state[0])
            self.vae.register_to_config(scaling_factor=state[1])
        self.vae_fitted = True

    def fit_vae(self, batches, log_every: int = 50, stream=None) -> dict:
        """Fit the VAE as an autoencoder on ``batches`` (``train.vae_fit``; :func:`one2345pp.models.vae_fit.fit_vae`,
        which returns the summary); a VAE not fitted yet starts from :func:`isometric_vae_init`."""
        if not self.vae_fitted:  # the random VAE as built learns slowly (see isometric_vae_init)
            isometric_vae_init(self.vae, self.cfg.model.init_seed)
        summary = fit_vae(self.vae, batches, self.cfg.train.vae_fit, self.device, log_every, stream, tag=STAGE)
        self.vae_fitted = True
        self.target_cache.clear()  # posteriors of the VAE before the fit
        return summary

    # ------------------------------------------------------------------------------------------ sampling, export
    def pipeline(self) -> MultiViewDiffusionPipeline:
        """A pipeline over this module's current weights; it shares the modules (see :meth:`ema_weights`)."""
        pipe = MultiViewDiffusionPipeline(
            unet=self.unet,
            vae=self.vae,
            scheduler=self.sampler_scheduler,
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            conditioner=self.conditioner,
            view_size=self.cfg.model.view_size,
            cond_size=self.cfg.model.cond_size,
            condition_concat=self.cfg.model.condition_concat,
            guidance_scale=self.cfg.val.guidance_scale,  # the export's default guidance, steps and candidates
            num_inference_steps=self.cfg.val.num_inference_steps,
            num_candidates=self.cfg.val.num_candidates,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(self, image, **kwargs):
        """Generate with the sampling weights (EMA when on), in eval mode; the arguments of the pipeline's call."""
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                return self.pipeline()(image, **kwargs)
        finally:
            self.train(was_training)

    def save_pretrained(self, out: str | Path) -> Path:
        """Write the diffusers folder (model_index.json + component folders, safetensors) of the current weights
        (:meth:`export_pretrained`: the EMA weights when on): written beside ``out`` under a temporary name, then
        renamed into place."""
        out = Path(out)
        with atomic_folder(out) as tmp:
            self.pipeline().save_pretrained(str(tmp), safe_serialization=True)
        return out

    def log_samples(self, batch: dict) -> Path:
        """Sample the first ``val.num_images`` conditions; the sheet (input | generated | ground truth) goes to
        ``RUN/media/val_samples/`` and the run's loggers."""
        v = self.cfg.val
        n = min(v.num_images, batch["cond"].shape[0])
        out = self.sample(
            batch["cond"][:n],
            num_inference_steps=v.num_inference_steps,
            guidance_scale=v.guidance_scale,
            num_candidates=v.num_candidates,
            sampler=v.sampler,
            generator=torch.Generator().manual_seed(v.seed),
            output_type="pt",
        )
        sheet = sample_sheet(batch["cond"][:n], out.grid, batch["target"][:n])
        return log_image(self.trainer, "val/samples", sheet)


MultiViewModule = MultiViewStage  # the old name, which tests and benchmarks import


# ----------------------------------------------------------------------------------------------------- commands
def load_stage_config(config_path=None, overrides=()) -> DictConfig:
    cfg = load_config(MultiViewConfig, config_path, overrides)
    check_config(to_object(cfg))
    return cfg


def run_training(cfg, callbacks=()):
    """Build module and data from a resolved config and fit; returns ``(trainer, run directory)``."""
    conf: MultiViewConfig = to_object(cfg)
    if conf.train.cpu_threads is not None:
        torch.set_num_threads(conf.train.cpu_threads)
    data = MultiViewDataModule(conf.data)
    # built inside fit(), after seeding with run.seed: the same initial weights on every rank and rerun
    return fit(STAGE, cfg, lambda: MultiViewStage(conf), data, callbacks)


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage multiview``: train, then write ``RUN/export/``."""
    trainer, run = run_training(load_stage_config(config_path, overrides))
    loss = trainer.callback_metrics.get("train/loss")
    loss_text = f"{float(loss):.4f}" if loss is not None else "n/a"
    print(f"multiview: {trainer.global_step} steps, last train/loss {loss_text}")
    print(f"run directory: {run}\nexported pipeline: {export_dir(run)}")
    return 0


def export(run: str | Path, out: str | Path | None = None, overrides: Sequence[str] = ()) -> Path:
    """``one2345pp export --stage multiview``: a run directory (its ``ckpts/last.ckpt``) or a checkpoint inside a
    run's ``ckpts/`` -> pipeline folder ``out`` (default ``RUN/export``), EMA weights when the run used EMA.
    ``overrides`` (``val.guidance_scale=2 val.num_candidates=4``) change the sampling defaults the folder records
    from the run's; nothing else of the run can change after training."""
    other = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("val.")]
    if other:
        raise ConfigError(
            f"export overrides set the sampling defaults the folder records (val.*), got {' '.join(other)}"
        )
    p = Path(run)
    if p.is_dir():
        run, ckpt = p, last_checkpoint(p)
    elif p.is_file():
        run, ckpt = run_of_checkpoint(p), p
    else:
        raise FileNotFoundError(f"no run directory or checkpoint at {p}")
    config = run / "config.yaml"
    if not ckpt.is_file() or not config.is_file():
        raise FileNotFoundError(f"export needs {ckpt} and {config}")
    module = MultiViewStage(to_object(load_stage_config(config, overrides)))
    module.load_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True))
    return module.export_pretrained(out if out is not None else export_dir(run))
