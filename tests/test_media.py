"""Images and meshes reach the run directory and each logger kind (W&B offline, TensorBoard, CSV)."""

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from one2345pp.geometry.mesh import Mesh
from one2345pp.geometry.mesh_io import save_mesh
from one2345pp.training.media import as_uint8_image, log_image, log_mesh
from one2345pp.training.runner import RunConfig, make_logger


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
