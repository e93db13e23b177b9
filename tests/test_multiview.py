"""Stage 1 (multi-view diffusion), tiny preset on CPU at 32 px views: reference attention, conditioning, targets,
a deterministic overfit, export -> from_pretrained, pretrained folders, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from helpers.stage_tester import StageTester, tiny_run_overrides
from helpers.threads import one_thread  # noqa: F401 (an autouse fixture: one intra-op thread)
from one2345pp.config import ConfigError, load_config, save_config, to_object
from one2345pp.data.config import DataConfig, RenderConfig, VolumeConfig
from one2345pp.models.multiview_builders import (
    MultiViewModelConfig,
    build_components,
    build_unet,
    pretrained_kind,
    random_components,
)
from one2345pp.models.multiview_pipeline import MultiViewDiffusionPipeline, make_sampler
from one2345pp.models.reference_attention import (
    READ,
    RECORD,
    ReferenceAttnProcessor,
    ReferencePass,
    noisy_reference,
    reference_forward,
    self_attention_names,
)
from one2345pp.stages.multiview import MultiViewConfig, MultiViewModule, check_config, export, load_stage_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny" / "multiview.yaml"
SMALL = [  # 32 px views and conditions keep the tests fast
    # the method's conditioning (reference attention and CLIP only); the tiny preset's concatenated condition has
    # its own test below, and the demo test trains the preset as configured
    "model.condition_concat=false",
    "model.view_size=32",
    "model.cond_size=32",
    "train.cond_size_min=32",
    "train.cond_size_max=64",
    "val.num_images=1",
    "val.num_inference_steps=2",
]


def config(*overrides: str) -> MultiViewConfig:
    return to_object(load_config(MultiViewConfig, TINY, [*SMALL, *overrides]))


def module(*overrides: str) -> MultiViewModule:
    return MultiViewModule(config(*overrides))


def images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth, distinct images in [0, 1] (colour ramps and a disc), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    out = []
    for _ in range(batch):
        a, b, c = torch.rand(3, 3, generator=g)
        disc = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1).float()
        out.append(a[:, None, None] * xx + b[:, None, None] * yy + c[:, None, None] * disc)
    return torch.stack(out).clamp(0, 1)


def batch_of(n: int = 2, seed: int = 0) -> dict:
    return {"cond": images(n, 32, 32, seed), "target": images(n, 96, 64, seed + 100)}


# ------------------------------------------------------------------------------------------- reference attention
def test_record_read_reaches_every_attn1_and_only_those():
    unet = random_components("tiny").unet
    modules = dict(unet.named_modules())
    attn1 = {f"{n}.processor" for n in modules if n.endswith(".attn1")}
    others = set(unet.attn_processors) - attn1
    assert len(attn1) >= 4 and others and set(self_attention_names(unet)) == attn1
    procs = unet.attn_processors
    assert all(isinstance(procs[n], ReferenceAttnProcessor) for n in attn1)
    assert not any(isinstance(procs[n], ReferenceAttnProcessor) for n in others)

    calls: dict[str, list[tuple[int, int]]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in modules.items():
        if name.endswith((".attn1", ".attn2")):
            key = f"{name}.processor"
            hooks.append(
                m.to_q.register_forward_hook(
                    lambda _m, a, _o, k=key: calls.setdefault(k, []).append((a[0].shape[1], -1))
                )
            )
            hooks.append(
                m.to_k.register_forward_hook(
                    lambda _m, a, _o, k=key: calls[k].__setitem__(-1, (calls[k][-1][0], a[0].shape[1]))
                )
            )
            hooks.append(m.register_forward_pre_hook(lambda _m, a, k=key: inputs.setdefault(k, []).append(a[0])))
    tokens: dict[str, torch.Tensor] = {}
    passes = (ReferencePass(RECORD, tokens), ReferencePass(READ, tokens))
    x, ref = torch.randn(1, 4, 12, 8), torch.randn(1, 4, 4, 4)  # target and reference of different sizes
    with torch.no_grad():
        reference_forward(unet, x, torch.tensor([500]), torch.randn(1, 77, 64), ref, passes)
    for h in hooks:
        h.remove()
    assert set(tokens) == attn1 and sorted(passes[1].reads) == sorted(attn1)
    for name in attn1:  # record: plain self-attention over the reference; read: keys = target + recorded tokens
        (q_ref, kv_ref), (q_tgt, kv_tgt) = calls[name]
        assert kv_ref == q_ref and kv_tgt == q_tgt + q_ref
        assert torch.equal(tokens[name], inputs[name][0])  # the recorded tokens are the attn1 input
    for name in others:  # cross-attention: always the 77 text tokens
        assert [kv for _, kv in calls[name]] == [77, 77]


# ------------------------------------------------------------------------------------------------ conditioning
def test_condition_changes_output_and_condition_path_gets_gradient():
    m = module("train.trainable=attn")
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 12, 8), torch.tensor([300, 700])
    noise = torch.randn(2, 4, 4, 4)
    hid_a, ref_a = m.encode_condition(images(2, 32, 32, seed=1))
    hid_b, ref_b = m.encode_condition(images(2, 32, 32, seed=2))
    ref_a, ref_b = (noisy_reference(r, t, noise, m.alphas_cumprod) for r in (ref_a, ref_b))
    with torch.no_grad():
        out = {
            k: reference_forward(m.unet, x, t, h, r)
            for k, (h, r) in {
                "a": (hid_a, ref_a),
                "b": (hid_b, ref_b),
                "ref_only": (hid_a, ref_b),
                "glob_only": (hid_b, ref_a),
            }.items()
        }
    for k in ("b", "ref_only", "glob_only"):  # the whole condition, and each of its two paths alone, matter
        assert (out[k] - out["a"]).abs().max() > 1e-4, k

    ref_in = ref_a.detach().clone().requires_grad_(True)
    reference_forward(m.unet, x, t, hid_a, ref_in).square().mean().backward()
    assert ref_in.grad is not None and ref_in.grad.abs().sum() > 0  # gradient reaches the reference latent
    assert m.conditioner.ramp.grad.abs().sum() > 0  # and the ramp of the global condition
    trained = {n for n, p in m.unet.named_parameters() if p.requires_grad}
    assert trained and all(".attn1." in n or ".attn2.to_k." in n or ".attn2.to_v." in n for n in trained)
    assert all(m.unet.get_parameter(n).grad is not None for n in trained if ".attn1.to_k" in n)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    losses, grads = [], []
    for ckpt in ("false", "true"):
        m = module(f"train.gradient_checkpointing={ckpt}", "train.trainable=full")
        loss = m.compute_loss(batch_of(), generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.trainable_parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_dropout_and_guidance_use_the_one_unconditional_branch(monkeypatch):
    """Condition dropout in training and the unconditional branch of guidance in sampling are the same function: the
    plain empty-prompt embedding (no image term) and the reference latent (posterior sample) of a gray image."""
    import one2345pp.models.multiview_pipeline as mp
    import one2345pp.stages.multiview as stage

    original, calls = mp.unconditional_condition, []

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(mp, "unconditional_condition", spy)
    monkeypatch.setattr(stage, "unconditional_condition", spy)
    m = module("train.cond_dropout=1.0")
    cond = images(2, 32, 32, seed=5)
    hidden, ref, _ = m.prepare_condition(cond, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and torch.equal(hidden, calls[0][0]) and torch.equal(ref, calls[0][1])
    assert torch.equal(hidden, m.conditioner.empty_prompt.expand(2, -1, -1))  # no image term
    m.compute_loss(batch_of(), generator=torch.Generator().manual_seed(0))
    size = 8 * ref.shape[-1]  # the reference of a gray image at the batch's random condition size
    with torch.no_grad():
        gray = m.vae.encode(torch.zeros(2, 3, size, size)).latent_dist.sample(torch.Generator().manual_seed(3))
        _, again = original(m.conditioner, m.vae, 2, size, torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, gray, rtol=0, atol=0)

    calls.clear()
    m = module("train.cond_dropout=0.0")
    hidden, _, _ = m.prepare_condition(cond, torch.Generator().manual_seed(0))
    assert not calls and not torch.allclose(hidden[0], m.conditioner.empty_prompt[0])

    pipe = m.pipeline()
    hidden, ref = pipe.encode_condition(cond, guided=True, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and hidden.shape[0] == ref.shape[0] == 4  # [unconditional, conditional]
    torch.testing.assert_close(hidden[:2], calls[0][0], rtol=0, atol=0)
    torch.testing.assert_close(ref[:2], calls[0][1], rtol=0, atol=0)
    pipe(cond, num_inference_steps=1, guidance_scale=4.0, output_type="pt")
    assert len(calls) == 2
    pipe(cond, num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    assert len(calls) == 2  # no guidance: no unconditional branch


# -------------------------------------------------------------------------------------------- targets and loss
def test_v_target_is_the_schedulers_velocity_and_min_snr_weights():
    m = module("train.min_snr_gamma=5.0")
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 12, 8, generator=g), torch.randn(4, 4, 12, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t, v = m.diffusion_targets(z0, noise, t)
    published = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        prediction_type="v_prediction",
    )
    torch.testing.assert_close(v, published.get_velocity(z0, noise, t))
    ac = torch.cumprod(1.0 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, (ac.sqrt() * noise - (1 - ac).sqrt() * z0).float())
    torch.testing.assert_close(x_t, (ac.sqrt() * z0 + (1 - ac).sqrt() * noise).float())
    snr = (ac / (1 - ac)).flatten()
    torch.testing.assert_close(m.loss_weights(t), (snr.clamp(max=5.0) / (snr + 1)).float())
    torch.testing.assert_close(module("train.min_snr_gamma=null").loss_weights(t), torch.ones(4))  # plain v-MSE
    sampler = make_sampler("euler_a", m.sampler_scheduler.config)
    assert sampler.config.prediction_type == "v_prediction" and sampler.config.beta_schedule == "linear"
    assert sampler.config.timestep_spacing == "trailing"


@pytest.mark.slow
def test_a_few_dozen_steps_on_one_batch_lower_the_loss():
    m = module(
        "train.trainable=full", "train.cond_dropout=0.0", "optim.lr=2e-3", "optim.warmup_steps=0", "ema.enabled=false"
    )
    batch = batch_of(2, seed=3)

    def fixed_loss() -> float:
        with torch.no_grad():
            return (
                sum(float(m.compute_loss(batch, torch.Generator().manual_seed(k), augment=False)) for k in range(4)) / 4
            )

    before = fixed_loss()
    opt = m.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    for _ in range(30):
        loss = m.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)


# ------------------------------------------------------------------------------------------------------ export
def test_export_from_pretrained_reproduces_the_modules_samples(tmp_path):
    m = module("ema.enabled=true")
    opt = m.configure_optimizers()["optimizer"]
    for _ in range(2):  # move UNet, EMA and ramp away from their initial values
        m.compute_loss(batch_of()).backward()
        opt.step()
        opt.zero_grad()
        m.ema.update(m)
    cond = images(1, 48, 40, seed=9)[0]  # a non-square [3, H, W] input
    kw = {"num_inference_steps": 3, "guidance_scale": 4.0}
    mine = m.sample(cond, generator=torch.Generator().manual_seed(7), **kw)
    out = m.export_pretrained(tmp_path / "export")
    assert (out / "model_index.json").is_file() and not list(out.rglob("*.bin"))
    assert {p.parent.name for p in out.rglob("*.safetensors")} == {"unet", "vae", "image_encoder", "conditioner"}
    pipe = MultiViewDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(cond, generator=torch.Generator().manual_seed(7), **kw)
    assert len(theirs.views) == 6 and theirs.views[0].size == (32, 32) and theirs.grid.size == (64, 96)
    # The same weights, noise and steps. Not bit-exact: safetensors memory-maps the loaded weights at addresses the
    # CPU kernels treat differently from freshly allocated ones (float32 rounding, ~1e-5 here), so pixels may differ
    # by one 8-bit level.
    for a, b in zip([*mine.views, mine.grid], [*theirs.views, theirs.grid]):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    for sampler in ("euler_a", "ddim"):
        a, b = (
            f(cond, generator=torch.Generator().manual_seed(7), sampler=sampler, output_type="pt", **kw).grid
            for f in (pipe, m.sample)
        )
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    shadow = m.ema.shadow  # the export carries the EMA averages of the UNet and the ramp
    assert all(torch.equal(p, shadow[f"unet.{n}"]) for n, p in pipe.unet.named_parameters() if f"unet.{n}" in shadow)
    assert torch.equal(pipe.conditioner.ramp, shadow["conditioner.ramp"])
    assert not torch.equal(m.conditioner.ramp, shadow["conditioner.ramp"])  # and the module kept its own weights
    assert not all(torch.equal(p, shadow[f"unet.{n}"]) for n, p in m.unet.named_parameters())
    other = pipe(cond, generator=torch.Generator().manual_seed(8), **kw)
    assert not np.array_equal(np.asarray(other.grid), np.asarray(theirs.grid))
    ddim = pipe([cond, cond], num_inference_steps=2, sampler="ddim", view_size=64, output_type="pil")
    assert len(ddim.views) == 2 and ddim.views[1][5].size == (64, 64) and ddim.grid[0].size == (128, 192)
    with pytest.raises(ValueError, match="sampler"):
        pipe(cond, num_inference_steps=1, sampler="heun")
    again = build_components(MultiViewModelConfig(pretrained=str(out)))  # continue training from an export
    assert torch.equal(again.conditioner.ramp, shadow["conditioner.ramp"])


# -------------------------------------------------------------------------------------------------- pretrained
def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({"!": 0, "a</w>": 1, "<|startoftext|>": 998, "<|endoftext|>": 999}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    tok.save_pretrained(str(folder))


def _pretrained_folder(root: Path, zero123plus: bool) -> tuple[Path, dict]:
    """A diffusers folder laid out like Stable Diffusion 2 (or Zero123++) with tiny random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from one2345pp.models.multiview_builders import PRESETS

    c = random_components("tiny", seed=4)
    c.unet.save_pretrained(str(root / "unet"))
    c.vae.save_pretrained(str(root / "vae"))
    with torch.random.fork_rng(devices=[]):  # the same text encoder in every folder
        torch.manual_seed(5)
        text_encoder = CLIPTextModel(CLIPTextConfig(**PRESETS["tiny"]["text_encoder"]))
    text_encoder.save_pretrained(str(root / "text_encoder"))
    _tokenizer(root / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    clip = root / "vision_encoder" if zero123plus else root.parent / f"{root.name}-clip"
    c.image_encoder.save_pretrained(str(clip))
    if zero123plus:
        c.feature_extractor.save_pretrained(str(root / "feature_extractor_clip"))
        index.update(_class_name="Zero123PlusPipeline", ramping_coefficients=[0.5 - i / 200 for i in range(77)])
    (root / "model_index.json").write_text(json.dumps(index))
    return clip, {"unet": c.unet.state_dict()}


def test_builds_from_sd2_and_zero123plus_folders(tmp_path):
    sd2, z123 = tmp_path / "sd2", tmp_path / "z123"
    clip, ref = _pretrained_folder(sd2, zero123plus=False)
    with pytest.raises(ValueError, match="model.image_encoder"):
        build_components(MultiViewModelConfig(pretrained=str(sd2)))
    c = build_components(MultiViewModelConfig(pretrained=str(sd2), image_encoder=str(clip)))
    assert all(torch.equal(v, ref["unet"][k]) for k, v in c.unet.state_dict().items())
    torch.testing.assert_close(c.conditioner.ramp, torch.arange(77) / 77)
    assert c.conditioner.empty_prompt.abs().sum() > 0 and c.conditioner.empty_prompt.shape == (1, 77, 64)
    assert isinstance(c.unet.attn_processors[self_attention_names(c.unet)[0]], ReferenceAttnProcessor)

    _pretrained_folder(z123, zero123plus=True)
    z = build_components(MultiViewModelConfig(pretrained=str(z123)))
    torch.testing.assert_close(z.conditioner.ramp, torch.tensor([0.5 - i / 200 for i in range(77)]))
    torch.testing.assert_close(z.conditioner.empty_prompt, c.conditioner.empty_prompt)

    assert pretrained_kind({"_class_name": "MultiViewDiffusionPipeline"}) == "export"
    with pytest.raises(ValueError, match="lacks"):
        pretrained_kind({"_class_name": "Other", "unet": []})
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_components(MultiViewModelConfig(pretrained=str(tmp_path / "missing")))


def test_full_preset_has_the_sd2_unet_size_and_configs_are_checked():
    n_full = sum(p.numel() for p in build_unet("full", device="meta").parameters())
    assert n_full == 865_910_724  # Stable Diffusion 2's UNet
    n_tiny = sum(p.numel() for p in build_unet("tiny").parameters())
    assert 1e6 < n_tiny < 1e7
    full = to_object(load_stage_config(ROOT / "experiments" / "multiview.yaml"))
    assert full.model.preset == "full" and full.trainer.precision == "bf16-mixed" and full.train.trainable == "attn"
    with pytest.raises(ConfigError, match="train.trainable"):
        load_stage_config(TINY, ["train.trainable=lora"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        module("train.cond_size_min=40", "train.cond_size_max=50")


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_restores_step_optimizer_and_ema_and_export_matches(tmp_path, capsys):
    from one2345pp.data.shards import build_shards

    data = DataConfig(
        view_resolution=32,
        cond_resolution=32,
        cond_samples=1,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=16),
    )
    build_shards("procedural", tmp_path / "data", data, num_objects=4, progress=False)
    overrides = tiny_run_overrides(
        tmp_path / "runs",
        {
            "data.train_shards": tmp_path / "data",
            "data.batch_size": 2,
            "data.epoch_samples": 4,
            "data.view_resolution": 32,
            "data.cond_resolution": 32,
            "run.name": "r",
            "ema.enabled": "true",
            "train.vae_fit.steps": 2,  # a fitted VAE is stored in checkpoints and exports, not fitted again on resume
        },
    )
    tester = StageTester("multiview", [*SMALL, *overrides], config=TINY)
    first = tester.fit(3)  # steps, EMA updates, config.yaml, last.ckpt, metrics.csv and RUN/export: the tester's
    run, ckpt = first.directory, first.ckpt
    assert run == tmp_path / "runs" / "multiview" / "r"
    assert list((run / "media" / "val_samples").glob("step*.png"))  # validation sheet: input | generated | ground truth
    keys = set(ckpt["state_dict"])
    assert not any(k.startswith("image_encoder.") for k in keys) and "vae.encoder.conv_in.weight" in keys
    assert ckpt["vae_fit"]["scaling_factor"] > 0
    assert list((run / "media" / "vae_fit_reconstruction").glob("step*.png"))
    assert "conditioner.ramp" in keys and any(k.startswith("unet.") for k in keys)
    assert "unet.conv_in.weight" in ckpt["ema"]["shadow"]  # the tiny preset trains the full UNet

    assert "VAE fit step 2/2" in capsys.readouterr().err
    # starts at step 3 with the saved optimizer and EMA state; its RUN/export holds the EMA weights
    resumed = tester.resume(first, 5)
    assert "VAE fit" not in capsys.readouterr().err  # resumed with the fitted VAE

    # rebuilt from config.yaml + last.ckpt (frozen parts re-created)
    _, again = tester.export(resumed, tmp_path / "again")
    cond = images(1, 32, 32, seed=11)
    grids = []
    for pipe in (resumed.exported, again):
        assert isinstance(pipe, MultiViewDiffusionPipeline)
        grids.append(
            pipe(cond, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").grid
        )
    assert torch.equal(grids[0], grids[1]) and math.isfinite(float(grids[0].mean()))

    with pytest.raises(FileNotFoundError, match="no run directory or checkpoint"):
        export(tmp_path / "missing")
    plain = MultiViewModule(to_object(load_stage_config(run / "config.yaml", ["ema.enabled=false"])))
    with pytest.raises(KeyError, match="no fitted VAE"):
        plain.load_checkpoint({k: v for k, v in ckpt.items() if k != "vae_fit"})
    state = dict(ckpt["state_dict"])
    state.pop("unet.conv_in.weight")
    with pytest.raises(KeyError, match=r"missing \['unet.conv_in.weight'\]"):  # a checkpoint of another model
        plain.load_checkpoint({"state_dict": state})
    plain.load_checkpoint(ckpt)  # the weights without the EMA state load into a model without EMA
    with pytest.raises(KeyError, match="no 'ema' state"):
        MultiViewModule(to_object(load_stage_config(run / "config.yaml"))).load_checkpoint(
            {"state_dict": ckpt["state_dict"]}
        )


def test_isometric_vae_init_makes_the_decoder_pass_latent_scale_through():
    """The fit's init: ResNet / attention blocks start as identities and the output GroupNorm no longer divides the
    contrast away, so doubling a latent doubles its effect on the image (the random VAE as built is far from it)."""
    from diffusers import AutoencoderKL

    from one2345pp.models.multiview_builders import PRESETS
    from one2345pp.models.vae_init import FIT_INIT_LOGVAR, isometric_vae_init

    vae = random_components("tiny").vae
    z = torch.randn(1, 4, 6, 4, generator=torch.Generator().manual_seed(0))

    def nonlinearity() -> float:
        with torch.no_grad():
            base = vae.decode(torch.zeros_like(z)).sample
            once, twice = vae.decode(z).sample - base, vae.decode(2 * z).sample - base
        return float((twice - 2 * once).norm() / twice.norm())

    assert nonlinearity() > 0.5
    state = torch.get_rng_state()
    isometric_vae_init(vae, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # draws from its own generator
    assert nonlinearity() < 0.03
    with torch.no_grad():
        post = vae.encode(images(1, 48, 32, seed=0) * 1.25 - 0.625).latent_dist
    assert torch.allclose(post.logvar, torch.full_like(post.logvar, FIT_INIT_LOGVAR))  # a nearly exact posterior

    narrow = AutoencoderKL(**{**PRESETS["tiny"]["vae"], "norm_num_groups": 8})  # 2 channels per group at 16
    with pytest.raises(ValueError, match="16 channels in 8 norm groups"):
        isometric_vae_init(narrow)


def _reconstruction_psnr(m: MultiViewModule, target: torch.Tensor) -> float:
    """Target grids -> posterior mean -> diffusion latents -> decoded images, as sampling decodes them."""
    from one2345pp.models.multiview_pipeline import decode_latents, scale_latents

    with torch.no_grad():
        z = m.vae.encode(target * 2 * 0.625 - 0.625).latent_dist.mode()  # images scaled by 0.5 / 0.8 as encoded
        rec = decode_latents(m.vae, scale_latents(z, m.vae.config.scaling_factor))
    return float(10 * torch.log10(1 / (rec - target).square().mean()))


@pytest.mark.slow
def test_vae_fit_learns_to_reconstruct_and_travels_with_checkpoints(capsys):
    m = module("train.vae_fit.steps=60", "train.vae_fit.log_every=20")
    batches = [batch_of(2, seed) for seed in (0, 1, 2)]
    held = batch_of(2, seed=7)["target"]
    before = _reconstruction_psnr(m, held)
    summary = m.fit_vae(batches, log_every=20)
    after = _reconstruction_psnr(m, held)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "VAE fit step" in ln]
    assert [ln.split()[4] for ln in lines] == ["20/60", "40/60", "60/60"]
    assert summary["steps"] == 60 and m.vae_fitted
    assert after > before + 6 and after > 18, (before, after)  # a random VAE's decoder gives no image back
    assert not any(p.requires_grad for p in m.vae.parameters())  # frozen again
    with torch.no_grad():  # the scaling factor brings the target latents to unit standard deviation
        z = m.vae.encode(batches[-1]["target"] * 2 * 0.625 - 0.625).latent_dist.mode()
    assert abs(float(z.std()) * m.vae.config.scaling_factor - 1) < 1e-3

    ckpt = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    fresh = module("train.vae_fit.steps=60")
    fresh.load_checkpoint(ckpt)
    assert fresh.vae_fitted and fresh.vae.config.scaling_factor == m.vae.config.scaling_factor
    assert _reconstruction_psnr(fresh, held) == after

    with pytest.raises(ConfigError, match="train.vae_fit.steps=5 with model.pretrained"):
        load_stage_config(TINY, [*SMALL, "train.vae_fit.steps=5", "model.pretrained=/some/sd2"])


def test_target_latent_cache_gives_the_same_loss_and_skips_the_encoder(monkeypatch):
    """Kept posteriors give the loss of the uncached path (same generator), the VAE encoder runs only for grids not
    kept, a full cache stops adding, validation and a changed VAE never read it."""
    cached, plain = module("train.target_latent_cache=3", "train.vae_fit.steps=2"), module()
    plain.load_state_dict(cached.state_dict())
    cached.train(), plain.train()
    calls = []
    encode = cached.vae.encode
    monkeypatch.setattr(cached.vae, "encode", lambda x: calls.append(tuple(x.shape)) or encode(x))
    first, second = batch_of(2, seed=0), batch_of(2, seed=1)

    def losses(batch, seed):
        return [float(m.compute_loss(batch, generator=torch.Generator().manual_seed(seed))) for m in (cached, plain)]

    with torch.no_grad():
        for seed in (0, 1):  # a miss, then a hit: both equal the uncached loss
            a, b = losses(first, seed)
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
        assert len(cached.target_cache) == 2 and cached.target_cache.hits == 2
        a, b = losses(second, 5)  # two new grids, one slot left: the third grid is kept, the fourth not
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
        assert len(cached.target_cache) == 3
        targets = [shape[0] for shape in calls if shape[-2:] == (96, 64)]
        assert targets == [2, 2]  # the first batch once, then the second batch's two new grids
        cached.eval()
        cached.compute_loss(first, generator=torch.Generator().manual_seed(0))
        assert cached.target_cache.hits == 2  # validation encodes as it is
    cached.train()
    cached.fit_vae([batch_of(2, seed=3)], log_every=10**6)  # the VAE changes: nothing kept survives
    assert len(cached.target_cache) == 0
    with pytest.raises(ConfigError, match="train.target_latent_cache=-1"):
        load_stage_config(TINY, [*SMALL, "train.target_latent_cache=-1"])


def test_reference_latent_keeps_zero123pp_signal_ratio_for_any_vae_scaling():
    """With SD's scaling factor the reference is the raw posterior sample (as Zero123++ reads it); with another
    factor it is rescaled so that it stays 1 / 0.18215 times a diffusion latent's scale."""
    from one2345pp.models.multiview_pipeline import encode_reference

    m = module()
    x = images(2, 32, 32, seed=3)

    def gen():
        return torch.Generator().manual_seed(4)

    with torch.no_grad():
        raw = m.vae.encode(x * 2.0 - 1.0).latent_dist.sample(gen())
        assert m.vae.config.scaling_factor == pytest.approx(0.18215)
        assert torch.equal(encode_reference(m.vae, x, gen()), raw)
        m.vae.register_to_config(scaling_factor=2.0)  # e.g. after the tiny preset's VAE fit
        assert torch.allclose(encode_reference(m.vae, x, gen()), raw * (2.0 / 0.18215))


def test_trainable_image_encoder_gets_gradients_ema_and_travels_with_checkpoints():
    frozen = module("train.image_encoder_trainable=false", "ema.enabled=true")
    m = module("train.image_encoder_trainable=true", "ema.enabled=true", "train.vae_fit.steps=0")
    assert not any(k.startswith("image_encoder.") for k in frozen.ema.shadow)
    assert any(k.startswith("image_encoder.") for k in m.ema.shadow)
    m.compute_loss(batch_of(2)).backward()
    grads = [p.grad for p in m.image_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    opt = m.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in in_opt for p in m.image_encoder.parameters())

    with torch.no_grad():  # a trained encoder differs from the one the model config rebuilds
        for p in m.image_encoder.parameters():
            p.add_(0.01)
    ckpt = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    assert any(k.startswith("image_encoder.") for k in ckpt["state_dict"])
    fresh = module("train.image_encoder_trainable=true", "ema.enabled=true", "train.vae_fit.steps=0")
    fresh.load_checkpoint(ckpt)
    for (n, a), b in zip(m.image_encoder.state_dict().items(), fresh.image_encoder.state_dict().values()):
        assert torch.equal(a, b), n


def test_validation_reports_how_much_the_condition_explains():
    """val/cond_gain: relative loss increase when each object gets another object's condition (same noise and t):
    exactly 0 when all conditions are the same image, nonzero when they differ."""
    m = module("val.num_images=0", "train.vae_fit.steps=0")
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    same = batch_of(3, seed=0)
    same["cond"] = same["cond"][:1].expand(3, -1, -1, -1).clone()
    with torch.no_grad():
        m.validation_step(same, 0)
    assert logged["val/cond_gain"] == 0.0 and logged["val/loss"] > 0
    with torch.no_grad():
        m.validation_step(batch_of(3, seed=0), 0)
        swapped = batch_of(3, seed=0)
        swapped["cond"] = swapped["cond"].roll(1, dims=0)
        other = float(m.compute_loss(swapped, generator=torch.Generator().manual_seed(m.cfg.val.seed), augment=False))
    assert logged["val/cond_gain"] != 0.0
    assert logged["val/cond_gain"] == pytest.approx((other - logged["val/loss"]) / other, rel=1e-5)


def test_condition_concat_hands_the_condition_to_every_tile_and_travels_with_the_export(tmp_path):
    """model.condition_concat (the tiny preset's departure from the method): the clean condition latent, in the
    targets' normalisation, fills each of the six tiles of extra UNet input channels; a dropped condition is the
    gray image there too; the flag is stored in the export and checked when a folder is loaded."""
    from one2345pp.models.multiview_pipeline import GRAY, concat_condition

    m = module("model.condition_concat=true", "ema.enabled=false")
    latent = m.vae.config.latent_channels
    assert m.unet.config.in_channels == 2 * latent and m.unet.config.out_channels == latent
    cond = images(2, 48, 48, seed=3)
    with torch.no_grad():
        grid, own = concat_condition(m.vae, cond, 32)
        small = torch.nn.functional.interpolate(cond, size=(32, 32), mode="bilinear", antialias=True)
        z = m.vae.encode((small * 2 - 1) * 0.5 / 0.8).latent_dist.mode()  # the target images' scaling
        expected = (z * m.vae.config.scaling_factor - 0.22) * 0.75  # the target latents' normalisation
    assert grid.shape == (2, latent, 12, 8) and own.shape == (2, latent, 6, 6)
    for r in range(3):
        for c in range(2):
            torch.testing.assert_close(grid[..., 4 * r : 4 * r + 4, 4 * c : 4 * c + 4], expected, rtol=1e-4, atol=1e-5)

    m.compute_loss(batch_of()).backward()  # the extra input channels learn
    assert m.unet.conv_in.weight.grad[:, latent:].abs().sum() > 0
    dropped = module("model.condition_concat=true", "train.cond_dropout=1.0")
    _, _, imgs = dropped.prepare_condition(images(2, 32, 32, seed=1), torch.Generator().manual_seed(0))
    assert torch.all(imgs == GRAY)

    kw = {"num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "pt"}
    a = m.sample(cond[0], generator=torch.Generator().manual_seed(1), **kw).grid
    b = m.sample(cond[1], generator=torch.Generator().manual_seed(1), **kw).grid
    assert (a - b).abs().max() > 1e-3  # another input, another output
    out = m.export_pretrained(tmp_path / "export")
    pipe = MultiViewDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.condition_concat is True
    assert pipe.config.guidance_scale == m.cfg.val.guidance_scale == 2.0  # the tiny recipe's, the call's default
    assert pipe.config.num_inference_steps == m.cfg.val.num_inference_steps == 2  # the run's, the call's default
    own = pipe(cond[0], generator=torch.Generator().manual_seed(1), output_type="pt").grid
    explicit = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "pt"}
    torch.testing.assert_close(
        own, pipe(cond[0], generator=torch.Generator().manual_seed(1), **explicit).grid, rtol=0, atol=0
    )
    three = pipe(cond[0], generator=torch.Generator().manual_seed(1), num_inference_steps=3, output_type="pt").grid
    assert (own - three).abs().max() > 1e-4  # the step count is not ignored
    torch.testing.assert_close(
        pipe(cond[0], generator=torch.Generator().manual_seed(1), **kw).grid, a, atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="condition_concat"):
        build_components(MultiViewModelConfig(pretrained=str(out), condition_concat=False))
    assert (
        build_components(MultiViewModelConfig(pretrained=str(out), condition_concat=True)).unet.config.in_channels == 8
    )


def test_consensus_keeps_the_candidate_with_the_least_distance_to_the_others(tmp_path):
    """num_candidates: each input's grids are drawn as one batch and the one whose summed squared distance to the
    other candidates is least is returned (a minimum-Bayes-risk choice); the export records the run's count as the
    call's default, a folder without it samples once, and a count below 1 is refused."""
    from one2345pp.models.multiview_pipeline import consensus

    flat = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.2, 0.8]).view(6, 1, 1, 1).expand(6, 3, 6, 4)
    picked = consensus(flat, 3)  # means 0.2 and 0.633: the second and the third candidate
    assert torch.equal(picked[:, 0, 0, 0], torch.tensor([0.1, 0.8]))
    assert torch.equal(consensus(flat, 1), flat)

    over = ("ema.enabled=false", "val.num_candidates=3", "train.vae_fit.steps=0")
    m = module(*over)
    pipe = m.pipeline()
    cond = images(1, 32, 32, seed=5)
    kw = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "pt"}
    chosen = pipe(cond[0], generator=torch.Generator().manual_seed(4), **kw).grid[0]
    drawn = pipe(cond.expand(3, -1, -1, -1), generator=torch.Generator().manual_seed(4), num_candidates=1, **kw).grid
    assert (drawn[0] - drawn[1]).abs().max() > 1e-3  # the candidates differ
    pairwise = torch.stack([sum((a - b).square().sum() for b in drawn) for a in drawn])
    torch.testing.assert_close(chosen, drawn[pairwise.argmin()], rtol=0, atol=0)
    two = pipe(images(2, 32, 32, seed=6), generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw)
    assert two.grid.shape == (2, 3, 96, 64)  # a generator per input serves all its candidates

    run = tmp_path / "run"  # a run as the trainer leaves it: config.yaml and ckpts/last.ckpt
    (run / "ckpts").mkdir(parents=True)
    save_config(load_config(MultiViewConfig, TINY, [*SMALL, *over]), run / "config.yaml")
    ckpt = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, run / "ckpts" / "last.ckpt")
    out = export(run)
    assert MultiViewDiffusionPipeline.from_pretrained(str(out)).config.num_candidates == 3  # the run's
    later = MultiViewDiffusionPipeline.from_pretrained(str(export(run, tmp_path / "e2", ["val.num_candidates=5"])))
    assert later.sampling_defaults() == (2, 2.0, 5)  # sampling defaults chosen after training, the rest the run's
    with pytest.raises(ConfigError, match=r"sampling defaults the folder records \(val\.\*\), got model.view_size=64"):
        export(run, tmp_path / "e3", ["model.view_size=64"])
    index = json.loads((out / "model_index.json").read_text())
    del index["num_candidates"]  # a folder written before the count was recorded
    (out / "model_index.json").write_text(json.dumps(index))
    assert MultiViewDiffusionPipeline.from_pretrained(str(out)).sampling_defaults()[2] == 1
    with pytest.raises(ValueError, match="num_candidates must be >= 1, got 0"):
        pipe(cond[0], num_candidates=0, **kw)
    with pytest.raises(ConfigError, match="val.num_candidates=0"):
        check_config(config("val.num_candidates=0"))
