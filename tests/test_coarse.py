"""Coarse stage: projection into the views, condition volumes, the LAS-Diffusion schedule and sampler, the dense
UNet, and the LightningModule (fit, resume, export -> from_pretrained) on tiny procedural shards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.stage_tester import TINY_3D, StageTester, tiny_run_overrides
from one2345pp.cameras import Camera, look_at_c2w, multiview_cameras
from one2345pp.config import load_config, to_object
from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
from one2345pp.data.datamodule import VolumeDataModule
from one2345pp.data.shards import build_shards
from one2345pp.models import diffusion3d as d3
from one2345pp.models.coarse import CoarseModel, CoarseModelConfig, shell_iou
from one2345pp.models.condition_volume import (
    ConditionConfig,
    ConditionVolume,
    camera_tensors,
    grid_centres,
    look_at,
    masked_view_max,
    perturb_cameras,
    project_points,
    sample_views_at,
)
from one2345pp.models.image_features import GlobalEmbeddingConfig, ImageFeatureConfig
from one2345pp.models.unet3d import UNet3D, UNet3DConfig
from one2345pp.stages.coarse import CoarseConfig, CoarseStage

LAYOUT = "zero123pp-v1.2"
W = 48  # view resolution of the synthetic camera tests
DIST = 3.01


def six_cameras(az: float = 17.0, res: int = W) -> list[Camera]:
    return multiview_cameras(az, LAYOUT, DIST, res)


# ------------------------------------------------------------------------------------------------------ projection
def test_projection_matches_camera_module():
    cams = six_cameras()
    c2w, k = camera_tensors(cams)
    pts = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    uv, depth = project_points(pts, c2w, k)
    for v, cam in enumerate(cams):
        ref_uv, ref_z = cam.project(pts[0].double().numpy())
        np.testing.assert_allclose(uv[0, v].numpy(), ref_uv, atol=2e-3)
        np.testing.assert_allclose(depth[0, v].numpy(), ref_z, atol=1e-5)
    # the origin, which every camera looks at, lands on the image centre at the camera distance
    uv0, z0 = project_points(torch.zeros(1, 1, 3), c2w, k)
    np.testing.assert_allclose(uv0[0, :, 0].numpy(), np.full((6, 2), W / 2), atol=1e-4)
    np.testing.assert_allclose(z0[0, :, 0].numpy(), np.full(6, DIST), atol=1e-5)


def test_a_point_on_a_pixel_ray_samples_that_pixel_in_its_view():
    cams = six_cameras(40.0)
    c2w, k = camera_tensors(cams)
    feats = torch.randn(1, 6, 5, W, W, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(2)
    for v, cam in enumerate(cams):
        i, j = (int(x) for x in rng.integers(3, W - 3, 2))  # column i, row j
        o, d = cam.rays_at(np.array([i + 0.5, j + 0.5]))
        point = torch.tensor(o + 2.7 * d, dtype=torch.float32).view(1, 1, 3)
        values, valid, uv = sample_views_at(point, feats, c2w, k)
        assert valid[0, v, 0]
        np.testing.assert_allclose(uv[0, v, 0].numpy(), [i + 0.5, j + 0.5], atol=2e-3)
        torch.testing.assert_close(values[0, v, 0], feats[0, v, :, j, i], atol=2e-3, rtol=0)


def test_half_resolution_feature_maps_use_the_same_pixel_mapping():
    # a map at half resolution whose cells store the image position of their centre: bilinear sampling of a linear
    # function is exact, so the sampled value is the point's pixel position (away from the border half-cell)
    cams = six_cameras(100.0)
    c2w, k = camera_tensors(cams)
    h = W // 2
    centres = (torch.arange(h, dtype=torch.float32) + 0.5) * (W / h)
    ramp = torch.stack([centres[None, :].expand(h, h), centres[:, None].expand(h, h)])  # channel 0: u, 1: v
    maps = ramp[None, None].expand(1, 6, 2, h, h)
    pts = (torch.rand(1, 40, 3, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.6
    values, valid, _ = sample_views_at(pts, maps, c2w, k, image_size=(W, W))
    for v, cam in enumerate(cams):
        ref, _ = cam.project(pts[0].double().numpy())
        inner = ((ref > 2) & (ref < W - 2)).all(-1)
        assert valid[0, v].all() and inner.sum() > 30
        np.testing.assert_allclose(values[0, v].numpy()[inner], ref[inner], atol=2e-3)


def test_invalid_projections_are_masked():
    cams = six_cameras()
    c2w, k = camera_tensors(cams)
    cam = cams[0]
    forward = cam.c2w[:3, 2]
    right = cam.c2w[:3, 0]
    behind = cam.position - 0.5 * forward  # behind camera 0
    beside = cam.position + 1.0 * forward + 5.0 * right  # in front of camera 0 but far outside its image
    pts = torch.tensor(np.stack([behind, beside, np.zeros(3)]), dtype=torch.float32)[None]
    feats = torch.ones(1, 6, 3, W, W)
    values, valid, _ = sample_views_at(pts, feats, c2w, k)
    assert not valid[0, 0, 0] and not valid[0, 0, 1] and valid[0, :, 2].all()
    assert (values[0, 0, :2] == 0).all() and (values[0, :, 2] == 1).all()
    # max over views ignores invalid views (even with larger values) and gives zeros when no view sees the point
    vals = torch.tensor([[[[1.0]], [[9.0]], [[-2.0]]]])  # [B=1, V=3, N=1, C=1]
    ok = torch.tensor([[[True], [False], [True]]])
    assert masked_view_max(vals, ok).item() == 1.0
    assert masked_view_max(vals, torch.zeros_like(ok)).item() == 0.0


def _tiny_condition(kind="cnn") -> ConditionConfig:
    return ConditionConfig(
        image_features=ImageFeatureConfig(kind=kind, cnn_channels=[8, 8]),
        mlp_hidden=8,
        feature_channels=6,
        level_channels=[4, 4, 4],
    )


def test_condition_volume_features_dense_packed_and_invisible_points():
    torch.manual_seed(0)
    cv = ConditionVolume(_tiny_condition())
    cams = [six_cameras(10.0, 32), six_cameras(200.0, 32)]
    c2w, k = camera_tensors(cams)
    views = torch.rand(2, 6, 3, 32, 32)
    vf = cv.encode_views(views)
    pts = torch.rand(2, 20, 3) - 0.5
    pts[:, 0] = torch.tensor([0.0, 0.0, 60.0])  # far above: outside every view
    dense = cv.features_at(pts, vf, c2w, k)
    assert dense.shape == (2, 20, 6)
    assert (dense[:, 0] == 0).all() and (dense[:, 1:].abs().sum(-1) > 0).all()
    packed = cv.features_at(pts.reshape(-1, 3), vf, c2w, k, batch_index=torch.arange(2).repeat_interleave(20))
    torch.testing.assert_close(packed, dense.reshape(-1, 6))
    grid = cv.dense(vf, c2w, k, 8)
    assert grid.shape == (2, 6, 8, 8, 8)
    at_centres = cv.features_at(grid_centres(8)[None].expand(2, -1, -1), vf, c2w, k)
    torch.testing.assert_close(grid[:, :, 3, 5, 1], at_centres[:, 3 * 64 + 5 * 8 + 1])  # [x, y, z] indexing


def test_camera_perturbation_keeps_cameras_on_target_within_bounds():
    cams = six_cameras()
    c2w, _ = camera_tensors(cams)
    np.testing.assert_allclose(look_at(c2w[..., :3, 3].double())[0].numpy(), [c.c2w for c in cams], atol=1e-6)
    assert torch.equal(perturb_cameras(c2w, 0.0, 0.0, 0.0), c2w)
    out = perturb_cameras(c2w, 5.0, 3.0, 0.05, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out, c2w)
    for v, cam in enumerate(cams):
        pos = out[0, v, :3, 3].double().numpy()
        az = math.degrees(math.atan2(pos[1], pos[0]))
        el = math.degrees(math.asin(pos[2] / np.linalg.norm(pos)))
        assert abs((az - cam.azimuth_deg + 180) % 360 - 180) <= 5.0 + 1e-4
        assert abs(el - cam.elevation_deg) <= 3.0 + 1e-4
        assert abs(np.linalg.norm(pos) / DIST - 1) <= 0.05 + 1e-6
        np.testing.assert_allclose(out[0, v].double().numpy(), look_at_c2w(pos), atol=1e-5)  # still aims at 0


# ------------------------------------------------------------------------------------------------------- schedule
def test_schedule_follows_the_formula():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = d3.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()
    for tv in (0.0, 0.25, 0.5, 1.0):
        assert d3.log_snr(torch.tensor(tv, dtype=torch.float64)).item() == pytest.approx(
            -math.log(math.expm1(1e-4 + 10 * tv * tv)), rel=1e-12
        )
    a, s = d3.alpha_sigma(t)
    torch.testing.assert_close(a * a + s * s, torch.ones_like(t))
    torch.testing.assert_close(a * a, 1 / (1 + torch.exp(-lam)))
    assert a[0] > 0.99 and a[-1] < 0.01


def test_posterior_step_matches_the_vp_posterior():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t, s = 0.6, 0.35
    x_t = d3.q_sample(x0, torch.full((3,), t), eps)
    (a_t, s_t), (a_s, s_s) = (tuple(float(v) for v in d3.alpha_sigma(torch.tensor(x))) for x in (t, s))
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = a_ts * s_s**2 / s_t**2 * x_t + a_s * var_ts / s_t**2 * x0  # Kingma et al. (VDM), eq. for q(z_s|z_t, x)
    torch.testing.assert_close(d3.posterior_step(x_t, x0, t, s, None), mean, atol=1e-5, rtol=1e-5)
    noise = torch.randn(3, 5, generator=g)
    std = math.sqrt(var_ts * s_s**2 / s_t**2)
    torch.testing.assert_close(d3.posterior_step(x_t, x0, t, s, noise), mean + std * noise, atol=1e-5, rtol=1e-5)


def _smooth_denoiser(x_t, t, self_cond, drop):
    return torch.tanh(0.8 * x_t + 0.3 * self_cond) * 0.9


def test_sampler_binarises_below_0_7_and_is_deterministic():
    seen = []
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 1, 6, 6, 6, generator=g)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return d3.sample(
            _smooth_denoiser,
            noise,
            steps=10,
            generator=gen,
            postprocess=d3.binarize_below(0.7),
            callback=lambda i, t, x0: seen.append((t, x0.clone())),
        )

    out = run(1)
    assert out.shape == noise.shape and set(out.unique().tolist()) <= {-1.0, 1.0}
    assert [round(t, 6) for t, _ in seen] == [round(1 - i / 10, 6) for i in range(10)]
    for t, x0 in seen:
        binary = bool(((x0 == 1) | (x0 == -1)).all())
        assert binary == (t < 0.7), t
    assert torch.equal(run(1), out)
    assert not torch.equal(run(2), out)


def test_classifier_free_guidance_and_packed_sampling():
    calls = []
    rows = torch.tensor([0, 0, 1, 1])  # packed: the batch index of every row

    def den(x_t, t, sc, drop):
        calls.append(drop.clone())
        return torch.where(drop[rows].view(-1, 1), torch.full_like(x_t, 0.1), torch.full_like(x_t, 0.3))

    x = torch.zeros(4, 2)
    out = d3.sample(den, x, batch_size=2, steps=1, guidance_scale=3.0, postprocess=lambda x0, t: x0, batch_index=rows)
    torch.testing.assert_close(out, torch.full_like(x, 0.1 + 3.0 * (0.3 - 0.1)))
    assert len(calls) == 2 and not calls[0].any() and calls[1].all()
    calls.clear()
    d3.sample(den, x, batch_size=2, steps=3, guidance_scale=1.0, batch_index=rows)
    assert len(calls) == 3  # scale 1: conditional passes only


def test_loss_self_conditioning_and_packed_times():
    x0 = torch.randn(3, 1, 4, 4, 4)
    received = []

    def perfect(x_t, t, sc, drop):
        received.append(sc.clone())
        return x0.clone()

    loss, info = d3.diffusion_loss(perfect, x0, self_cond_prob=1.0)
    assert loss.item() == 0.0 and len(received) == 2
    assert (received[0] == 0).all() and torch.equal(received[1], x0) and bool(info["self_cond"])
    received.clear()
    d3.diffusion_loss(perfect, x0, self_cond_prob=0.0)
    assert len(received) == 1
    # packed rows take their own sample's time
    xp, bi = torch.ones(5, 2), torch.tensor([0, 1, 1, 0, 1])
    t = torch.tensor([0.0, 1.0])
    xt = d3.q_sample(xp, t, torch.zeros_like(xp), bi)
    a0, a1 = (float(d3.alpha_sigma(torch.tensor(v))[0]) for v in (0.0, 1.0))
    torch.testing.assert_close(xt[:, 0], torch.tensor([a0, a1, a1, a0, a1]))


# ----------------------------------------------------------------------------------------------------------- UNet
def test_full_preset_unet_size_and_shapes():
    cfg = OmegaConf.load("experiments/coarse.yaml").model
    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CoarseModelConfig), cfg))
    with torch.device("meta"):
        unet = UNet3D(mcfg.unet, list(mcfg.condition.level_channels), global_dim=1024)
        vols = [torch.zeros(2, c, r, r, r) for c, r in zip(mcfg.condition.level_channels, (64, 32, 16, 8, 4))]
        out = unet(torch.zeros(2, 2, 64, 64, 64), torch.zeros(2), vols, torch.zeros(2, 1024))
    assert unet.resolutions == [64, 32, 16, 8, 4]
    assert [unet.cfg.base_channels * m for m in unet.cfg.channel_mults] == [32, 64, 128, 256, 256]
    attn = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention3D"]
    assert attn and all(n.startswith(("down.3", "down.4", "up.0", "up.1", "mid")) for n in attn)
    assert out.shape == (2, 1, 64, 64, 64)
    n = sum(p.numel() for p in unet.parameters())
    # the two 256-wide 3x3x3 convolutions of one residual block alone hold 2 * 256 * 256 * 27 weights
    assert 2 * 256 * 256 * 27 * 8 < n < 150e6, n


# ---------------------------------------------------------------------------------------------- stage on shards
R, RES = 16, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse_shards")
    cfg = DataConfig(
        view_resolution=RES,
        cond_resolution=RES,
        cond_samples=1,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=R),
        procedural=ProceduralConfig(seed=7, texture_resolution=32),
        shards=ShardConfig(max_samples=4),
    )
    build_shards("procedural", out, cfg, num_objects=6, progress=False)
    return out


def tiny_overrides(root, shards, **extra) -> list[str]:
    return tiny_run_overrides(
        root,
        {
            **TINY_3D,
            "model.unet.resolution": R,
            "model.unet.base_channels": 8,
            "model.unet.channel_mults": "[1,2,2]",
            "model.unet.num_res_blocks": 1,
            "model.unet.attention_resolutions": "[4]",
            "model.unet.head_channels": 8,
            "model.unet.channels_last": True,
            "model.condition.level_channels": "[4,4,8]",
            "data.train_shards": str(shards),
            "model.diffusion.sample_steps": 4,
            "val.sample_steps": 3,
            **extra,
        },
    )


@pytest.mark.slow
def test_fit_resume_export_and_from_pretrained(shards, tmp_path):
    torch.manual_seed(0)
    tester = StageTester("coarse", tiny_overrides(tmp_path, shards))
    first = tester.fit(1)
    assert "coarse_model_config" in first.ckpt
    iou = first.metric("val/iou")
    assert len(iou) == 1 and 0.0 <= iou[0] <= 1.0
    assert any(v > 0 for v in first.metric("train/loss"))
    assert list((first.directory / "media" / "val_slices").glob("step*.png"))

    run = tester.resume(first, 2)  # RUN/export, written when training ended, holds the EMA weights

    # export from the checkpoint = the live EMA weights; from_pretrained samples like the trained module
    out, loaded = tester.export(run, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert meta["stage"] == "coarse" and meta["step"] == 2 and meta["model"]["unet"]["resolution"] == R
    assert isinstance(loaded, CoarseModel) and isinstance(run.exported, CoarseModel)
    conf = to_object(tester.config())
    batch = next(iter(VolumeDataModule(conf.data).val_dataloader()))
    args = (batch["views"], (batch["views_c2w"], batch["views_K"]), batch["cond"])
    a = loaded.sample(*args, steps=4, generator=torch.Generator().manual_seed(3))
    module = run.module
    with module.ema_weights():
        b = module.model.sample(*args, steps=4, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 1, R, R, R) and set(a.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(a, b)
    assert torch.equal(loaded.sample(*args, steps=4, generator=torch.Generator().manual_seed(3)), a)
    iou = shell_iou(a, batch["occ"])
    assert iou.shape == (2,) and ((iou >= 0) & (iou <= 1)).all()


@pytest.mark.slow
def test_train_builds_the_module_from_run_seed(shards, tmp_path):
    """`one2345pp train` builds the module after seeding with run.seed: the same weights whatever the caller's RNG."""
    from safetensors.torch import load_file

    from one2345pp.stages.coarse import train

    weights = []
    for name, outside in (("a", 1), ("b", 2)):
        torch.manual_seed(outside)
        assert train(None, tiny_overrides(tmp_path, shards, **{"run.name": name, "trainer.max_steps": 1})) == 0
        weights.append(load_file(tmp_path / "coarse" / name / "export" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finer_shards_are_max_pooled_and_unreducible_grids_are_a_clear_error(shards, tmp_path):
    from one2345pp.config import to_object

    # shards at 16^3, model at 8^3: a cell is occupied when any of its 2^3 sub-cells is
    conf = to_object(
        load_config(
            CoarseConfig,
            None,
            tiny_overrides(tmp_path, shards, **{"model.unet.resolution": 8, "model.unet.attention_resolutions": "[2]"}),
        )
    )
    stage = CoarseStage(conf)
    occ = -torch.ones(1, 1, R, R, R)
    occ[0, 0, 3, 4, 5] = occ[0, 0, 15, 0, 8] = 1  # -> cells (1, 2, 2) and (7, 0, 4)
    batch = {
        "occ": occ,
        "views": torch.zeros(1, 6, 3, RES, RES),
        "views_c2w": torch.eye(4).expand(1, 6, 4, 4),
        "views_K": torch.eye(3)[None],
        "cond": torch.zeros(1, 3, 8, 8),
    }
    reduced = stage._inputs(batch, train=False)[0]
    assert reduced.shape == (1, 1, 8, 8, 8)
    assert sorted(map(tuple, torch.nonzero(reduced[0, 0] > 0).tolist())) == [(1, 2, 2), (7, 0, 4)]
    assert (reduced[reduced <= 0] == -1).all()
    conf = to_object(
        load_config(
            CoarseConfig,
            None,
            tiny_overrides(
                tmp_path, shards, **{"model.unet.resolution": 12, "model.unet.attention_resolutions": "[3]"}
            ),
        )
    )
    with pytest.raises(ValueError, match=r"16\^3 grids, which cannot be reduced to 12\^3"):
        CoarseStage(conf).training_step(batch, 0)


def test_pretrained_encoders_load_frozen_and_stay_out_of_exports(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(tmp_path / "dino")
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=14,
            projection_dim=12,
        )
    ).save_pretrained(tmp_path / "clip")
    cfg = CoarseModelConfig(
        unet=UNet3DConfig(
            resolution=8,
            base_channels=8,
            channel_mults=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[4],
            head_channels=8,
        ),
        condition=ConditionConfig(
            image_features=ImageFeatureConfig(kind="dinov2", dinov2=str(tmp_path / "dino"), dinov2_image_size=42),
            mlp_hidden=8,
            feature_channels=4,
            level_channels=[4, 4],
        ),
        global_embedding=GlobalEmbeddingConfig(kind="clip", clip=str(tmp_path / "clip"), clip_image_size=28),
    )
    model = CoarseModel(cfg)
    fmap = model.condition.backbone(torch.rand(3, 3, 32, 32))
    assert fmap.shape == (3, 16, 3, 3) and not fmap.requires_grad
    assert model.global_encoder(torch.rand(2, 3, 40, 40)).shape == (2, 12)
    model.train()
    assert not model.condition.backbone.training and not model.global_encoder.training
    assert all(not p.requires_grad for p in model.condition.backbone.parameters())
    saved = model.trainable_state_dict()
    assert saved and not any(k.startswith(("condition.backbone.", "global_encoder.")) for k in saved)
    model.save_pretrained(tmp_path / "export")
    loaded = CoarseModel.from_pretrained(tmp_path / "export")
    cams = six_cameras(0.0, 32)
    views, cond = torch.rand(6, 3, 32, 32), torch.rand(3, 32, 32)
    a = model.eval().sample(views, cams, cond, steps=3, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(views, cams, cond, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 1, 8, 8, 8) and torch.equal(a, b)


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="level_channels"):
        CoarseModel(CoarseModelConfig(condition=ConditionConfig(level_channels=[4, 4])))
    with pytest.raises(ValueError, match="postprocess"):
        d3.make_postprocess(d3.DiffusionConfig(postprocess="round"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        CoarseModel.from_pretrained(tmp_path)
