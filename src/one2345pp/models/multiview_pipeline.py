"""The exported multi-view generator: a diffusers ``DiffusionPipeline`` (one image -> six views tiled 3x2).

Components: ``unet`` (``UNet2DConditionModel`` with reference attention installed on every ``attn1``), ``vae``
(``AutoencoderKL``), ``scheduler`` (the noise schedule, stored as Euler-ancestral; its config -- betas, prediction type,
timestep spacing -- is what the samplers are built from), ``image_encoder`` (``CLIPVisionModelWithProjection``),
``feature_extractor`` (``CLIPImageProcessor``, whose resize and normalisation values are applied here) and
``conditioner`` (:class:`GlobalConditioner`: the stored empty-prompt embedding and the 77 learned ramp coefficients).
``save_pretrained`` writes ``model_index.json`` and one folder per component (safetensors);
``MultiViewDiffusionPipeline.from_pretrained(folder)`` restores everything.

The conditioning and normalisation follow the published ``Zero123PlusPipeline`` (``shared/design/METHOD.md``,
stage 1): RGBA inputs pasted on uint8 gray 127; the reference latent is a VAE posterior sample of the condition resized
(PIL's bicubic filter) to ``cond_size``, without the VAE scaling factor; the CLIP input is made from the original
(un-resized) image by the CLIP processor's resize / crop / normalisation; target latents
``(z * scaling_factor - 0.22) * 0.75``, target images scaled by 0.5 / 0.8 before the VAE. The unconditional branch of
classifier-free guidance (:func:`unconditional_condition`) is the plain empty-prompt embedding (no image term) with the
reference latent of a gray image; training's condition dropout uses the same function. One deliberate difference: a
non-square input is padded to a square with gray (the published processors crop its centre). The training module
(:mod:`one2345pp.stages.multiview`) uses the same functions, so its samples and the exported pipeline's agree for the
same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
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
    "COMPOSITE_LEVEL",
    "GRAY",
    "NUM_TOKENS",
    "SAMPLERS",
    "SCHEDULE_KEYS",
    "TRAIN_SCHEDULE",
    "GlobalConditioner",
    "MultiViewDiffusionPipeline",
    "MultiViewPipelineOutput",
    "bicubic_resize",
    "bilinear_resize",
    "clip_pixels",
    "concat_condition",
    "condition_inputs",
    "condition_latent",
    "decode_latents",
    "encode_reference",
    "encode_target",
    "target_posterior",
    "global_condition",
    "make_sampler",
    "scale_image",
    "scale_latents",
    "training_scheduler",
    "unconditional_condition",
    "unscale_image",
    "unscale_latents",
    "vae_scale_factor",
    "with_condition_channels",
]

NUM_TOKENS = 77  # text-encoder sequence length; one ramp coefficient per token
GRAY = 0.5  # the unconditional branch's condition image (0 in the VAE's [-1, 1] input, as published), in [0, 1]
COMPOSITE_LEVEL = 127  # uint8 gray the published pipeline pastes RGBA inputs on (also the padding of non-square ones)
# Zero123++: linear betas 0.00085 -> 0.012 over 1000 steps, v-prediction
TRAIN_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
}
# the scheduler config keys that define the noise schedule (shared by training and sampling)
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75
IMAGE_SCALE = 0.5 / 0.8
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's VAE scaling factor, the one Zero123++'s reference latent is read with
SAMPLERS = ("euler_a", "ddim")
# what a folder without its own sampling defaults (written before they were recorded) is sampled with: the method's
# guidance 4 and the published pipeline's 28 steps
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_NUM_INFERENCE_STEPS = 28
DEFAULT_NUM_CANDIDATES = 1  # one sample per input, as published


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


def target_posterior(vae, images: torch.Tensor):
    """Target grids in [0, 1] ``[B, 3, 3H, 2W]`` -> the VAE's posterior over their raw latents."""
    return vae.encode(scale_image(images.to(vae.dtype) * 2.0 - 1.0)).latent_dist


def encode_target(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Target grids in [0, 1] ``[B, 3, 3H, 2W]`` -> normalised diffusion latents (a posterior sample)."""
    return scale_latents(target_posterior(vae, images).sample(generator), vae.config.scaling_factor)


def encode_reference(vae, images: torch.Tensor, generator=None) -> torch.Tensor:
    """Condition images in [0, 1] -> the reference latent: a posterior sample (as published; drawn from
    ``generator``, a per-sample list of them, or the global RNG), not multiplied by SD's scaling factor.

    Zero123++ leaves SD's latent unscaled, which makes the reference 1 / 0.18215 = 5.5x larger than a diffusion latent
    (the paper's "scaled by 5"): noised to the same t, it keeps a 5.5x higher signal-to-noise ratio than the target.
    That ratio is what matters, so for a VAE with another scaling factor (the tiny preset's fitted VAE: about 2, where
    the raw latent is *smaller* than a diffusion latent) the latent is multiplied by ``scaling_factor / 0.18215``; for
    SD's VAE the factor is exactly 1, so Zero123++ weights read the latent they were trained on.
    """
    z = vae.encode(images.to(vae.dtype) * 2.0 - 1.0).latent_dist.sample(generator)
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
    one_view = bilinear_resize(images, (view_size, view_size))
    grid = condition_latent(vae, one_view).repeat(1, 1, GRID_ROWS, GRID_COLS)
    return grid, condition_latent(vae, images)


def with_condition_channels(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the concatenated-condition channels appended (unchanged when the model has none)."""
    return x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised diffusion latents -> images in [0, 1]."""
    z = unscale_latents(latents.to(vae.dtype), vae.config.scaling_factor)
    return ((unscale_image(vae.decode(z).sample) + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ resampling
def _cubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a, x = -0.5, np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


@lru_cache(maxsize=64)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PIL's bicubic resampling along one axis (Pillow's ``precompute_coeffs``: the
    kernel widened by the downscaling factor, taps normalised to sum 1)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        k = _cubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        w[i, lo:hi] = k / k.sum() if k.sum() != 0.0 else k
    return w


def bilinear_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, h, w]``, bilinear with antialiasing, clamped to [0, 1]; unchanged when already
    that size (the concatenated condition's view, the validation sheets)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def bicubic_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., h, w]`` with PIL's bicubic filter (what the published CLIP processors use), in float
    (PIL resamples 8-bit images in 8 bits), clamped to [0, 1] as PIL's 8-bit output is."""
    h, w = int(size[0]), int(size[1])
    if tuple(images.shape[-2:]) == (h, w):
        return images.float().clamp(0.0, 1.0)
    x = images.float()
    wh = torch.as_tensor(_bicubic_matrix(x.shape[-2], h), dtype=x.dtype, device=x.device)
    ww = torch.as_tensor(_bicubic_matrix(x.shape[-1], w), dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # float32 even under mixed precision
        return (wh @ x @ ww.T).clamp(0.0, 1.0)


def _size(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return value[key]
    except (KeyError, TypeError):
        return getattr(value, key, None)


def _clip_geometry(h: int, w: int, feature_extractor) -> tuple[int, int, int, int, int, int]:
    """CLIP processor geometry for an ``h x w`` image: resized size ``(nh, nw)`` (shortest edge to
    ``size["shortest_edge"]``, the other floored as transformers does), crop offsets and crop size."""
    ch = _size(feature_extractor.crop_size, "height")
    cw = _size(feature_extractor.crop_size, "width") or ch
    short = _size(feature_extractor.size, "shortest_edge") or min(ch, cw)
    if h <= w:
        nh, nw = short, int(short * w / h)
    else:
        nh, nw = int(short * h / w), short
    nh, nw = max(nh, ch), max(nw, cw)
    return nh, nw, (nh - ch) // 2, (nw - cw) // 2, ch, cw


def _normalise(x: torch.Tensor, feature_extractor) -> torch.Tensor:
    mean = torch.tensor(feature_extractor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(feature_extractor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def clip_pixels(images: torch.Tensor, feature_extractor) -> torch.Tensor:
    """CLIP input from images in [0, 1] ``[B, 3, H, W]`` with the feature extractor's values, in torch: shortest edge
    resized to ``size["shortest_edge"]`` (PIL's bicubic filter), centre crop to ``crop_size``, normalised by
    ``image_mean`` / ``image_std``."""
    nh, nw, top, left, ch, cw = _clip_geometry(*images.shape[-2:], feature_extractor)
    x = bicubic_resize(images, (nh, nw))[..., top : top + ch, left : left + cw]
    return _normalise(x, feature_extractor)


def make_sampler(name: str, config):
    """Inference scheduler ``euler_a`` (Euler-ancestral) or ``ddim`` over a scheduler config as it is (betas,
    prediction type, timestep spacing: trailing in every config this project writes; ddim without sample clipping)."""
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def training_scheduler(config) -> DDPMScheduler:
    """The DDPM noise schedule training adds noise with, from a (sampler's) scheduler config: the same betas and
    prediction type (as the published pipeline builds its training scheduler from the folder's)."""
    return DDPMScheduler(**{k: config[k] for k in SCHEDULE_KEYS if k in config})


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
def _rgb(image: Image.Image) -> Image.Image:
    """RGB as published: RGBA (and other modes with alpha) pasted with its alpha on uint8 gray 127."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (COMPOSITE_LEVEL,) * 3)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _square_pil(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    m = max(w, h)
    out = Image.new("RGB", (m, m), (COMPOSITE_LEVEL,) * 3)
    out.paste(image, ((m - w) // 2, (m - h) // 2))
    return out


def _square_tensor(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h == w:
        return x
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    return F.pad(x, (left, m - w - left, top, m - h - top), value=COMPOSITE_LEVEL / 255.0)


def _originals(image) -> list:
    """Condition input(s) -> RGB originals: 8-bit PIL images (PIL input, uint8 arrays) or float tensors
    ``[N, 3, H, W]`` in [0, 1] (tensors, float arrays), composited on gray and padded to squares, not resized."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("empty list of condition images")
        return [o for im in image for o in _originals(im)]
    if isinstance(image, Image.Image):
        return [_square_pil(_rgb(image))]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"array images must be [H, W, 3|4], got shape {image.shape}")
        if image.dtype == np.uint8:
            return [_square_pil(_rgb(Image.fromarray(np.ascontiguousarray(image))))]
        arr = image.astype(np.float32)
        if arr.shape[-1] == 4:
            arr = arr[..., :3] * arr[..., 3:] + COMPOSITE_LEVEL / 255.0 * (1.0 - arr[..., 3:])
        return [_square_tensor(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]).clamp(0.0, 1.0)]
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tensor images must be [3, H, W] or [B, 3, H, W] in [0, 1], got {tuple(image.shape)}")
        return [_square_tensor(x.float()).clamp(0.0, 1.0)]
    raise TypeError(f"unsupported condition image type {type(image).__name__}")


def _pil_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def condition_inputs(image, cond_size: int, feature_extractor) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition input(s) -> (reference images ``[B, 3, cond_size, cond_size]`` in [0, 1], CLIP input).

    As the published pipeline's two feature extractors: the reference image is the original resized to
    ``cond_size`` with the bicubic filter (``feature_extractor_vae``); the CLIP input is made from the original
    (not the resized reference) by the CLIP processor's resize / crop / normalisation. PIL images and uint8 arrays are
    resized by PIL itself, in 8 bits, exactly as the published processors do; tensors and float arrays by
    :func:`bicubic_resize`, the same filter in float.
    """
    refs, clips = [], []
    for item in _originals(image):
        if isinstance(item, Image.Image):
            refs.append(_pil_tensor(item.resize((cond_size, cond_size), Image.Resampling.BICUBIC)))
            nh, nw, top, left, ch, cw = _clip_geometry(item.height, item.width, feature_extractor)
            x = _pil_tensor(item.resize((nw, nh), Image.Resampling.BICUBIC))[..., top : top + ch, left : left + cw]
            clips.append(_normalise(x, feature_extractor))
        else:
            refs.append(bicubic_resize(item, (cond_size, cond_size)))
            clips.append(clip_pixels(item, feature_extractor))
    return torch.cat(refs), torch.cat(clips)


def global_condition(image_encoder, conditioner: GlobalConditioner, clip_input: torch.Tensor) -> torch.Tensor:
    """CLIP input -> encoder hidden states of the conditional branch: empty prompt + ramp x CLIP image embedding."""
    pixels = clip_input.to(device=image_encoder.device, dtype=image_encoder.dtype)
    embeds = image_encoder(pixel_values=pixels).image_embeds
    return conditioner(embeds.to(device=conditioner.empty_prompt.device, dtype=conditioner.dtype))


def unconditional_condition(
    conditioner: GlobalConditioner, vae, batch: int, size: int, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition of the unconditional branch, for classifier-free guidance in sampling and for the dropped
    samples of training's condition dropout: (the plain empty-prompt embedding -- no image term -- ``[batch, 77, D]``,
    the reference latent of a gray ``size x size`` image -- zero in the VAE's [-1, 1] input, as published)."""
    hidden = conditioner.empty_prompt.expand(batch, -1, -1)
    gray = torch.full((batch, 3, size, size), GRAY, device=vae.device, dtype=vae.dtype)
    return hidden, encode_reference(vae, gray, generator)


@dataclass
class MultiViewPipelineOutput(BaseOutput):
    """``views``: six PIL images (a list of such lists for a batch input), or a tensor ``[B, 6, 3, h, w]`` in [0, 1]
    with ``output_type="pt"``; ``grid``: the tiled 3x2 grid (PIL, a list of them, or ``[B, 3, 3h, 2w]``)."""

    views: list | torch.Tensor
    grid: Image.Image | list | torch.Tensor


def consensus(grids: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """Of each input's ``num_candidates`` grids (consecutive along the batch, ``[B * k, 3, H, W]``), the one nearest
    their mean -> ``[B, 3, H, W]``. That candidate has the least summed squared distance to the others: the
    minimum-Bayes-risk choice under mean squared error, a sharp sample that agrees most with the rest."""
    if num_candidates == 1:
        return grids
    g = grids.view(-1, num_candidates, *grids.shape[1:])
    dist = (g.float() - g.float().mean(dim=1, keepdim=True)).square().flatten(2).sum(dim=2)  # [B, k]
    return g[torch.arange(g.shape[0]), dist.argmin(dim=1)]


def _per_candidate(generator, num_candidates: int):
    """A per-input list of generators repeated for each input's candidates (they draw in turn from it)."""
    if isinstance(generator, (list, tuple)):
        return [g for g in generator for _ in range(num_candidates)]
    return generator


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
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        num_candidates: int = DEFAULT_NUM_CANDIDATES,
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
        # guidance_scale, num_inference_steps, num_candidates: the defaults of __call__, the sampling the model was
        # validated with (the method's 4; the published pipeline's 28 steps and one sample per input)
        self.register_to_config(
            view_size=view_size,
            cond_size=cond_size,
            condition_concat=condition_concat,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            num_candidates=num_candidates,
        )

    @torch.no_grad()
    def encode_condition(
        self, image, cond_size: int | None = None, guided: bool = True, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition input(s) -> (encoder hidden states ``[N, 77, D]``, reference latents ``[N, C, h, w]``): with
        ``guided``, the unconditional branch (:func:`unconditional_condition`) then the conditional one along the
        batch (N = 2B), else the conditional branch alone. The posterior samples are drawn from ``generator``: the
        conditional reference first, then the unconditional one (the published order)."""
        cond_size = int(cond_size or self.config.cond_size)
        refs, clip_input = condition_inputs(image, cond_size, self.feature_extractor)
        return self.encode_inputs(refs, clip_input, guided, generator)

    def encode_inputs(self, refs: torch.Tensor, clip_input: torch.Tensor, guided: bool, generator):
        """:meth:`encode_condition` from the outputs of :func:`condition_inputs`."""
        hidden = global_condition(self.image_encoder, self.conditioner, clip_input)
        ref = encode_reference(self.vae, refs.to(self.vae.device), generator)
        if guided:
            size = refs.shape[-1]
            u_hidden, u_ref = unconditional_condition(self.conditioner, self.vae, refs.shape[0], size, generator)
            hidden, ref = torch.cat([u_hidden, hidden]), torch.cat([u_ref, ref])
        device = self._execution_device
        return hidden.to(device=device, dtype=self.unet.dtype), ref.to(device=device, dtype=self.unet.dtype)

    def sampling_defaults(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_candidates: int | None = None,
    ) -> tuple[int, float, int]:
        """(steps, guidance, candidates) to sample with: each given value, else the folder's own (the sampling it
        was validated with), else the defaults of folders that do not record them."""
        if num_inference_steps is None:
            num_inference_steps = self.config.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS)
        if guidance_scale is None:
            guidance_scale = self.config.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        if num_candidates is None:
            num_candidates = self.config.get("num_candidates", DEFAULT_NUM_CANDIDATES)
        return int(num_inference_steps), float(guidance_scale), int(num_candidates)

    @torch.no_grad()
    def __call__(
        self,
        image,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str = "euler_a",
        generator: torch.Generator | list[torch.Generator] | None = None,
        view_size: int | None = None,
        cond_size: int | None = None,
        output_type: str = "pil",
        num_candidates: int | None = None,
    ) -> MultiViewPipelineOutput:
        """Generate the six views of ``image`` (PIL / array / tensor in [0, 1], or a list of them).

        ``view_size``: pixels per generated view (default: the trained size in the config); ``cond_size``: size the
        reference image is resized to (the CLIP input is made from the original); ``sampler``: ``"euler_a"``
        (Euler-ancestral) or ``"ddim"``, over the stored scheduler's config (trailing spacing where this project wrote
        it); ``guidance_scale``: None takes the folder's ``guidance_scale`` (the scale it was validated with, 4 unless
        its training set another), <= 1 turns classifier-free guidance off; ``num_inference_steps``: None takes the
        folder's (28 unless its training validated another); ``output_type``: ``"pil"`` or ``"pt"``;
        ``num_candidates``: grids drawn per input, of which the one nearest their mean is returned (:func:`consensus`;
        None takes the folder's, 1 unless its training validated more). A list of generators gives one per input.
        """
        # 1. the sampling settings and sizes
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        num_inference_steps, guidance_scale, num_candidates = self.sampling_defaults(
            num_inference_steps, guidance_scale, num_candidates
        )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        view_size = int(view_size or self.config.view_size)
        cond_size = int(cond_size or self.config.cond_size)
        factor = vae_scale_factor(self.vae)
        for name, value in (("view_size", view_size), ("cond_size", cond_size)):
            if value % factor:
                raise ValueError(f"{name}={value} must be a multiple of the VAE downsampling factor {factor}")
        single = not isinstance(image, (list, tuple)) and not (isinstance(image, torch.Tensor) and image.ndim == 4)
        device = self._execution_device
        guided = guidance_scale > 1.0
        # 2. the condition, each input repeated for its candidates
        refs, clip_input = condition_inputs(image, cond_size, self.feature_extractor)
        refs, clip_input = refs.repeat_interleave(num_candidates, 0), clip_input.repeat_interleave(num_candidates, 0)
        generator = _per_candidate(generator, num_candidates)
        hidden, ref_latents = self.encode_inputs(refs, clip_input, guided, generator)
        batch = refs.shape[0]
        concat = (None, None)
        if self.config.condition_concat:  # the unconditional branch's condition is the gray image here too
            refs = torch.cat([torch.full_like(refs, GRAY), refs]) if guided else refs
            concat = concat_condition(self.vae, refs.to(self.vae.device), view_size)

        # 3. denoise from pure noise
        scheduler = make_sampler(sampler, self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        alphas_cumprod = scheduler.alphas_cumprod
        rows, cols = GRID_ROWS * view_size // factor, GRID_COLS * view_size // factor
        shape = (batch, self.vae.config.latent_channels, rows, cols)
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

        # 4. decode, keep each input's consensus candidate
        grids = consensus(decode_latents(self.vae, latents).float(), num_candidates)  # [B, 3, 3h, 2w]
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
