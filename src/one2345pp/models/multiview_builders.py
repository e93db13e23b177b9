"""Every component of the multi-view stage, built from config: pretrained folders / hub ids or random presets.

``model.pretrained`` may name

* a Stable Diffusion 2 diffusers folder or hub id (``unet``, ``vae``, ``text_encoder``, ``tokenizer``): the UNet keeps
  its input and attention layout; the CLIP vision encoder comes from ``model.image_encoder`` (SD2 has none); the ramp
  coefficients start at i / 77;
* a Zero123++ diffusers folder (its ``model_index.json`` holds ``ramping_coefficients``; the CLIP encoder and its
  processor are the ``vision_encoder`` and ``feature_extractor_clip`` components);
* a folder exported by this stage (:class:`MultiViewDiffusionPipeline`), to continue training from it;
* nothing (``null``): every part is initialised at random from the preset ``model.preset`` — ``tiny`` (64 px views,
  a UNet of about 3M parameters, a tiny VAE, tiny CLIP vision and text encoders) or ``full`` (the sizes of SD2 and
  OpenCLIP ViT-H/14; the UNet has about 866M parameters). Random initialisation draws from ``model.init_seed`` only,
  so a rebuild gives the same weights.

In every case the empty-prompt embedding is computed once with the text encoder, stored in the
:class:`GlobalConditioner`, and the text encoder is dropped.

The scheduler (the noise schedule of training and of the samplers) comes from the folder's
``scheduler/scheduler_config.json`` for Zero123++ and exported folders, as it is (betas, prediction type, timestep
spacing); its prediction type must be ``v_prediction`` (the stage's loss target), and a schedule other than the
method's is used with a logged warning. A Stable Diffusion 2 folder's schedule is replaced by the method's (linear
betas, v-prediction, Euler-ancestral with trailing spacing; ``shared/design/METHOD.md``, stage 1), with a logged
warning naming every value that changes. Random presets use the method's schedule.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from one2345pp.models.multiview_pipeline import (
    NUM_TOKENS,
    SCHEDULE_KEYS,
    TRAIN_SCHEDULE,
    GlobalConditioner,
    MultiViewDiffusionPipeline,
)
from one2345pp.models.reference_attention import install_reference_attention

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

__all__ = [
    "PRESETS",
    "MultiViewComponents",
    "MultiViewModelConfig",
    "build_components",
    "build_unet",
    "empty_prompt_embedding",
    "folder_scheduler",
    "inference_scheduler",
    "pretrained_kind",
    "random_components",
]

log = logging.getLogger(__name__)


@dataclass
class MultiViewModelConfig:
    pretrained: str | None = None  # SD2 / Zero123++ / exported diffusers folder or hub id; None: random from preset
    preset: str = "tiny"  # random-init sizes when pretrained is None: "tiny" or "full"
    image_encoder: str | None = None  # CLIP vision (with projection) folder / hub id when pretrained has none (SD2)
    image_encoder_subfolder: str | None = None
    init_seed: int = 0  # seed of the random initialisation (pretrained: unused parts only)
    view_size: int = 64  # pixels per generated view: the exported pipeline's default output size
    cond_size: int = 64  # the exported pipeline resizes the condition image to this size
    # Departure from the method for models trained from scratch (the tiny preset): the clean condition latent is
    # also concatenated to the UNet input in every tile (models/multiview_pipeline.concat_condition), which doubles
    # the UNet's input channels. Zero123++ relies on SD2's pretrained prior to read the condition through reference
    # attention alone; a random tiny UNet did not learn to (docs/multiview_conditioning.md). A pretrained SD2 /
    # Zero123++ UNet has 4 input channels, so this stays off for them.
    condition_concat: bool = False
    # Widths of the random preset's UNet levels (its ``block_out_channels``); null keeps the preset's. Only for
    # random initialisation: a pretrained folder's UNet has its own.
    unet_channels: list[int] | None = None
    # Latent channels of the random preset's VAE (the UNet's input and output follow); null keeps the preset's 4.
    # Only for random initialisation: a pretrained folder's VAE has its own.
    latent_channels: int | None = None


PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "unet": {
            "sample_size": 32,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 128),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": (2, 4, 8),  # diffusers' name for the number of heads
            "use_linear_projection": True,
            "norm_num_groups": 8,
        },
        "vae": {
            "block_out_channels": (16, 32, 32, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "latent_channels": 4,
            # 4 channels per group at the 16-channel level: the VAE fit's init needs >= 4 (stages/multiview.py)
            "norm_num_groups": 4,
            "sample_size": 64,
            "scaling_factor": 0.18215,
        },
        "image_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 64,
        },
        "text_encoder": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 1000,
            "max_position_embeddings": NUM_TOKENS,
            "bos_token_id": 998,
            "eos_token_id": 999,
            "pad_token_id": 0,
            "projection_dim": 64,
        },
        "feature_extractor": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    },
    "full": {  # Stable Diffusion 2 (v-model) UNet and VAE, OpenCLIP ViT-H/14 vision and text towers
        "unet": {
            "sample_size": 96,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 768,
            "scaling_factor": 0.18215,
        },
        "image_encoder": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 1024,
            "hidden_act": "gelu",
        },
        "text_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,  # SD2 uses the penultimate layer of the 24-layer tower
            "num_attention_heads": 16,
            "vocab_size": 49408,
            "max_position_embeddings": NUM_TOKENS,
            "hidden_act": "gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
            "projection_dim": 1024,
        },
        "feature_extractor": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
    },
}


@dataclass
class MultiViewComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor
    conditioner: GlobalConditioner
    scheduler: EulerAncestralDiscreteScheduler

    def pipeline(self, view_size: int, cond_size: int, **config) -> MultiViewDiffusionPipeline:
        """The pipeline over these components; ``config``: its other config values (``condition_concat``,
        ``guidance_scale``)."""
        return MultiViewDiffusionPipeline(
            unet=self.unet,
            vae=self.vae,
            scheduler=self.scheduler,
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            conditioner=self.conditioner,
            view_size=view_size,
            cond_size=cond_size,
            **config,
        )


def _preset(name: str) -> dict[str, dict]:
    if name not in PRESETS:
        raise ValueError(f"unknown model.preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_unet(preset: str, device: str | torch.device | None = None) -> UNet2DConditionModel:
    """A randomly initialised UNet of a preset (``device="meta"`` builds it without allocating weights)."""
    with torch.device(device or "cpu"):
        return UNet2DConditionModel(**_preset(preset)["unet"])


def inference_scheduler() -> EulerAncestralDiscreteScheduler:
    """The stored scheduler: the training schedule, Euler-ancestral sampling with trailing timestep spacing."""
    return EulerAncestralDiscreteScheduler(**TRAIN_SCHEDULE, timestep_spacing="trailing")


def _schedule_differences(config) -> dict[str, tuple]:
    """Noise-schedule values of a scheduler config that differ from the method's: ``{key: (folder, method)}``."""
    method = EulerAncestralDiscreteScheduler(**TRAIN_SCHEDULE).config
    out = {}
    for key in SCHEDULE_KEYS:
        a, b = config.get(key), method.get(key)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            out[key] = (a, b)
    return out


def folder_scheduler(source: str, kind: str) -> EulerAncestralDiscreteScheduler:
    """The scheduler of a pretrained folder (``kind`` from :func:`pretrained_kind`), from its
    ``scheduler/scheduler_config.json`` (see the module docstring for what is kept, refused or replaced)."""
    name = f"{source}/scheduler/scheduler_config.json"
    try:
        config = EulerAncestralDiscreteScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError) as exn:
        log.warning("%s: not readable (%s); using the method's schedule %s", name, exn, TRAIN_SCHEDULE)
        return inference_scheduler()
    scheduler = EulerAncestralDiscreteScheduler.from_config(config)  # missing keys: the class defaults
    diff = _schedule_differences(scheduler.config)
    text = ", ".join(f"{k}={a!r} (method: {b!r})" for k, (a, b) in diff.items())
    if kind == "sd2":
        if diff:
            log.warning(
                "%s: %s; the multi-view stage replaces Stable Diffusion 2's schedule by the method's "
                "(linear betas 0.00085-0.012, v-prediction, Euler-ancestral with trailing spacing) for training and "
                "sampling%s",
                name,
                text,
                " -- this UNet was trained to predict epsilon and learns v from here"
                if scheduler.config.prediction_type == "epsilon"
                else "",
            )
        return inference_scheduler()
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError(
            f"{name}: prediction_type={scheduler.config.prediction_type!r}; the multi-view stage trains and samples "
            "v-prediction (its loss target), so it cannot continue from this folder"
        )
    if diff:
        log.warning("%s: %s; training and sampling follow the folder's schedule", name, text)
    return scheduler


def empty_prompt_embedding(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state for the (tokenised) empty prompt, ``[1, L, D]``."""
    with torch.no_grad():
        return text_encoder(input_ids.to(text_encoder.device))[0].float().cpu()


def _conditioner(embedding: torch.Tensor, ramp: list[float] | None = None) -> GlobalConditioner:
    _, n, d = embedding.shape
    cond = GlobalConditioner(num_tokens=n, embed_dim=d)
    cond.empty_prompt.copy_(embedding)
    if ramp is not None:
        if len(ramp) != n:
            raise ValueError(f"{len(ramp)} ramp coefficients for an empty-prompt embedding of {n} tokens")
        with torch.no_grad():
            cond.ramp.copy_(torch.tensor(ramp, dtype=torch.float32))
    return cond


def _freeze(module):
    return module.requires_grad_(False).eval()


def _check(c: MultiViewComponents, source: str, concat: bool = False) -> MultiViewComponents:
    unet, latent = c.unet.config, c.vae.config.latent_channels
    if unet.in_channels != latent * (2 if concat else 1) or unet.out_channels != latent:
        need = f"{2 * latent} (latents + the concatenated condition)" if concat else str(latent)
        raise ValueError(
            f"{source}: UNet channels in/out {unet.in_channels}/{unet.out_channels}; with the VAE's {latent} latent "
            f"channels and model.condition_concat={concat} they must be {need}/{latent}"
        )
    proj = c.image_encoder.config.projection_dim
    if proj != unet.cross_attention_dim or c.conditioner.config.embed_dim != unet.cross_attention_dim:
        raise ValueError(
            f"{source}: CLIP projection ({proj}) and empty-prompt embedding ({c.conditioner.config.embed_dim}) must "
            f"both have the UNet's cross-attention size {unet.cross_attention_dim}"
        )
    install_reference_attention(c.unet)
    _freeze(c.vae)
    _freeze(c.image_encoder)
    return c


def random_components(
    preset: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    condition_concat: bool = False,
    unet_channels: list[int] | tuple[int, ...] | None = None,
    latent_channels: int | None = None,
) -> MultiViewComponents:
    """Every component at random from a preset, drawn from ``seed`` (global RNG state left untouched);
    ``condition_concat`` doubles the UNet's input channels for the concatenated condition; ``unet_channels``
    replaces the preset UNet's level widths, ``latent_channels`` the VAE's latent channels (the UNet's input and
    output follow).

    ``device``: where the networks are built and initialised (``"cuda"`` skips the slow CPU initialisation of the
    full preset; the draws then come from the CUDA generator, so the weights differ from a CPU build).
    """
    p = _preset(preset)
    device = torch.device(device)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []  # manual_seed seeds them
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_vae_config(p["vae"], latent_channels))
        latent = vae.config.latent_channels
        unet = UNet2DConditionModel(
            **_unet_config(p["unet"], unet_channels),
            in_channels=latent * (2 if condition_concat else 1),
            out_channels=latent,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**p["image_encoder"]))
        text_cfg = CLIPTextConfig(**p["text_encoder"])
        text_encoder = CLIPTextModel(text_cfg).eval()
    n = text_cfg.max_position_embeddings
    ids = torch.tensor([[text_cfg.bos_token_id, text_cfg.eos_token_id] + [text_cfg.pad_token_id] * (n - 2)])
    conditioner = _conditioner(empty_prompt_embedding(text_encoder, ids)).to(device)
    c = MultiViewComponents(
        unet, vae, image_encoder, _processor(**p["feature_extractor"]), conditioner, inference_scheduler()
    )
    return _check(c, f"preset {preset!r}", condition_concat)


def _processor_class():
    """CLIP's image processor class; the PIL backend where transformers has one (no torchvision needed). Only its
    resize / normalisation values are used, in torch (:func:`clip_pixels`)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _processor(**kwargs) -> CLIPImageProcessor:
    return _processor_class()(**kwargs)


def _read_index(source: str) -> dict:
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"model.pretrained={source!r} is a folder without model_index.json")
        return json.loads(index.read_text())
    if path.exists() or source.startswith((".", "/")):
        raise FileNotFoundError(f"model.pretrained={source!r} is not a diffusers folder")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    except Exception as exn:
        raise FileNotFoundError(
            f"model.pretrained={source!r}: no local folder, and the hub gave no model_index.json ({exn})"
        ) from exn


def pretrained_kind(index: dict) -> str:
    """``export`` (this stage's pipeline), ``zero123plus`` or ``sd2`` from a ``model_index.json``."""
    if index.get("_class_name") == MultiViewDiffusionPipeline.__name__:
        return "export"
    if "ramping_coefficients" in index:
        return "zero123plus"
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if c not in index]
    if missing:
        raise ValueError(
            f"model_index.json ({index.get('_class_name')}) lacks {missing}: not a Stable Diffusion 2, "
            "Zero123++ or exported multi-view folder"
        )
    return "sd2"


def _text_embedding(source: str) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval()
    n = text_encoder.config.max_position_embeddings  # 77 for SD2
    ids = tokenizer("", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return empty_prompt_embedding(text_encoder, ids)


def _unet_config(preset_unet: dict, channels: list[int] | tuple[int, ...] | None) -> dict:
    if channels is None:
        return preset_unet
    levels = len(preset_unet["block_out_channels"])
    groups = preset_unet["norm_num_groups"]
    if len(channels) != levels or any(int(c) <= 0 or int(c) % groups for c in channels):
        raise ValueError(
            f"model.unet_channels={list(channels)} must give {levels} positive widths, each a multiple of the "
            f"preset's norm_num_groups={groups}"
        )
    return {**preset_unet, "block_out_channels": tuple(int(c) for c in channels)}


def _vae_config(preset_vae: dict, latent_channels: int | None) -> dict:
    if latent_channels is None:
        return preset_vae
    if int(latent_channels) < 1:
        raise ValueError(f"model.latent_channels={latent_channels} must be a positive number of channels")
    return {**preset_vae, "latent_channels": int(latent_channels)}


def _image_encoder(source: str, subfolder: str | None) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    kw = {"subfolder": subfolder} if subfolder else {}
    encoder = CLIPVisionModelWithProjection.from_pretrained(source, **kw)
    try:
        processor = _processor_class().from_pretrained(source, **kw)
    except OSError:  # a bare vision checkpoint: the standard CLIP preprocessing at the encoder's input size
        size = encoder.config.image_size
        log.info("%s has no preprocessor config; using CLIP's mean/std at %d px", source, size)
        processor = _processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return encoder, processor


def build_components(cfg: MultiViewModelConfig) -> MultiViewComponents:
    """All components for ``cfg`` (see the module docstring for what ``model.pretrained`` may name)."""
    if cfg.pretrained is None:
        return random_components(
            cfg.preset,
            cfg.init_seed,
            condition_concat=cfg.condition_concat,
            unet_channels=cfg.unet_channels,
            latent_channels=cfg.latent_channels,
        )
    src = cfg.pretrained
    if cfg.unet_channels is not None:
        raise ValueError(
            f"model.unet_channels={list(cfg.unet_channels)} sizes a randomly initialised UNet, but "
            f"model.pretrained={src!r} brings its own; set model.unet_channels=null"
        )
    if cfg.latent_channels is not None:
        raise ValueError(
            f"model.latent_channels={cfg.latent_channels} sizes a randomly initialised VAE, but "
            f"model.pretrained={src!r} brings its own; set model.latent_channels=null"
        )
    index = _read_index(src)
    kind = pretrained_kind(index)
    if kind == "export":
        pipe = MultiViewDiffusionPipeline.from_pretrained(src)
        scheduler = folder_scheduler(src, kind)
        c = MultiViewComponents(
            pipe.unet, pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.conditioner, scheduler
        )
        stored = bool(pipe.config.get("condition_concat", False))
        if stored != cfg.condition_concat:
            raise ValueError(
                f"model.condition_concat={cfg.condition_concat} but {src} holds a model with condition_concat="
                f"{stored} (set model.condition_concat={str(stored).lower()})"
            )
        return _check(c, src, stored)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae")
    ramp = None
    if kind == "zero123plus":
        ramp = [float(r) for r in index["ramping_coefficients"]]
        encoder = CLIPVisionModelWithProjection.from_pretrained(src, subfolder="vision_encoder")
        processor = _processor_class().from_pretrained(src, subfolder="feature_extractor_clip")
    else:
        if cfg.image_encoder is None:
            raise ValueError(
                f"model.pretrained={src!r} is a Stable Diffusion 2 folder without a CLIP image encoder; set "
                "model.image_encoder to a CLIPVisionModelWithProjection folder or hub id whose projection size "
                f"is {unet.config.cross_attention_dim} (ViT-H/14: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
            )
        encoder, processor = _image_encoder(cfg.image_encoder, cfg.image_encoder_subfolder)
    conditioner = _conditioner(_text_embedding(src), ramp)
    scheduler = folder_scheduler(src, kind)
    components = MultiViewComponents(unet, vae, encoder, processor, conditioner, scheduler)
    return _check(components, src, cfg.condition_concat)
