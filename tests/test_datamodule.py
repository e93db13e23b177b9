"""Decoding of shard samples and the WebDataset data modules, on tiny synthetic shards written here."""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from one2345pp.cameras import Camera, get_layout, multiview_cameras, untile
from one2345pp.data.config import LoaderConfig
from one2345pp.data.datamodule import (
    MultiViewDataModule,
    VolumeDataModule,
    collate_samples,
    resolve_shards,
)
from one2345pp.data.decode import CorruptSample, decode_views, decode_volumes

RES, COND_RES, R, K = 8, 12, 4, 2  # view px, condition px, coarse grid, conditions per object
LAYOUT = "zero123pp-v1.2"
PIXEL = (200, 100, 50, 128)  # a known RGBA pixel, written at cond1[2, 3] and in view 3 of mv1 at [5, 1]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_sample(uid: str, seed: int, n_fine: int) -> dict:
    rng = np.random.default_rng(seed)
    fov = get_layout(LAYOUT).fov_deg
    sample = {"__key__": uid}
    cams = {"fov_deg": fov, "resolution": RES, "layout": LAYOUT, "samples": []}
    for k in range(K):
        cond = rng.integers(0, 256, (COND_RES, COND_RES, 4), dtype=np.uint8)
        views = rng.integers(0, 256, (6, RES, RES, 4), dtype=np.uint8)
        if k == 1:
            cond[2, 3] = PIXEL
            views[3, 5, 1] = PIXEL
        grid = views.reshape(3, 2, RES, RES, 4).swapaxes(1, 2).reshape(3 * RES, 2 * RES, 4)  # row-major 3 x 2
        sample[f"cond{k}.png"], sample[f"mv{k}.png"] = png(cond), png(grid)
        az = float(rng.uniform(0, 360))
        cond_cam = Camera(az, float(rng.uniform(-10, 40)), 2.5, fov, COND_RES, COND_RES)
        cams["samples"].append(
            {"cond": cond_cam.to_dict(), "views": [c.to_dict() for c in multiview_cameras(az, LAYOUT, 2.5, RES)]}
        )
    sample["cams.json"] = json.dumps(cams).encode()
    sample["occ.npz"] = npz(occ=rng.integers(0, 2, (R, R, R), dtype=np.uint8))
    sample["fine.npz"] = npz(
        coords=rng.integers(0, 2 * R, (n_fine, 3)).astype(np.int16),
        sdf=rng.normal(0, 0.01, n_fine).astype(np.float32),
        rgb=rng.integers(0, 256, (n_fine, 3), dtype=np.uint8),
    )
    meta = {"uid": uid, "source": "synthetic", "coarse_resolution": R, "fine_resolution": 2 * R}
    sample["meta.json"] = json.dumps(meta).encode()
    return sample


def write_shards(directory, n_shards: int, per_shard: int, corrupt: str | None = None) -> dict[str, dict]:
    """Write shard-%06d.tar files; ``corrupt``: uid whose cond0.png is replaced by garbage bytes."""
    samples = {}
    for s in range(n_shards):
        with wds.TarWriter(str(directory / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                uid = f"obj{s}x{i}"
                sample = make_sample(uid, seed=100 * s + i, n_fine=2 + i)
                if uid == corrupt:
                    sample["cond0.png"] = b"\x89PNG this is not a png"
                sink.write(sample)
                samples[uid] = sample
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return d, write_shards(d, 3, 3)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    return d, write_shards(d, 2, 3, corrupt="obj1x1")


def pattern(d, last: int) -> str:
    return f"{d}/shard-{{000000..{last:06d}}}.tar"


def raw(samples: dict, uid: str, url: str = "mem://x") -> dict:
    return {**samples[uid], "__url__": url}


def loader_cfg(d, last: int, **kw) -> LoaderConfig:
    base = dict(train_shards=pattern(d, last), batch_size=2, num_workers=0, shuffle_buffer=4, seed=3)
    return LoaderConfig(**{**base, **kw})


def composite_expected(px, level: float) -> np.ndarray:
    a = px[3] / 255.0
    return np.array(px[:3]) / 255.0 * a + level * (1.0 - a)


# ------------------------------------------------------------------------------------------------- stock reader
def test_stock_webdataset_reads_shards(shards):
    d, samples = shards
    ds = wds.WebDataset(pattern(d, 2), shardshuffle=False).decode("pil")  # "pil" converts images to RGB
    seen = []
    for s in ds:
        seen.append(s["__key__"])
        assert s["cond1.png"].mode == "RGB" and s["cond1.png"].size == (COND_RES, COND_RES)
        assert s["mv0.png"].mode == "RGB" and s["mv0.png"].size == (2 * RES, 3 * RES)
        assert len(s["cams.json"]["samples"]) == K and len(s["cams.json"]["samples"][0]["views"]) == 6
        assert s["occ.npz"]["occ"].shape == (R, R, R) and s["occ.npz"]["occ"].dtype == np.uint8
        assert s["fine.npz"]["coords"].dtype == np.int16 and s["meta.json"]["uid"] == s["__key__"]
    assert seen == list(samples)
    first = next(iter(wds.WebDataset(pattern(d, 0), shardshuffle=False).decode("pilrgba")))  # keeps straight alpha
    assert first["cond1.png"].mode == "RGBA" and first["cond1.png"].getpixel((3, 2)) == PIXEL


# -------------------------------------------------------------------------------------------------------- decode
def test_decode_views_shapes_ranges_and_compositing(shards):
    _, samples = shards
    sample = raw(samples, "obj1x2")
    out = decode_views(sample, 1, "gray")
    assert out["cond"].shape == (3, COND_RES, COND_RES) and out["cond_alpha"].shape == (1, COND_RES, COND_RES)
    assert out["target"].shape == (3, 3 * RES, 2 * RES) and out["target_alpha"].shape == (1, 3 * RES, 2 * RES)
    for key in ("cond", "cond_alpha", "target", "target_alpha"):
        assert out[key].dtype == torch.float32 and 0.0 <= out[key].min() and out[key].max() <= 1.0
    np.testing.assert_allclose(out["cond"][:, 2, 3].numpy(), composite_expected(PIXEL, 0.5), atol=1e-6)
    assert out["cond_alpha"][0, 2, 3].item() == pytest.approx(128 / 255)
    # view 3 sits in grid row 1, column 1
    np.testing.assert_allclose(out["target"][:, RES + 5, RES + 1].numpy(), composite_expected(PIXEL, 0.5), atol=1e-6)
    white = decode_views(sample, 1, "white")
    np.testing.assert_allclose(white["cond"][:, 2, 3].numpy(), composite_expected(PIXEL, 1.0), atol=1e-6)
    assert out["cond_index"].item() == 1 and out["__key__"] == "obj1x2"

    level = torch.rand((), generator=torch.Generator().manual_seed(7)).item()
    rnd = decode_views(sample, 1, "random", torch.Generator().manual_seed(7))
    assert rnd["background"].item() == pytest.approx(level)
    np.testing.assert_allclose(rnd["cond"][:, 2, 3].numpy(), composite_expected(PIXEL, level), atol=1e-6)

    cams = json.loads(sample["cams.json"])["samples"][1]
    np.testing.assert_allclose(out["target_c2w"].numpy(), np.array([v["c2w"] for v in cams["views"]]), atol=1e-6)
    np.testing.assert_allclose(out["cond_c2w"].numpy(), np.array(cams["cond"]["c2w"]), atol=1e-6)
    assert out["target_c2w"].shape == (6, 4, 4) and out["target_azimuth"].shape == (6,)
    np.testing.assert_allclose(out["target_elevation"].numpy(), [20, -10, 20, -10, 20, -10])
    f = 0.5 * RES / math.tan(math.radians(30.0) / 2)
    assert out["target_K"][0, 0].item() == pytest.approx(f) and out["target_K"][1, 2].item() == pytest.approx(RES / 2)
    assert out["cond_K"][0, 2].item() == pytest.approx(COND_RES / 2)

    small = decode_views(sample, 0, "gray", view_resolution=4, cond_resolution=6)
    assert small["target"].shape == (3, 12, 8) and small["cond"].shape == (3, 6, 6)
    assert small["target_K"][0, 0].item() == pytest.approx(0.5 * 4 / math.tan(math.radians(15.0)))


def test_cond_fill_frames_the_condition_as_the_product_frames_its_input(shards):
    from PIL import Image

    from one2345pp.pipeline.preprocess import PreprocessConfig, preprocess_image

    _, samples = shards
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[5:21, 10:40] = (200, 40, 90, 255)  # a 30 x 16 box off centre on a transparent background
    sample = {**raw(samples, "obj1x2"), "cond0.png": png(rgba)}
    as_rendered = decode_views(sample, 0, "gray")
    assert torch.equal(as_rendered["cond_alpha"][0] > 0.5, torch.from_numpy(rgba[..., 3] > 0))
    framed = decode_views(sample, 0, "gray", cond_fill=0.5)
    on = framed["cond_alpha"][0] > 0.5
    ys, xs = torch.nonzero(on, as_tuple=True)
    assert int(xs.max() - xs.min() + 1) == 32 and abs(int(ys.max() - ys.min() + 1) - 17) <= 1  # 0.5 x 64, same aspect
    assert abs(int(xs.min()) - (64 - 32) // 2) <= 1 and abs(int(ys.min()) - (64 - 17) // 2) <= 1  # centred
    product, _ = preprocess_image(Image.fromarray(rgba), PreprocessConfig(size=64, fill=0.5))
    expected = torch.from_numpy(product).permute(2, 0, 1).float() / 255.0
    assert (framed["cond"] - expected).abs().max() <= 1.5 / 255  # the product's framing, up to rounding
    with pytest.raises(CorruptSample, match="no object pixel"):
        decode_views({**sample, "cond0.png": png(np.zeros((64, 64, 4), np.uint8))}, 0, cond_fill=0.5)


def test_decode_volumes(shards):
    _, samples = shards
    sample = raw(samples, "obj2x1")
    out = decode_volumes(sample, 1, "gray")
    occ = np.load(io.BytesIO(sample["occ.npz"]))["occ"]
    fine = np.load(io.BytesIO(sample["fine.npz"]))
    assert out["occ"].shape == (1, R, R, R) and out["occ"].dtype == torch.float32
    np.testing.assert_array_equal(out["occ"][0].numpy(), occ.astype(np.float32) * 2 - 1)
    assert out["fine_coords"].dtype == torch.int32 and out["fine_coords"].shape == (3, 3)
    np.testing.assert_array_equal(out["fine_coords"].numpy(), fine["coords"])
    np.testing.assert_allclose(out["fine_sdf"].numpy(), fine["sdf"])
    np.testing.assert_allclose(out["fine_rgb"].numpy(), fine["rgb"] / 127.5 - 1.0, atol=1e-6)
    assert -1.0 <= out["fine_rgb"].min() and out["fine_rgb"].max() <= 1.0
    assert out["meta"]["uid"] == "obj2x1"
    views = decode_views(sample, 1, "gray")
    assert out["views"].shape == (6, 3, RES, RES) and out["views_alpha"].shape == (6, 1, RES, RES)
    torch.testing.assert_close(out["views"], untile(views["target"]))
    torch.testing.assert_close(out["views_c2w"], views["target_c2w"])


def test_corrupt_samples_raise_with_key_and_url(shards):
    _, samples = shards
    bad = raw(samples, "obj0x0", "file://s0.tar")
    bad["cond0.png"] = b"garbage"
    with pytest.raises(CorruptSample, match=r"obj0x0.*s0\.tar.*cond0\.png") as info:
        decode_views(bad, 0)
    assert info.value.key == "obj0x0" and info.value.url == "file://s0.tar"
    missing = raw(samples, "obj0x0")
    del missing["mv1.png"]
    with pytest.raises(CorruptSample, match="missing field 'mv1.png'"):
        decode_views(missing, 1)
    wrong = raw(samples, "obj0x0")
    wrong["mv0.png"] = png(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(CorruptSample, match="mv0.png is 10x10"):
        decode_views(wrong, 0)
    rgb_only = raw(samples, "obj0x0")
    buf = io.BytesIO()
    Image.new("RGB", (COND_RES, COND_RES)).save(buf, format="PNG")
    rgb_only["cond0.png"] = buf.getvalue()
    with pytest.raises(CorruptSample, match="mode RGB, expected RGBA"):
        decode_views(rgb_only, 0)
    flat_occ = raw(samples, "obj0x0")
    flat_occ["occ.npz"] = npz(occ=np.zeros((R, R), np.uint8))
    with pytest.raises(CorruptSample, match="expected a cube"):
        decode_volumes(flat_occ, 0)
    outside = raw(samples, "obj0x0")  # its fine coords lie in [0, 2R); a smaller recorded fine grid cannot hold them
    outside["meta.json"] = json.dumps({"uid": "obj0x0", "fine_resolution": 1}).encode()
    with pytest.raises(CorruptSample, match="coordinates outside"):
        decode_volumes(outside, 0)


def test_sparse_collate_puts_batch_index_first(shards):
    _, samples = shards
    a, b = decode_volumes(raw(samples, "obj0x0"), 0), decode_volumes(raw(samples, "obj0x2"), 1)  # 2 and 4 cells
    batch = collate_samples([a, b])
    assert batch["fine_coords"].dtype == torch.int32 and batch["fine_coords"].shape == (6, 4)
    assert batch["fine_coords"][:, 0].tolist() == [0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(batch["fine_coords"][:, 1:], torch.cat([a["fine_coords"], b["fine_coords"]]))
    torch.testing.assert_close(batch["fine_sdf"], torch.cat([a["fine_sdf"], b["fine_sdf"]]))
    torch.testing.assert_close(batch["fine_rgb"], torch.cat([a["fine_rgb"], b["fine_rgb"]]))
    assert batch["occ"].shape == (2, 1, R, R, R) and batch["views"].shape == (2, 6, 3, RES, RES)
    assert batch["cond_index"].tolist() == [0, 1] and [m["uid"] for m in batch["meta"]] == ["obj0x0", "obj0x2"]


# --------------------------------------------------------------------------------------------------- data modules
def test_shard_resolution_hold_out_and_single_shard_warning(shards, caplog):
    d, _ = shards
    train, val = resolve_shards(loader_cfg(d, 2))
    assert [u[-10:] for u in train] == ["000000.tar", "000001.tar"] and [u[-10:] for u in val] == ["000002.tar"]
    train, val = resolve_shards(loader_cfg(d, 2, val_shards=pattern(d, 0)))
    assert len(train) == 3 and len(val) == 1
    with caplog.at_level(logging.WARNING, logger="one2345pp.data.datamodule"):
        train, val = resolve_shards(loader_cfg(d, 0))
    assert train == val and len(train) == 1 and "validation reads the TRAINING shard" in caplog.text
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(loader_cfg(d, 5))


def test_corrupt_sample_is_counted_and_skipped(corrupt_shards):
    d, samples = corrupt_shards
    dm = MultiViewDataModule(loader_cfg(d, 1, val_shards=pattern(d, 1), num_workers=2))
    keys = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    assert sorted(keys) == sorted(u for u in samples if u != "obj1x1")
    assert dm.corrupt_count == 1 and dm.shard_error_count == 0


def test_split_by_node_gives_disjoint_shards(shards, monkeypatch):
    d, samples = shards
    cfg = loader_cfg(d, 2, val_shards=pattern(d, 0), resampled=False, batch_size=1)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = MultiViewDataModule(cfg)
        seen[rank] = [(b["__url__"][0], b["__key__"][0]) for b in dm.train_dataloader()]
    urls = [{u for u, _ in seen[r]} for r in (0, 1)]
    assert urls[0].isdisjoint(urls[1]) and len(urls[0] | urls[1]) == 3
    assert {u[-10:] for u in urls[0]} == {"000000.tar", "000002.tar"}
    assert sorted(k for r in (0, 1) for _, k in seen[r]) == sorted(samples)


def test_validation_under_ddp_needs_a_shard_per_rank(shards, monkeypatch):
    d, _ = shards
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        two = MultiViewDataModule(loader_cfg(d, 2, val_shards=pattern(d, 1)))
        batches = list(two.val_dataloader())  # its own shard: 3 samples in batches of 2 (the partial one kept)
        assert [len(b["__key__"]) for b in batches] == [2, 1]
        assert {u[-10:] for b in batches for u in b["__url__"]} == {f"{rank:06d}.tar"}
    one = MultiViewDataModule(loader_cfg(d, 2, val_shards=pattern(d, 0)))
    monkeypatch.setenv("RANK", "0")
    assert list(one.val_dataloader())  # rank 0 has the single shard
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"rank 1 of 2 gets none of the 1 validation shard.*data.val_shards"):
        one.val_dataloader()


def test_resampled_epoch_has_exact_batches_and_seeding_is_deterministic(shards):
    d, _ = shards
    cfg = loader_cfg(d, 2, resampled=True, epoch_samples=10, batch_size=3, num_workers=2)
    dm = MultiViewDataModule(cfg)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 3 and all(len(b["__key__"]) == 3 for b in batches)
        assert batches[0]["cond"].shape == (3, 3, COND_RES, COND_RES)
        assert batches[0]["target"].shape == (3, 3, 3 * RES, 2 * RES)
        epochs.append([(k, int(c)) for b in batches for k, c in zip(b["__key__"], b["cond_index"], strict=True)])
    assert all(k[:4] in ("obj0", "obj1") for k, _ in epochs[0])  # shard 2 is held out for validation
    again = MultiViewDataModule(cfg).train_dataloader()
    assert [(k, int(c)) for b in again for k, c in zip(b["__key__"], b["cond_index"], strict=True)] == epochs[0]
    assert epochs[0] != epochs[1]


def test_volume_datamodule_batches(shards):
    d, _ = shards
    dm = VolumeDataModule(loader_cfg(d, 2, resampled=True, epoch_samples=4, batch_size=2, view_resolution=4))
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for b in batches:
        counts = [len(m) for m in b["meta"]]
        assert b["occ"].shape == (2, 1, R, R, R) and set(b["occ"].unique().tolist()) <= {-1.0, 1.0}
        assert b["views"].shape == (2, 6, 3, 4, 4) and b["views_c2w"].shape == (2, 6, 4, 4)
        assert b["fine_coords"].shape[1] == 4 and b["fine_coords"].shape[0] == b["fine_sdf"].shape[0]
        assert torch.all(b["fine_coords"][1:, 0] >= b["fine_coords"][:-1, 0]) and len(counts) == 2
    val = list(dm.val_dataloader())  # the held-out shard, condition 0, not shuffled
    assert [k for b in val for k in b["__key__"]] == ["obj2x0", "obj2x1", "obj2x2"]
    assert [int(c) for b in val for c in b["cond_index"]] == [0, 0, 0]


class _Recorder(LightningModule):
    """Counts what a Trainer feeds it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.train_seen: list[tuple[int, str, int]] = []
        self.val_seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_seen += [(self.current_epoch, k, int(c)) for k, c in zip(batch["__key__"], batch["cond_index"])]
        return (batch["target"].mean() * self.w - 1.0) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_seen += batch["__key__"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_with_two_workers(shards):
    d, _ = shards
    cfg = loader_cfg(d, 2, resampled=True, epoch_samples=6, batch_size=2, num_workers=2)
    dm, model = MultiViewDataModule(cfg), _Recorder()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 * 3
    per_epoch = [[(k, c) for e, k, c in model.train_seen if e == epoch] for epoch in (0, 1)]
    assert len(per_epoch[0]) == len(per_epoch[1]) == 6 and per_epoch[0] != per_epoch[1]
    assert sorted(model.val_seen) == sorted(["obj2x0", "obj2x1", "obj2x2"] * 2)  # the held-out shard, every epoch


def test_shard_folder_and_glob_specs_tolerate_gaps(tmp_path):
    from one2345pp.data.datamodule import _expand

    for idx in (0, 2, 5):  # ranks number their own shards, so builder output can have gaps
        (tmp_path / f"shard-{idx:06d}.tar").write_bytes(b"")
    expected = [str(tmp_path / f"shard-{i:06d}.tar") for i in (0, 2, 5)]
    assert _expand(str(tmp_path)) == expected
    assert _expand(str(tmp_path / "shard-*.tar")) == expected
    with pytest.raises(FileNotFoundError):
        _expand(str(tmp_path / "nothing-*.tar"))
