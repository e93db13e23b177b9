"""The exported multi-view generator: a diffusers ``DiffusionPipeline`` (one image -> six views tiled 3x2).

Components: ``unet`` (``UNet2DConditionModel`` with reference attention installed on every ``attn1``), ``vae``
(``AutoencoderKL``), ``scheduler`` (the training noise schedule, stored as Euler-ancestral with trailing spacing),
``image_encoder`` (``CLIPVisionModelWithProjection``), ``feature_extractor`` (``CLIPImageProcessor``, whose resize and
normalisation values are applied in torch) and ``conditioner`` (:class:`GlobalConditioner`: the stored empty-prompt
embedding and the 77 learned ramp coefficients). ``save_pretrained`` writes ``model_index.json`` and one folder per
component (safetensors); ``MultiViewDiffusionPipeline.from_pretrained(folder)`` restores everything.

The conditioning and normalisation follow Zero123++ (``shared/design/METHOD.md``, stage 1): target latents
``(z * scaling_factor - 0.22) * 0.75``, target images scaled by 0.5 / 0.8 before the VAE, condition latent without
the VAE scaling factor, and a gray image as the condition of the unconditional branch of classifier-free guidance.
The training module (:mod:`one2345pp.stages.multiview`) uses the same functions, so its samples and the exported
pipeline's agree for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    ModelMixin,  # noqa: F401  (diffusers looks the load method of custom components up in their module)
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from one2345pp.cameras import GRID_COLS, GRID_ROWS, untile
from one2345pp.models.reference_attention import install_reference_attention, noisy_reference, reference_forward

__all__ = [
    "GRAY",
    "NUM_TOKENS",
    "SAMPLERS",
    "TRAIN_SCHEDULE",
    "GlobalConditioner",
    "MultiViewDiffusionPipeline",
    "MultiViewPipelineOutput",
    "clip_pixels",
    "concat_condition",
    "condition_latent",
    "decode_latents",
    "encode_reference",
    "encode_target",
    "make_sampler",
    "scale_image",
    "scale_latents",
    "to_condition_tensor",
    "unscale_image",
    "unscale_latents",
    "vae_scale_factor",
    "with_condition_channels",
]

NUM_TOKENS = 77  # text-encoder sequence length; one ramp coefficient per token
GRAY = 0.5  # background and unconditional condition image level, in [0, 1]
# Zero123++: linear betas 0.00085 -> 0.012 over 1000 steps, v-prediction
TRAIN_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
}
LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75
IMAGE_SCALE = 0.5 / 0.8
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's VAE scaling factor, the one Zero123++'s reference latent is read with
SAMPLERS = ("euler_a", "ddim")


# --------------------------------------------------------------------------------------------------- normalisation
def scale_latents(z: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Raw VAE latent -> diffusion space: ``(z * scaling_factor - 0.22) * 0.75``."""
    return (z * scaling_factor - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(x: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Inverse of :func:`scale_latents`."""
    return (x / LATENT_SCALE + LATENT_SHIFT) / scaling_factor


def scale_image(x: torch.Tensor) -> torch.Tensor:
    """Target image in [-1, 1] -> the range the VAE encodes (x 0.5 / 0.8)."""
    return x * IMAGE_SCALE


def unscale_image(x: torch.Tensor) -> torch.Tensor:
    return x / IMAGE_SCALE


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_target(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Target grids in [0, 1] ``[B, 3, 3H, 2W]`` -> normalised diffusion latents (a posterior sample)."""
    x = scale_image(images.to(vae.dtype) * 2.0 - 1.0)
    z = vae.encode(x).latent_dist.sample(generator)
    return scale_latents(z, vae.config.scaling_factor)


def encode_reference(vae, images: torch.Tensor) -> torch.Tensor:
    """Condition images in [0, 1] -> the reference latent: the posterior mean, not multiplied by SD's scaling factor.

    Zero123++ leaves SD's latent unscaled, which makes the reference 1 / 0.18215 = 5.5x larger than a diffusion latent
    (the paper's "scaled by 5"): noised to the same t, it keeps a 5.5x higher signal-to-noise ratio than the target.
    That ratio is what matters, so for a VAE with another scaling factor (the tiny preset's fitted VAE: about 2, where
    the raw latent is *smaller* than a diffusion latent) the latent is multiplied by ``scaling_factor / 0.18215``; for
    SD's VAE the factor is exactly 1, so Zero123++ weights read the latent they were trained on.
    """
    z = vae.encode(images.to(vae.dtype) * 2.0 - 1.0).latent_dist.mode()
    return z * (float(vae.config.scaling_factor) / SD_SCALING_FACTOR)


def condition_latent(vae, images: torch.Tensor) -> torch.Tensor:
    """Condition images in [0, 1] -> their latent in the diffusion space of the targets (posterior mean, target
    normalisation): what the concatenated-condition path of :func:`concat_condition` carries."""
    z = vae.encode(scale_image(images.to(vae.dtype) * 2.0 - 1.0)).latent_dist.mode()
    return scale_latents(z, vae.config.scaling_factor)


def concat_condition(vae, images: torch.Tensor, view_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The extra UNet input channels of a model with ``condition_concat``: ``(grid, reference)``.

    ``grid`` [B, C, 3h, 2w]: the condition resized to one view and encoded (:func:`condition_latent`), repeated in
    each of the six tiles, for the pass over the target grid; ``reference`` [B, C, hc, wc]: the condition at its own
    size, for the record pass over the reference latent. Both are clean at every timestep: the path hands the UNet
    the input at the first convolution, where reference attention reaches it only through self-attention.
    """
    size = (view_size, view_size)
    one_view = images if images.shape[-2:] == size else F.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    ).clamp(0.0, 1.0)
    grid = condition_latent(vae, one_view).repeat(1, 1, GRID_ROWS, GRID_COLS)
    return grid, condition_latent(vae, images)


def with_condition_channels(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the concatenated-condition channels appended (unchanged when the model has none)."""
    return x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised diffusion latents -> images in [0, 1]."""
    z = unscale_latents(latents.to(vae.dtype), vae.config.scaling_factor)
    return ((unscale_image(vae.decode(z).sample) + 1.0) / 2.0).clamp(0.0, 1.0)


def _size(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return value[key]
    except (KeyError, TypeError):
        return getattr(value, key, None)


def clip_pixels(images: torch.Tensor, feature_extractor) -> torch.Tensor:
    """CLIP input from images in [0, 1] ``[B, 3, H, W]``, with the feature extractor's values, in torch.

    Shortest edge resized to ``size["shortest_edge"]`` (bicubic, antialiased), centre crop to ``crop_size``,
    normalised by ``image_mean`` / ``image_std``.
    """
    ch = _size(feature_extractor.crop_size, "height")
    cw = _size(feature_extractor.crop_size, "width") or ch
    short = _size(feature_extractor.size, "shortest_edge") or min(ch, cw)
    h, w = images.shape[-2:]
    s = short / min(h, w)
    nh, nw = max(ch, round(h * s)), max(cw, round(w * s))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top : top + ch, left : left + cw].clamp(0.0, 1.0)
    mean = torch.tensor(feature_extractor.image_mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(feature_extractor.image_std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def make_sampler(name: str, config):
    """Inference scheduler over the training schedule: ``euler_a`` (Euler-ancestral) or ``ddim``, trailing spacing."""
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------------------------- conditioner
class GlobalConditioner(ModelMixin, ConfigMixin):
    """Global condition (FlexDiffuse style): ``empty_prompt + ramp[i] * clip_image_embedding`` for token i.

    ``empty_prompt`` [1, 77, D] is the text encoder's output for the empty prompt, computed once and stored (the text
    encoder is not needed afterwards); ``ramp`` [77] are the learned coefficients, initialised to i / 77.
    """

    @register_to_config
    def __init__(self, num_tokens: int = NUM_TOKENS, embed_dim: int = 1024):
        super().__init__()
        self.ramp = torch.nn.Parameter(torch.arange(num_tokens, dtype=torch.float32) / num_tokens)
        self.register_buffer("empty_prompt", torch.zeros(1, num_tokens, embed_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"image embeddings must be [B, {self.config.embed_dim}], got {tuple(image_embeds.shape)} "
                "(the CLIP projection size must equal the UNet's cross-attention size)"
            )
        return self.empty_prompt + self.ramp[:, None] * image_embeds[:, None, :]


# ------------------------------------------------------------------------------------------------------ input
def to_condition_tensor(image, size: int) -> torch.Tensor:
    """PIL image(s) / uint8 or float arrays / tensors in [0, 1] -> ``[B, 3, size, size]`` float in [0, 1].

    RGBA images are composited on gray; non-square images are padded to a square with gray, then resized.
    """
    if isinstance(image, (list, tuple)):
        return torch.cat([to_condition_tensor(im, size) for im in image])
    if isinstance(image, Image.Image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        x = torch.from_numpy(rgba[..., :3] * rgba[..., 3:] + GRAY * (1.0 - rgba[..., 3:])).permute(2, 0, 1)[None]
    elif isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"array images must be [H, W, 3|4], got shape {image.shape}")
        if arr.shape[-1] == 4:
            arr = arr[..., :3] * arr[..., 3:] + GRAY * (1.0 - arr[..., 3:])
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tensor images must be [3, H, W] or [B, 3, H, W] in [0, 1], got {tuple(image.shape)}")
        x = x.float()
    else:
        raise TypeError(f"unsupported condition image type {type(image).__name__}")
    h, w = x.shape[-2:]
    if h != w:
        m = max(h, w)
        top, left = (m - h) // 2, (m - w) // 2
        x = F.pad(x, (left, m - w - left, top, m - h - top), value=GRAY)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


@dataclass
class MultiViewPipelineOutput(BaseOutput):
    """``views``: six PIL images (a list of such lists for a batch input), or a tensor ``[B, 6, 3, h, w]`` in [0, 1]
    with ``output_type="pt"``; ``grid``: the tiled 3x2 grid (PIL, a list of them, or ``[B, 3, 3h, 2w]``)."""

    views: list | torch.Tensor
    grid: Image.Image | list | torch.Tensor


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------------- pipeline
class MultiViewDiffusionPipeline(DiffusionPipeline):
    """One condition image -> six views (3x2 grid, rows (az+30, az+90) / (az+150, az+210) / (az+270, az+330))."""

    model_cpu_offload_seq = "image_encoder->unet->vae"

    def __init__(
        self,
        unet,
        vae,
        scheduler,
        image_encoder,
        feature_extractor,
        conditioner: GlobalConditioner,
        view_size: int = 320,
        cond_size: int = 320,
        condition_concat: bool = False,
    ):
        super().__init__()
        install_reference_attention(unet)
        self.register_modules(
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            conditioner=conditioner,
        )
        self.register_to_config(view_size=view_size, cond_size=cond_size, condition_concat=condition_concat)

    def encode_condition(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition images in [0, 1] -> (encoder hidden states [B, 77, D], reference latents [B, C, h, w])."""
        pixels = clip_pixels(images, self.feature_extractor).to(device=self.image_encoder.device)
        embeds = self.image_encoder(pixel_values=pixels.to(self.image_encoder.dtype)).image_embeds
        hidden = self.conditioner(embeds.to(self.conditioner.dtype))
        return hidden.to(self.unet.dtype), encode_reference(self.vae, images.to(self.vae.device))

    @torch.no_grad()
    def __call__(
        self,
        image,
        num_inference_steps: int = 28,
        guidance_scale: float = 4.0,
        sampler: str = "euler_a",
        generator: torch.Generator | list[torch.Generator] | None = None,
        view_size: int | None = None,
        cond_size: int | None = None,
        output_type: str = "pil",
    ) -> MultiViewPipelineOutput:
        """Generate the six views of ``image`` (PIL / array / tensor in [0, 1], or a list of them).

        ``view_size``: pixels per generated view (default: the trained size in the config); ``cond_size``: size the
        condition is resized to; ``sampler``: ``"euler_a"`` (Euler-ancestral) or ``"ddim"``, trailing spacing;
        ``guidance_scale`` <= 1 turns classifier-free guidance off; ``output_type``: ``"pil"`` or ``"pt"``.
        """
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        view_size = int(view_size or self.config.view_size)
        cond_size = int(cond_size or self.config.cond_size)
        factor = vae_scale_factor(self.vae)
        for name, value in (("view_size", view_size), ("cond_size", cond_size)):
            if value % factor:
                raise ValueError(f"{name}={value} must be a multiple of the VAE downsampling factor {factor}")
        single = not isinstance(image, (list, tuple)) and not (isinstance(image, torch.Tensor) and image.ndim == 4)
        device = self._execution_device
        cond = to_condition_tensor(image, cond_size).to(device)
        batch = cond.shape[0]
        guided = guidance_scale > 1.0
        if guided:  # unconditional branch: a gray condition image (both the reference latent and the CLIP embedding)
            cond = torch.cat([torch.full_like(cond, GRAY), cond])
        hidden, ref_latents = self.encode_condition(cond)
        ref_latents = ref_latents.to(self.unet.dtype)
        concat = (None, None)
        if self.config.condition_concat:
            concat = concat_condition(self.vae, cond.to(self.vae.device), view_size)

        scheduler = make_sampler(sampler, self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        alphas_cumprod = scheduler.alphas_cumprod
        shape = (batch, self.vae.config.latent_channels, GRID_ROWS * view_size // factor, GRID_COLS * view_size // factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        for t in self.progress_bar(scheduler.timesteps):
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t).to(self.unet.dtype)
            noise = randn_tensor(
                ref_latents.shape,
                generator=None if generator is None else _first(generator),
                device=device,
                dtype=ref_latents.dtype,
            )
            ref = noisy_reference(ref_latents, t, noise, alphas_cumprod)
            x, ref = with_condition_channels(x, concat[0]), with_condition_channels(ref, concat[1])
            v = reference_forward(self.unet, x, t, hidden, ref)
            if guided:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents, generator=generator).prev_sample.to(self.unet.dtype)

        grids = decode_latents(self.vae, latents).float()  # [B, 3, 3h, 2w]
        self.maybe_free_model_hooks()
        if output_type == "pt":
            return MultiViewPipelineOutput(views=untile(grids), grid=grids)
        views = [[_to_pil(v) for v in untile(g)] for g in grids]
        pil_grids = [_to_pil(g) for g in grids]
        if single:
            return MultiViewPipelineOutput(views=views[0], grid=pil_grids[0])
        return MultiViewPipelineOutput(views=views, grid=pil_grids)


def _first(generator):
    """The generator that draws the reference noise: the first of a per-sample list, or the single one."""
    return generator[0] if isinstance(generator, (list, tuple)) else generator
