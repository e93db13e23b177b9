"""Fine stage: ground-truth targets at the model's resolution (reduction, SDF extension, jittered support), the sparse
UNet, projected view colours, and the LightningModule (fit, resume, export -> from_pretrained, sampling) on tiny
procedural shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.stage_tester import TINY_3D, StageTester, tiny_run_overrides
from one2345pp.cameras import multiview_cameras
from one2345pp.config import to_object
from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
from one2345pp.data.datamodule import VolumeDataModule
from one2345pp.data.shards import build_shards
from one2345pp.models.condition_volume import camera_tensors
from one2345pp.models.fine import FineModel, projected_rgb, support_from_occupancy
from one2345pp.models.sparse_unet import SparseConditionPyramid, SparseUNet, SparseUNetConfig
from one2345pp.models.volume_targets import (
    children_coords,
    extend_sdf,
    reduce_fine,
    reduce_occupancy,
    training_support,
)
from one2345pp.sparse import SparseTensor
from one2345pp.stages.fine import FineConfig, crop_occupancy, export


def centres(r: int) -> torch.Tensor:
    c = -0.5 + (torch.arange(r, dtype=torch.float64) + 0.5) / r
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)


def sphere_sdf(p: torch.Tensor, radius: float = 0.3) -> torch.Tensor:
    return p.norm(dim=-1) - radius


def sphere_shell(c: int, f: int = 2, radius: float = 0.3):
    """Ground truth as the shards store it: shell at C (|SDF| < 1 voxel), children at f*C with exact SDF."""
    occ = sphere_sdf(centres(c), radius).abs() < 1.0 / c
    parents = torch.nonzero(occ)
    parents = torch.cat([torch.zeros_like(parents[:, :1]), parents], 1)
    ch = children_coords(parents, f)
    sdf = sphere_sdf(-0.5 + (ch[:, 1:].double() + 0.5) / (c * f), radius).float()
    rgb = torch.stack([ch[:, 1].float() / (c * f), torch.zeros(len(ch)), -torch.ones(len(ch))], 1)
    return (occ.float() * 2 - 1)[None, None], ch.int(), sdf, rgb


# --------------------------------------------------------------------------------------------------- GT targets
def test_occupancy_reduction_is_a_max_over_subcells():
    g = torch.Generator().manual_seed(0)
    occ = torch.where(torch.rand(2, 1, 8, 8, 8, generator=g) < 0.05, 1.0, -1.0)
    red = reduce_occupancy(occ, 4)
    for b, x, y, z in np.ndindex(2, 4, 4, 4):
        block = occ[b, 0, 2 * x : 2 * x + 2, 2 * y : 2 * y + 2, 2 * z : 2 * z + 2]
        assert red[b, 0, x, y, z].item() == (1.0 if (block > 0).any() else -1.0)
    assert reduce_occupancy(occ, 8) is occ
    with pytest.raises(ValueError, match="cannot be reduced to 3"):
        reduce_occupancy(occ, 3)


def test_fine_reduction_averages_complete_children_at_the_coarser_cell_centre():
    _, ch, sdf, rgb = sphere_shell(16, 2)  # children at 32^3
    coords = torch.cat([ch, ch + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])  # a second sample
    sdf2, rgb2 = torch.cat([sdf, sdf]), torch.cat([rgb, rgb])
    keep = torch.ones(len(coords), dtype=torch.bool)
    keep[len(ch) + 5] = False  # sample 1 loses one child: that parent is incomplete -> unknown
    c, s, r = reduce_fine(coords[keep], sdf2[keep], rgb2[keep], 2)
    assert len(c) == 2 * len(ch) // 8 - 1
    # the parents' centres are the children's common corner: the mean of a smooth SDF there is close to its value
    exact = sphere_sdf(-0.5 + (c[:, 1:].double() + 0.5) / 16).float()
    assert (s - exact).abs().max() < 0.05 / 16
    # colour channel 0 is linear in x: its mean is exact
    torch.testing.assert_close(r[:, 0], (2 * c[:, 1].float() + 0.5) / 32)
    assert set(c[:, 0].tolist()) == {0, 1}


def test_sdf_extension_is_exact_for_a_plane_and_keeps_the_sign():
    r = 12
    p = centres(r)
    plane = (p[..., 0] + 0.13).float()  # SDF of the plane x = -0.13
    known = plane.abs() < 1.0 / r
    region = plane.abs() < 4.0 / r
    rgb = torch.zeros(r, r, r, 3)
    rgb[..., 1] = 0.5
    s, col, assigned = extend_sdf(known, torch.where(known, plane, torch.zeros_like(plane)), rgb, region, 1.0 / r)
    assert assigned[region].all() and not assigned[~region & ~known].any()
    torch.testing.assert_close(s[region], plane[region], atol=1e-6, rtol=0)
    torch.testing.assert_close(col[region][:, 1], torch.full((int(region.sum()),), 0.5))


def test_training_support_exact_without_jitter_and_bounded_with_it():
    c, f = 16, 2
    occ, ch, sdf, rgb = sphere_shell(c, f)
    coords, s, _ = training_support(occ, ch, sdf, rgb, f, 1.0, 0.0)
    assert torch.equal(coords, ch)  # children of the shell cells, known values passed through
    torch.testing.assert_close(s, sdf)
    # jittered: thresholds within 1 -/+ 0.3 voxels of the centre's |SDF|, signs of the extended cells exact
    kept_all = []
    for seed in range(3):
        coords, s, _ = training_support(occ, ch, sdf, rgb, f, 1.0, 0.3, torch.Generator().manual_seed(seed))
        exact = sphere_sdf(-0.5 + (coords[:, 1:].double() + 0.5) / (c * f)).float()
        assert ((s > 0) == (exact > 0)).all()
        assert (s - exact).abs().max() < 1.0 / (c * f)
        parents = torch.unique(coords[:, 1:] // f, dim=0)
        d = sphere_sdf(-0.5 + (parents.double() + 0.5) / c).abs() * c
        assert d.max() < 1.3 + 0.1 and (coords.shape[0] == parents.shape[0] * 8)
        kept_all.append({tuple(x) for x in parents.tolist()})
    shell = {tuple(x) for x in torch.nonzero(occ[0, 0] > 0).tolist()}
    core = {tuple(x) for x in torch.nonzero(sphere_sdf(centres(c)).abs() * c < 0.6).tolist()}
    assert all(core <= k for k in kept_all)  # deep inside the threshold: always kept
    assert any(k - shell for k in kept_all) and any(shell - k for k in kept_all)  # grows and shrinks


def test_support_from_occupancy_and_crops():
    occ = -torch.ones(2, 1, 4, 4, 4)
    occ[0, 0, 1, 2, 3] = occ[1, 0, 0, 0, 0] = 1
    sup = support_from_occupancy(occ, 2)
    want = {(0, 2 + i, 4 + j, 6 + k) for i in (0, 1) for j in (0, 1) for k in (0, 1)}
    want |= {(1, i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)}
    assert sup.dtype == torch.int32 and {tuple(x) for x in sup.tolist()} == want
    big = torch.ones(1, 1, 8, 8, 8)
    cropped = crop_occupancy(big, 3, torch.Generator().manual_seed(0))
    cells = torch.nonzero(cropped[0, 0] > 0)
    assert len(cells) == 27 and (cells.max(0).values - cells.min(0).values == 2).all()


# ------------------------------------------------------------------------------------------------ network parts
def test_sparse_unet_keeps_sites_and_samples_independent():
    torch.manual_seed(0)
    cfg = SparseUNetConfig(resolution=8, base_channels=8, channel_mults=[1, 2], backend="torch")
    net = SparseUNet(cfg, [4, 4], global_dim=3, extra_channels=2).eval()
    pyr = SparseConditionPyramid(5, [4, 4], backend="torch").eval()
    g = torch.Generator().manual_seed(1)
    pts = torch.unique(torch.randint(0, 8, (60, 3), generator=g), dim=0)
    n = len(pts)

    def run(samples: int, feats, extra, cond, t, emb):
        coords = torch.cat([torch.cat([torch.full((n, 1), b), pts], 1) for b in range(samples)]).int()
        x = SparseTensor(coords, feats[: samples * n], batch_size=samples)
        levels = pyr(x.replace(cond[: samples * n]))
        assert [v.stride for v in levels] == [1, 2]
        return net(x, t[:samples], levels, emb[:samples], extra[: samples * n])

    feats, extra, cond = torch.randn(2 * n, 8, generator=g), torch.randn(2 * n, 2, generator=g), torch.randn(2 * n, 5)
    t, emb = torch.rand(2, generator=g), torch.randn(2, 3, generator=g)
    both = run(2, feats, extra, cond, t, emb)
    one = run(1, feats, extra, cond, t, emb)
    assert both.feats.shape == (2 * n, 4) and torch.equal(both.coords[:n], one.coords)
    torch.testing.assert_close(both.feats[:n], one.feats, atol=1e-5, rtol=1e-5)  # sample 1 does not leak into 0
    assert not torch.allclose(both.feats[:n], both.feats[n:], atol=1e-3)  # but its own inputs matter
    plain = SparseUNet(cfg, extra_channels=2)
    with pytest.raises(ValueError, match="extra head features"):
        plain(SparseTensor(both.coords[:n], feats[:n], batch_size=1), t[:1])


def test_projected_rgb_reads_the_pixel_a_point_projects_to():
    res = 24
    cams = multiview_cameras(25.0, "zero123pp-v1.2", 3.01, res)
    c2w, k = camera_tensors(cams)
    views = torch.rand(1, 6, 3, res, res, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for v, cam in enumerate(cams):
        i, j = (int(x) for x in rng.integers(2, res - 2, 2))
        o, d = cam.rays_at(np.array([i + 0.5, j + 0.5]))
        p = torch.tensor(o + 3.0 * d, dtype=torch.float32)[None]
        out = projected_rgb(p, torch.zeros(1, dtype=torch.long), views, c2w, k).view(6, 4)
        torch.testing.assert_close(out[v, :3], views[0, v, :, j, i] * 2 - 1, atol=2e-3, rtol=0)
        assert out[v, 3] == 1
    far = torch.tensor([[0.0, 0.0, 50.0]])  # far above the object: outside every view
    assert (projected_rgb(far, torch.zeros(1, dtype=torch.long), views, c2w, k) == 0).all()


# ---------------------------------------------------------------------------------------------- stage on shards
C, RES = 16, 32  # shards: 16^3 shell, 32^3 fine cells; the model runs at 8^3 / 16^3 (reduced by 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_shards")
    cfg = DataConfig(
        view_resolution=RES,
        cond_resolution=RES,
        cond_samples=1,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=C),
        procedural=ProceduralConfig(seed=11, texture_resolution=32),
        shards=ShardConfig(max_samples=4),
    )
    build_shards("procedural", out, cfg, num_objects=6, progress=False)
    return out


def tiny_overrides(root, shards, **extra) -> list[str]:
    return tiny_run_overrides(
        root,
        {
            **TINY_3D,
            "model.unet.resolution": C,
            "model.unet.base_channels": 8,
            "model.unet.channel_mults": "[1,2]",
            "model.unet.backend": "torch",
            "model.condition.level_channels": "[4,8]",
            "model.sdf_truncation": 0.1,
            "data.train_shards": str(shards),
            "model.diffusion.sample_steps": 3,
            "val.sample_steps": 2,
            "train.crop": 4,
            **extra,
        },
    )


@pytest.mark.slow
def test_fit_resume_export_sample_and_from_pretrained(shards, tmp_path):
    torch.manual_seed(0)
    tester = StageTester("fine", tiny_overrides(tmp_path, shards))
    first = tester.fit(1)
    sign = first.metric("val/sign_acc")
    assert len(sign) == 1 and 0.0 <= sign[0] <= 1.0
    assert any(v > 0 for v in first.metric("train/loss"))

    run = tester.resume(first, 2)  # RUN/export, written when training ended, holds the EMA weights
    assert "fine_model_config" in run.ckpt

    out, loaded = tester.export(run)  # default: RUN/export
    meta = json.loads((out / "config.json").read_text())
    assert meta["stage"] == "fine" and meta["step"] == 2 and meta["model"]["unet"]["resolution"] == C
    assert isinstance(loaded, FineModel)

    module = run.module
    conf = to_object(tester.config())
    batch = next(iter(VolumeDataModule(conf.data).val_dataloader()))
    support, x0 = module.targets(batch, 0.0)
    assert x0.shape == (len(support), 4) and x0.abs().max() <= 1
    # the support is the children of the reduced (8^3) shell
    assert torch.equal(support, support_from_occupancy(reduce_occupancy(batch["occ"], C // 2), 2))
    args = (batch["views"], (batch["views_c2w"], batch["views_K"]), batch["cond"])
    occ8 = reduce_occupancy(batch["occ"], C // 2)
    a = loaded.sample(*args, coarse_occ=occ8, steps=3, generator=torch.Generator().manual_seed(4))
    with module.ema_weights():
        b = module.model.eval().sample(*args, coarse_occ=occ8, steps=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.coords, support) and a.feats.shape == (len(support), 4)
    assert a.feats.abs().max() <= 1.0
    torch.testing.assert_close(a.feats, b.feats, atol=1e-5, rtol=1e-5)
    again = loaded.sample(*args, coarse_occ=occ8, steps=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again.feats, a.feats)
    other = loaded.sample(*args, coarse_occ=occ8, steps=3, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other.feats, a.feats)
    # the ground truth itself (perfect x0) meshes into a surface inside the support's cells
    meshes = loaded.meshes(SparseTensor(support, x0, batch_size=2))
    assert len(meshes) == 2 and all(m.num_faces > 0 for m in meshes)


def test_bad_configs_and_inputs_name_the_key(tmp_path):
    from one2345pp.config import ConfigError

    with pytest.raises(ConfigError, match="level_channels"):
        FineModel(FineConfig().model.__class__(condition=FineConfig().model.condition.__class__(level_channels=[4])))
    with pytest.raises(FileNotFoundError, match="config.json"):
        FineModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        export(tmp_path)
