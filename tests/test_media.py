"""Images and meshes reach the run directory and each logger kind (W&B offline, TensorBoard, CSV)."""

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from one2345pp.geometry.mesh import Mesh
from one2345pp.geometry.mesh_io import save_mesh
from one2345pp.training.config import RunConfig
from one2345pp.training.loggers import make_logger
from one2345pp.training.media import as_uint8_image, log_image, log_mesh


class _Tiny(LightningModule):
    def __init__(self, mesh_file):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.mesh_file = mesh_file

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def on_train_end(self):
        grid = np.zeros((8, 12, 3), np.uint8)
        grid[:, :6] = 255
        log_image(self.trainer, "val/grid", grid)
        log_mesh(self.trainer, "val/mesh", self.mesh_file)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)


@pytest.mark.parametrize("kind", ["csv", "tensorboard", "wandb"])
def test_media_reach_run_dir_and_logger(tmp_path, monkeypatch, kind):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tri = Mesh(
        vertices=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]), faces=np.array([[0, 1, 2], [0, 1, 3]])
    )
    mesh_file = save_mesh(tri, tmp_path / "m.glb")
    run = tmp_path / "run"
    logger = make_logger(RunConfig(logger=kind), run, "test")
    trainer = Trainer(
        default_root_dir=str(run),
        max_steps=2,
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(_Tiny(mesh_file))
    png = run / "media" / "val_grid" / "step0000002.png"
    glb = run / "media" / "val_mesh" / "step0000002.glb"
    assert png.is_file() and glb.is_file()
    assert glb.read_bytes() == mesh_file.read_bytes()
    logs = run / "logs"
    if kind == "tensorboard":
        assert list(logs.rglob("events.out.tfevents.*"))
    if kind == "wandb":
        assert logger.experiment.settings.mode == "offline"
        files = [p.name for p in logs.rglob("*") if p.is_file()]
        assert any(name.endswith(".png") for name in files), files
        assert any(name.endswith(".glb") for name in files), files
        logger.experiment.finish()


def test_as_uint8_image_layouts():
    chw = torch.zeros(3, 4, 5)
    chw[0] = 1.0
    img = as_uint8_image(chw)
    assert img.shape == (4, 5, 3) and img[..., 0].min() == 255 and img[..., 1].max() == 0
    with pytest.raises(ValueError, match="HW, HWC or CHW"):
        as_uint8_image(np.zeros((2, 2, 2, 2)))


# ------------------------------------------------------------------------------------- a W&B run through fit()
def wandb_records(run_file):
    """The protobuf records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header: CRC32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def wandb_history(run_file) -> list[dict]:
    """The logged rows (``wandb.log`` calls) of an offline run file: ``{key: JSON text}``."""
    return [
        {(item.key or "/".join(item.nested_key)): item.value_json for item in r.history.item}
        for r in wandb_records(run_file)
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_holds_config_losses_images_and_meshes(tmp_path, monkeypatch):
    """A stage-like run with run.logger=wandb and no key: an offline run under RUN/logs/wandb/ with the resolved
    config, the losses, the image and the 3D object; a resumed run logs into the same W&B run id."""
    import json

    import wandb
    from omegaconf import OmegaConf

    from one2345pp.training.loggers import WANDB_ID_FILE
    from one2345pp.training.runner import fit
    from test_runner import FullBatch, Toy, cfg

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored login either
    tri = Mesh(
        vertices=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]), faces=np.array([[0, 1, 2], [0, 1, 3]])
    )
    mesh_file = save_mesh(tri, tmp_path / "m.glb")

    class Shows(Toy):
        def on_validation_epoch_end(self):
            if self.trainer.global_step == 3:
                log_image(self.trainer, "val/grid", np.full((8, 12, 3), 200, np.uint8))
                log_mesh(self.trainer, "val/mesh", mesh_file)

    c = cfg(tmp_path, logger="wandb", name="wb")
    c.trainer.max_steps, c.trainer.log_every_n_steps = 3, 1
    fit("toy", c, Shows(), FullBatch())
    logs = tmp_path / "toy" / "wb" / "logs"
    (offline,) = logs.glob("wandb/offline-run-*")
    run_id = (logs / WANDB_ID_FILE).read_text().strip()
    assert offline.name.endswith(run_id)
    wandb.teardown()  # fit() finished the run; the W&B service writes its file until it shuts down (or exits)
    records = wandb_records(offline / f"run-{run_id}.wandb")
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["trainer"]["max_steps"] == 3 and config["run"]["name"] == "wb" and config["run"]["logger"] == "wandb"
    history = wandb_history(offline / f"run-{run_id}.wandb")
    losses = [h for h in history if "train/loss" in h]
    assert [int(h["trainer/global_step"]) for h in losses] == [0, 1, 2]
    assert any("val/loss" in h for h in history)
    assert any(json.loads(h.get("val/grid/_type", "null")) == "images/separated" for h in history)
    assert any(json.loads(h.get("val/mesh/_type", "null")) == "object3D-file" for h in history)
    assert list(offline.glob("files/media/images/val/grid_*.png"))
    (glb,) = offline.glob("files/media/object3D/val/mesh_*.glb")
    assert glb.read_bytes() == mesh_file.read_bytes()

    c = cfg(tmp_path, logger="wandb", name="wb", resume="last")
    c.trainer.max_steps, c.trainer.log_every_n_steps = 5, 1
    fit("toy", c, Toy(), FullBatch())
    resumed = sorted(logs.glob("wandb/offline-run-*"))
    assert len(resumed) == 2 and all((p / f"run-{run_id}.wandb").is_file() for p in resumed)
    assert (logs / WANDB_ID_FILE).read_text().strip() == run_id
    assert OmegaConf.load(tmp_path / "toy" / "wb" / "config.yaml").trainer.max_steps == 5


def test_a_ply_mesh_reaches_wandb_as_glb(tmp_path, monkeypatch):
    import trimesh

    from one2345pp.geometry.mesh_io import load_mesh

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 128, 30]], np.uint8)
    tri = trimesh.Trimesh(
        np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]), np.array([[0, 1, 2], [0, 1, 3]]), process=False
    )
    tri.visual.vertex_colors = colours
    ply = tmp_path / "m.ply"
    tri.export(ply)
    run = tmp_path / "run"
    logger = make_logger(RunConfig(logger="wandb"), run, "test")
    trainer = Trainer(default_root_dir=str(run), logger=logger, enable_checkpointing=False)
    assert log_mesh(trainer, "val/mesh", ply, step=3) == run / "media" / "val_mesh" / "step0000003.ply"
    glb = run / "media" / "val_mesh" / "step0000003.glb"
    # the GLB is in glTF's convention: +Y up ((x, y, z) -> (x, z, -y)) ...
    raw = trimesh.load(glb, force="mesh")
    assert raw.faces.shape == (2, 3) and len(raw.vertices) == 4
    x, y, z = tri.vertices.T
    np.testing.assert_allclose(np.unique(raw.vertices, axis=0), np.unique(np.stack([x, z, -y], 1), axis=0))
    (geom,) = trimesh.load(glb).geometry.values()
    stored = np.asarray(geom.visual.vertex_attributes["color"])[:, :3]  # COLOR_0 holds linear values
    orange = [1.0, ((128 / 255 + 0.055) / 1.055) ** 2.4, ((30 / 255 + 0.055) / 1.055) ** 2.4]
    assert np.any(np.all(np.abs(stored - orange) < 1e-5, axis=1)), stored
    # ... so the project's reader sees the PLY's +Z-up mesh and its colours again (within half a level)
    back = load_mesh(glb)
    assert back.faces.shape == (2, 3)
    corners = np.concatenate([back.vertices[back.faces], back.corner_colors[..., :3] * 255], axis=2).reshape(-1, 6)
    expected = np.concatenate([tri.vertices[tri.faces], colours[tri.faces].astype(float)], axis=2).reshape(-1, 6)
    np.testing.assert_allclose(np.unique(corners.round(4), axis=0), np.unique(expected, axis=0), atol=0.5)
    (logged,) = (run / "logs").rglob("media/object3D/val/mesh_*.glb")
    assert logged.read_bytes() == glb.read_bytes()
    logger.experiment.finish()


def test_wandb_is_offline_unless_a_key_or_wandb_mode_says_otherwise(tmp_path):
    from one2345pp.training.loggers import wandb_offline

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    none = str(tmp_path / "missing")
    assert wandb_offline({"NETRC": none})  # nothing set: offline
    assert not wandb_offline({"NETRC": none, "WANDB_API_KEY": "k"})
    assert not wandb_offline({"NETRC": str(netrc)})  # `wandb login` stored a key for the W&B host
    assert wandb_offline({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})  # not for this host
    assert wandb_offline({"NETRC": none, "WANDB_API_KEY": "k", "WANDB_MODE": "offline"})
    assert not wandb_offline({"NETRC": none, "WANDB_MODE": "online"})
