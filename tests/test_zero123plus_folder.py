"""A Zero123++ diffusers folder (the published layout, tiny random weights) read by the multi-view stage, checked
against the published ``Zero123PlusPipeline``'s function, computed here from the folder's own components: RGBA pasted
on gray 127; reference latent = VAE posterior sample of ``feature_extractor_vae``'s bicubic resize; CLIP input =
``feature_extractor_clip`` of the original image; conditional hidden states = empty prompt + ramp x CLIP image
embedding, unconditional = the plain empty prompt with the reference latent of a gray image (zeros in the VAE's
input); reference attention (record pass over the noised reference latent, read pass appending its ``attn1`` tokens);
Euler-ancestral sampling over the folder's scheduler with guidance. One generator draws, in the published order,
the conditional then the unconditional posterior samples, the initial latents, and per step the reference noise and
the sampler's noise."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from helpers.threads import one_thread  # noqa: F401 (an autouse fixture: one intra-op thread)
from one2345pp.config import load_config, to_object
from one2345pp.models.multiview_builders import (
    PRESETS,
    MultiViewModelConfig,
    build_components,
    folder_scheduler,
    random_components,
)
from one2345pp.models.multiview_pipeline import MultiViewDiffusionPipeline, bicubic_resize, make_sampler
from one2345pp.models.reference_attention import reference_forward
from one2345pp.stages.multiview import MultiViewConfig, MultiViewModule

ROOT = Path(__file__).resolve().parents[1]
VIEW, COND, CLIP = 32, 64, 32  # view / reference / CLIP sizes; the input image is 48 px (upsampled and downsampled)
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SCHEDULER = {  # as published (Zero123++ v1.2); steps_offset 1 differs from the project's default 0
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.20.2",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}


def _processor_config(size: int, mean: list[float], std: list[float]) -> dict:
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": mean,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": std,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }


def _write_tokenizer(folder: Path) -> None:
    """A tiny byte-pair CLIP tokenizer: a few letters and merges, CLIP's special tokens at the text encoder's ids."""
    folder.mkdir(parents=True)
    letters = "acdgorst"
    vocab = {"!": 0}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab.update({"<|startoftext|>": 998, "<|endoftext|>": 999})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    tok.save_pretrained(str(folder))


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero123plus")
    c = random_components("tiny", seed=11)
    c.unet.save_pretrained(str(root / "unet"))
    c.vae.save_pretrained(str(root / "vae"))
    c.image_encoder.save_pretrained(str(root / "vision_encoder"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        CLIPTextModel(CLIPTextConfig(**PRESETS["tiny"]["text_encoder"])).save_pretrained(str(root / "text_encoder"))
        ramp = (0.2 + torch.rand(77)).tolist()
    _write_tokenizer(root / "tokenizer")
    clip, vae = _processor_config(CLIP, OPENAI_MEAN, OPENAI_STD), _processor_config(COND, [0.5] * 3, [0.5] * 3)
    _json(root / "feature_extractor_clip" / "preprocessor_config.json", clip)
    _json(root / "feature_extractor_vae" / "preprocessor_config.json", vae)
    _json(root / "scheduler" / "scheduler_config.json", SCHEDULER)
    index = {
        "_class_name": "Zero123PlusPipeline",
        "_diffusers_version": "0.20.2",
        "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
        "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
        "ramping_coefficients": ramp,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    }
    _json(root / "model_index.json", index)
    return root


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """An RGBA input with opaque, transparent and half-transparent pixels."""
    rng = np.random.default_rng(3)
    rgba = (rng.random((48, 48, 4)) * 255).astype(np.uint8)
    rgba[:12, :, 3], rgba[-12:, :, 3] = 0, 255
    return Image.fromarray(rgba, "RGBA")


# ---------------------------------------------------------------------------------- the published function, here
class _RefOnlyProc:
    """The published reference-only attention: ``w`` records ``attn1``'s input, ``r`` appends it to keys/values."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.attend = name, enabled, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, mode="w", ref_dict=None):
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if self.enabled:
            if mode == "w":
                ref_dict[self.name] = encoder_hidden_states
            else:
                encoder_hidden_states = torch.cat([encoder_hidden_states, ref_dict.pop(self.name)], dim=1)
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask)


class Published:
    """The folder's components, loaded with diffusers / transformers only, and the published pipeline's steps."""

    def __init__(self, root: Path):
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        self.unet.set_attn_processor(
            {n: _RefOnlyProc(n, n.endswith("attn1.processor")) for n in self.unet.attn_processors}
        )
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval()
        self.vision = CLIPVisionModelWithProjection.from_pretrained(root / "vision_encoder").eval()
        self.text = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.fe_clip = CLIPImageProcessorPil.from_pretrained(root / "feature_extractor_clip")
        self.fe_vae = CLIPImageProcessorPil.from_pretrained(root / "feature_extractor_vae")
        self.root = root
        self.ramp = torch.tensor(json.loads((root / "model_index.json").read_text())["ramping_coefficients"])

    @staticmethod
    def to_rgb(rgba: Image.Image) -> Image.Image:
        img = Image.fromarray(np.full((rgba.size[1], rgba.size[0], 3), 127, np.uint8), "RGB")
        img.paste(rgba, mask=rgba.getchannel("A"))
        return img

    def prompt(self, text: str, length: int) -> torch.Tensor:
        ids = self.tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text(ids.input_ids)[0]

    @torch.no_grad()
    def condition(self, image: Image.Image, g: torch.Generator):
        """(hidden states, reference latents) as [unconditional, conditional]."""
        rgb = self.to_rgb(image)
        vae_px = self.fe_vae(images=rgb, return_tensors="pt").pixel_values
        clip_px = self.fe_clip(images=rgb, return_tensors="pt").pixel_values
        cond_lat = self.vae.encode(vae_px).latent_dist.sample(g)
        negative_lat = self.vae.encode(torch.zeros_like(vae_px)).latent_dist.sample(g)
        embeds = self.vision(clip_px).image_embeds.unsqueeze(-2)
        cond = self.prompt("", self.tokenizer.model_max_length) + embeds * self.ramp.unsqueeze(-1)
        uncond = self.prompt("", cond.shape[1])  # the pipeline's negative prompt: "" without an image term
        return torch.cat([uncond, cond]), torch.cat([negative_lat, cond_lat])

    def denoise(self, sample, t, hidden, noisy_ref) -> torch.Tensor:
        ref_dict: dict = {}
        self.unet(noisy_ref, t, hidden, cross_attention_kwargs={"mode": "w", "ref_dict": ref_dict})
        out = self.unet(sample, t, hidden, cross_attention_kwargs={"mode": "r", "ref_dict": ref_dict}).sample
        assert not ref_dict  # every recorded layer was read
        return out

    @torch.no_grad()
    def __call__(self, image: Image.Image, steps: int, guidance: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        hidden, cond_lat = self.condition(image, g)
        sched = EulerAncestralDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        sched.set_timesteps(steps)
        latents = torch.randn((1, 4, 3 * VIEW // 8, 2 * VIEW // 8), generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            noise = torch.randn(cond_lat.shape, generator=g)
            noisy = sched.scale_model_input(sched.add_noise(cond_lat, noise, t.reshape(-1)), t.reshape(-1))
            v_uncond, v_cond = self.denoise(x, t, hidden, noisy).chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
            latents = sched.step(v, t, latents, generator=g).prev_sample
        latents = latents / 0.75 + 0.22
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample / 0.5 * 0.8
        return (image / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def published(folder) -> Published:
    return Published(folder)


@pytest.fixture(scope="module")
def pipe(folder) -> MultiViewDiffusionPipeline:
    c = build_components(MultiViewModelConfig(pretrained=str(folder), view_size=VIEW, cond_size=COND))
    p = c.pipeline(VIEW, COND)
    p.set_progress_bar_config(disable=True)
    return p


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> float:
    """Max difference relative to the expected tensor's largest magnitude; asserts it is below ``rel``."""
    err = float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))
    assert actual.shape == expected.shape and err < rel, (tuple(actual.shape), tuple(expected.shape), err)
    return err


def test_both_branches_hidden_states_and_reference_latents(pipe, published, image):
    expected_hidden, expected_ref = published.condition(image, torch.Generator().manual_seed(0))
    hidden, ref = pipe.encode_condition(image, guided=True, generator=torch.Generator().manual_seed(0))
    assert hidden.shape == (2, 77, 64) and ref.shape == (2, 4, COND // 8, COND // 8)
    close(hidden[0], expected_hidden[0])  # unconditional: the plain empty prompt
    close(hidden[1], expected_hidden[1])  # conditional: empty prompt + ramp x CLIP(original image)
    close(ref[0], expected_ref[0])  # gray image's reference latent
    close(ref[1], expected_ref[1])  # bicubic resize to cond_size, posterior sample, unscaled
    # the branches do differ (the test would not see a swapped or shared branch otherwise)
    assert (expected_hidden[1] - expected_hidden[0]).abs().max() > 1e-2
    assert (expected_ref[1] - expected_ref[0]).abs().max() > 1e-2


def test_one_denoiser_call(pipe, published, image):
    hidden, ref = published.condition(image, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x, noisy = torch.randn(2, 4, 3 * VIEW // 8, 2 * VIEW // 8, generator=g), torch.randn(ref.shape, generator=g)
    t = torch.tensor(537.0)
    with torch.no_grad():
        expected = published.denoise(x, t, hidden, noisy)
        actual = reference_forward(pipe.unet, x, t, hidden, noisy)
    close(actual, expected)


def test_sampling_matches_a_hand_written_loop_over_the_folders_scheduler(pipe, published, image):
    expected = published(image, steps=3, guidance=4.0, seed=5)
    out = pipe(image, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(5))
    actual = pipe(
        image, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(5), output_type="pt"
    ).grid
    close(actual, expected)
    assert 0.01 < float(expected.std())  # not a saturated grid
    assert out.grid.size == (2 * VIEW, 3 * VIEW)


def test_scheduler_is_the_folders(pipe, folder, tmp_path, caplog):
    config = pipe.scheduler.config
    for key, value in SCHEDULER.items():
        if not key.startswith("_"):
            assert config[key] == value, key
    assert config.steps_offset == 1  # the project's own default is 0: the folder's file was read
    published = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    for spacing in ("trailing", "leading", "linspace"):  # the sampler keeps the folder's spacing
        other = tmp_path / spacing
        _json(other / "scheduler" / "scheduler_config.json", {**SCHEDULER, "timestep_spacing": spacing})
        mine = make_sampler("euler_a", folder_scheduler(str(other), "zero123plus").config)
        theirs = EulerAncestralDiscreteScheduler.from_config({**published.config, "timestep_spacing": spacing})
        mine.set_timesteps(5)
        theirs.set_timesteps(5)
        assert torch.equal(mine.timesteps, theirs.timesteps), spacing
    # a schedule training cannot use is refused, naming the file and the value
    bad = tmp_path / "epsilon"
    _json(bad / "scheduler" / "scheduler_config.json", {**SCHEDULER, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match=r"epsilon/scheduler/scheduler_config.json: prediction_type='epsilon'"):
        folder_scheduler(str(bad), "zero123plus")
    # other betas: used for training and sampling, with a warning naming the file and value
    betas = tmp_path / "betas"
    _json(betas / "scheduler" / "scheduler_config.json", {**SCHEDULER, "beta_end": 0.02})
    with caplog.at_level(logging.WARNING):
        s = folder_scheduler(str(betas), "zero123plus")
    assert s.config.beta_end == 0.02 and "betas/scheduler/scheduler_config.json: beta_end=0.02" in caplog.text
    # a Stable Diffusion 2 folder's schedule is replaced by the method's, saying so
    caplog.clear()
    sd2 = {**SCHEDULER, "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    _json(tmp_path / "sd2" / "scheduler" / "scheduler_config.json", sd2)
    with caplog.at_level(logging.WARNING):
        s = folder_scheduler(str(tmp_path / "sd2"), "sd2")
    assert s.config.beta_schedule == "linear" and s.config.prediction_type == "v_prediction"
    assert "beta_schedule='scaled_linear'" in caplog.text and "prediction_type='epsilon'" in caplog.text


def test_training_on_the_folder_uses_its_schedule_and_the_samplers_unconditional_branch(folder, published):
    cfg = to_object(
        load_config(
            MultiViewConfig,
            ROOT / "experiments" / "tiny" / "multiview.yaml",
            [
                f"model.pretrained={folder}",
                "model.condition_concat=false",  # the tiny recipe's departure; a Zero123++ UNet has 4 inputs
                f"model.view_size={VIEW}",
                f"model.cond_size={COND}",
                "train.vae_fit.steps=0",
                "train.cond_dropout=1.0",
                "train.cond_size_min=32",
                "train.cond_size_max=64",
            ],
        )
    )
    m = MultiViewModule(cfg)
    ddpm = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    torch.testing.assert_close(m.alphas_cumprod, ddpm.alphas_cumprod, rtol=0, atol=0)
    cond = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    hidden, ref, _ = m.prepare_condition(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        empty = published.prompt("", 77)
    close(hidden, empty.expand(2, -1, -1))  # dropped: the plain empty prompt, as the sampler's unconditional branch
    size = 8 * ref.shape[-1]
    with torch.no_grad():  # and a gray image's reference latent
        gray = published.vae.encode(torch.zeros(2, 3, size, size)).latent_dist
    assert float(((ref - gray.mean) / gray.std).abs().max()) < 6.0  # a posterior sample of it
    assert torch.isfinite(m.compute_loss({"cond": cond, "target": torch.rand(2, 3, 3 * VIEW, 2 * VIEW)}))


def test_float_inputs_use_the_same_bicubic_filter_as_pil():
    """Tensors (training batches, tensor inputs) are resized by PIL's bicubic filter in float: PIL's own float
    resampling, up and down, square and not."""
    rng = np.random.default_rng(0)
    for (h, w), (nh, nw) in [((48, 48), (32, 32)), ((48, 40), (64, 20)), ((17, 33), (17, 9)), ((32, 32), (100, 100))]:
        arr = rng.random((h, w)).astype(np.float32)
        expected = np.asarray(Image.fromarray(arr, mode="F").resize((nw, nh), Image.Resampling.BICUBIC))
        actual = bicubic_resize(torch.from_numpy(arr)[None, None], (nh, nw))[0, 0].numpy()
        assert np.abs(np.clip(expected, 0, 1) - actual).max() < 1e-6


def test_bad_inputs_are_one_line_errors(pipe):
    for bad, kind in [(np.zeros((4, 4)), ValueError), (torch.zeros(2, 4, 8, 8), ValueError), ("x.png", TypeError)]:
        with pytest.raises(kind) as err:
            pipe(bad, num_inference_steps=1)
        assert "\n" not in str(err.value)


def test_folder_without_scheduler_falls_back_to_the_methods_schedule(folder, tmp_path, caplog):
    copy = tmp_path / "noscheduler"
    shutil.copytree(folder / "scheduler", copy / "other")
    with caplog.at_level(logging.WARNING):
        s = folder_scheduler(str(copy), "zero123plus")
    assert s.config.beta_schedule == "linear" and s.config.timestep_spacing == "trailing"
    assert "noscheduler/scheduler/scheduler_config.json" in caplog.text
