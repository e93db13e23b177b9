import io
import json
import tarfile

import numpy as np
import pytest
import trimesh
import webdataset as wds
from PIL import Image

from one2345pp.cameras import Camera, untile
from one2345pp.cli import main
from one2345pp.config import ConfigError
from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
from one2345pp.data.shards import Manifest, build_shards
from one2345pp.data.sources import gso_items

K = 2
RES = 48


def tiny_cfg(**kw) -> DataConfig:
    base = dict(
        view_resolution=RES,
        cond_resolution=RES,
        cond_samples=K,
        render=RenderConfig(supersample=2),
        volume=VolumeConfig(coarse_resolution=16),
        procedural=ProceduralConfig(seed=3),
    )
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    res = build_shards("procedural", out, tiny_cfg(), num_objects=4, workers=1, progress=False)
    return out, res


FIELDS = sorted([f"cond{k}.png" for k in range(K)] + [f"mv{k}.png" for k in range(K)])
FIELDS = sorted(FIELDS + ["cams.json", "occ.npz", "fine.npz", "meta.json"])


def test_shards_have_exactly_the_specified_fields(built):
    out, res = built
    assert res.done == 4 and res.failed == 0
    shards = sorted(out.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    keys = sorted({n.split(".", 1)[0] for n in names})
    assert len(keys) == 4
    for key in keys:
        assert "." not in key
        assert sorted(n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == key) == FIELDS
    samples = list(wds.WebDataset(str(shards[0]), shardshuffle=False).decode("pilrgba"))
    assert len(samples) == 4
    s = samples[0]
    assert s["cond0.png"].mode == "RGBA" and s["cond0.png"].size == (RES, RES)
    assert s["mv1.png"].mode == "RGBA" and s["mv1.png"].size == (2 * RES, 3 * RES)  # 2 wide x 3 high
    cams = s["cams.json"]
    assert set(cams) >= {"fov_deg", "resolution", "layout", "samples"} and len(cams["samples"]) == K
    for smp in cams["samples"]:
        assert len(smp["views"]) == 6
        for cam in [smp["cond"], *smp["views"]]:
            assert set(cam) == {"azimuth_deg", "elevation_deg", "distance", "c2w"}
            assert np.asarray(cam["c2w"]).shape == (4, 4)
    occ = s["occ.npz"]["occ"]
    assert occ.dtype == np.uint8 and occ.shape == (16, 16, 16) and occ.any()
    fine = s["fine.npz"]
    assert fine["coords"].dtype == np.int16 and fine["coords"].shape[1] == 3
    assert fine["sdf"].dtype == np.float32 and fine["rgb"].dtype == np.uint8 and fine["rgb"].shape[1] == 3
    assert len(fine["coords"]) == 8 * int(occ.sum())
    meta = s["meta.json"]
    for k in ("uid", "source", "normalize_scale", "normalize_offset", "shell_threshold", "sdf_truncation"):
        assert k in meta
    assert meta["uid"] == s["__key__"]


def test_fine_cells_project_inside_the_alpha_of_every_view(built):
    """Cells inside the object (sdf < 0) project into the silhouette of every view through cams.json: within one
    pixel of a covered pixel always, and onto a fully covered pixel when deeper than 1.5 pixel footprints."""
    from scipy.ndimage import binary_dilation

    out, _ = built
    checked_deep = 0
    for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode("rgba8"):
        fine, cams = s["fine.npz"], s["cams.json"]
        fres = s["meta.json"]["fine_resolution"]
        sel = fine["sdf"] < 0
        assert sel.any()
        pts = -0.5 + (fine["coords"][sel].astype(np.float64) + 0.5) / fres
        depth_in = -fine["sdf"][sel]
        for k, smp in enumerate(cams["samples"]):
            alphas = [s[f"cond{k}.png"][..., 3]] + list(untile(s[f"mv{k}.png"])[..., 3])
            for cam_d, alpha in zip([smp["cond"], *smp["views"]], alphas, strict=True):
                cam = Camera.from_dict(cam_d, cams["fov_deg"], alpha.shape[0])
                uv, z = cam.project(pts)
                assert (z > 0).all()
                ij = np.floor(uv).astype(int)
                assert ((ij >= 0) & (ij < alpha.shape[0])).all()
                near = binary_dilation(alpha > 0, np.ones((3, 3), bool))
                assert near[ij[:, 1], ij[:, 0]].all()
                deep = depth_in > 1.5 * z / cam.K[0, 0]
                assert (alpha[ij[deep, 1], ij[deep, 0]] == 255).all()
                checked_deep += int(deep.sum())
    assert checked_deep > 100


def test_rerun_skips_finished_objects(built):
    out, _ = built
    res = build_shards("procedural", out, tiny_cfg(), num_objects=4, workers=1, progress=False)
    assert (res.done, res.skipped, res.failed) == (0, 4, 0)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar"]
    res = build_shards("procedural", out, tiny_cfg(), num_objects=5, workers=1, progress=False)
    assert (res.done, res.skipped) == (1, 4)
    assert res.shards == ["shard-000001.tar"]


def test_other_settings_into_the_same_folder_are_refused(built):
    out, _ = built
    with pytest.raises(ConfigError, match="cond_samples"):
        build_shards("procedural", out, tiny_cfg(cond_samples=1), num_objects=4, progress=False)


def test_rank_partitions_are_disjoint_and_complete(tmp_path):
    n, world = 5, 2
    seen = []
    for rank in range(world):
        res = build_shards(
            "procedural", tmp_path, tiny_cfg(), num_objects=n, rank=rank, world_size=world, progress=False
        )
        assert all(int(name[6:12]) % world == rank for name in res.shards)
        seen.append({r["uid"] for r in Manifest(tmp_path / "manifest.jsonl").load().values()})
    from one2345pp.data.procedural import object_uid

    everything = {object_uid(3, i) for i in range(n)}
    assert seen[1] == everything
    keys = []
    for shard in sorted(tmp_path.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.split(".", 1)[0] for m in tar.getnames()})
    assert sorted(keys) == sorted(everything)  # every object exactly once


def test_bad_meshes_are_recorded_and_the_job_goes_on(tmp_path, capsys):
    src = tmp_path / "meshes"
    src.mkdir()
    trimesh.creation.icosphere(2).export(src / "good.ply")
    (src / "broken.obj").write_bytes(b"\x00garbage\xff" * 20)
    (src / "nan.obj").write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    (src / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    (src / "empty.glb").write_bytes(b"")
    out = tmp_path / "out"
    args = [
        "data",
        "build",
        "--source",
        "folder",
        "--input",
        str(src),
        "--out",
        str(out),
        "--no-progress",
        f"data.view_resolution={RES}",
        f"data.cond_resolution={RES}",
        "data.cond_samples=1",
        "data.volume.coarse_resolution=16",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "done 1 / skipped 0 / failed 4" in printed
    records = Manifest(out / "manifest.jsonl").load()
    status = {r["source"].rsplit("/", 1)[1]: (r["status"], r.get("reason", "")) for r in records.values()}
    assert status["good.ply"][0] == "done"
    assert status["nan.obj"] == ("failed", status["nan.obj"][1]) and "NaN" in status["nan.obj"][1]
    assert "degenerate" in status["flat.obj"][1]
    assert "empty" in status["empty.glb"][1]
    assert status["broken.obj"][0] == "failed"
    assert (out / "config.yaml").is_file()
    # the rerun retries nothing and still exits 0
    assert main(args) == 0
    assert "done 0 / skipped 5 / failed 0" in capsys.readouterr().out


def test_gso_layout_uses_the_texture_folder(tmp_path):
    obj = tmp_path / "gso" / "Toy_Car"
    (obj / "meshes").mkdir(parents=True)
    (obj / "materials" / "textures").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).save(obj / "materials" / "textures" / "texture.png")
    (obj / "meshes" / "model.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd texture.png\n")  # not beside the obj
    (obj / "meshes" / "model.obj").write_text(
        "mtllib model.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\n"
        "usemtl m\nf 1/1 3/3 2/2\nf 1/1 2/2 4/4\nf 1/1 4/4 3/3\nf 2/2 3/3 4/4\n"
    )
    (tmp_path / "gso" / "No_Mesh").mkdir()
    items = gso_items(tmp_path / "gso")
    assert [i.uid.split("-")[0] for i in items] == ["No_Mesh", "Toy_Car"]
    mesh = items[1].load()
    assert mesh.materials[0].texture is not None
    np.testing.assert_allclose(mesh.surface_color([0], [[0.3, 0.3]])[0, :3], np.array([10, 200, 30]) / 255, atol=1e-6)
    with pytest.raises(Exception, match="file not found"):
        items[0].load()


def test_stale_temporary_shards_are_removed(tmp_path):
    (tmp_path / "shard-000000.tar.tmp").write_bytes(b"half")
    res = build_shards("procedural", tmp_path, tiny_cfg(), num_objects=1, progress=False)
    assert res.shards == ["shard-000000.tar"] and not list(tmp_path.glob("*.tmp"))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("meta.json"))
        meta = json.load(io.TextIOWrapper(tar.extractfile(member)))
    assert meta["normalize_extent"] == 0.9


def test_a_torn_manifest_line_does_not_swallow_the_next_record(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    manifest.append([{"uid": "a", "status": "done"}])
    with open(manifest.path, "a") as f:
        f.write('{"uid": "b", "sta')  # a job killed mid-write
    manifest.append([{"uid": "c", "status": "done"}])
    assert sorted(manifest.load()) == ["a", "c"]


@pytest.mark.parametrize("workers", [1, 2])
def test_impossible_settings_fail_before_anything_is_written(tmp_path, workers):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="blue"):
        build_shards(
            "procedural",
            out,
            tiny_cfg(render=RenderConfig(background="blue")),
            num_objects=2,
            workers=workers,
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown camera layout"):
        build_shards("procedural", out, tiny_cfg(layout="zero123"), num_objects=2, workers=workers, progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_two_workers_build_the_same_samples_as_one(tmp_path):
    # 2 samples a shard: which objects land in which shard (the last one is held out for validation) and their
    # order must not depend on which worker finished first
    cfg = tiny_cfg(shards=ShardConfig(max_samples=2))
    one = build_shards("procedural", tmp_path / "one", cfg, num_objects=5, workers=1, progress=False)
    two = build_shards("procedural", tmp_path / "two", cfg, num_objects=5, workers=2, progress=False)
    assert one.done == two.done == 5

    def contents(folder):
        out = {}
        for shard in sorted(folder.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith((".npz", ".json")):
                        out[f"{shard.name}/{m.name}"] = tar.extractfile(m).read()
        return out

    a, b = contents(tmp_path / "one"), contents(tmp_path / "two")
    assert list(a) == list(b)  # the same objects in the same shards, in the same order
    assert all(a[k] == b[k] for k in a if not k.endswith("meta.json"))  # meta names the (different) mesh path
