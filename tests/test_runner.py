from dataclasses import dataclass, field

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from one2345pp.training.config import RunConfig, TrainerConfig
from one2345pp.training.runner import fit


class Toy(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.w(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.w(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ToyData(LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        self.ds = TensorDataset(x, x.sum(1, keepdim=True))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=8)


@dataclass
class ToyConfig:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def cfg(tmp_path, **run):
    c = OmegaConf.structured(ToyConfig)
    c.run = OmegaConf.merge(c.run, {"root": str(tmp_path), "name": "r", **run})
    c.trainer = OmegaConf.merge(c.trainer, {"max_steps": 5, "enable_progress_bar": False, "accelerator": "cpu"})
    return c


def test_fit_writes_run_dir_and_resume_continues_the_step_count(tmp_path):
    trainer, directory = fit("toy", cfg(tmp_path), Toy(), ToyData())
    assert trainer.global_step == 5
    assert directory == tmp_path / "toy" / "r"
    assert (directory / "config.yaml").is_file() and (directory / "ckpts" / "last.ckpt").is_file()
    assert OmegaConf.load(directory / "config.yaml").trainer.max_steps == 5
    c = cfg(tmp_path, resume="last")
    c.trainer.max_steps = 8
    module = Toy()
    trainer, _ = fit("toy", c, module, ToyData())
    assert trainer.global_step == 8  # 5 restored + 3 more
    state = torch.load(directory / "ckpts" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 8 and state["optimizer_states"][0]["state"]


class FullBatch(ToyData):
    """One batch per epoch: every step sees the same data, with or without an interruption."""

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=len(self.ds))


def _losses(directory):
    import csv

    rows = list(csv.DictReader(open(directory / "logs" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_resumed_loss_continues_the_logged_curve(tmp_path):
    """5 steps, stop, resume to 8 = 8 uninterrupted steps (weights, Adam state and step restored), and the resumed
    run's metrics.csv holds the whole curve (Lightning's CSV logger would start it afresh)."""

    def run(name, steps, **extra):
        c = cfg(tmp_path, name=name, **extra)
        c.trainer.max_steps, c.trainer.log_every_n_steps = steps, 1
        torch.manual_seed(0)
        return fit("toy", c, Toy(), FullBatch())[1]

    reference = _losses(run("straight", 8))
    assert sorted(reference) == list(range(8)) and reference[7] < reference[0]
    before = _losses(run("stopped", 5))
    assert sorted(before) == list(range(5))
    resumed = _losses(run("stopped", 8, resume="last"))
    assert sorted(resumed) == list(range(8))  # the rows before the interruption are kept
    for step in range(8):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step
    # the first resumed loss continues the curve: as far from the last loss before stopping as in the reference
    assert resumed[5] - before[4] == pytest.approx(reference[5] - reference[4], rel=1e-4, abs=1e-7)


class Worsening(Toy):
    """val/loss grows with every validation: the top-k checkpoint stays at the first one."""

    def validation_step(self, batch, _):
        self.log("val/loss", float(self.global_step))


def test_last_checkpoint_is_the_latest_state_when_the_monitored_metric_stops_improving(tmp_path):
    c = cfg(tmp_path, save_top_k=1)
    c.trainer.max_steps = 20  # validations after the epochs of 8 batches (steps 8, 16); training stops at 20
    trainer, directory = fit("toy", c, Worsening(), ToyData())
    ckpts = directory / "ckpts"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000008.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20  # Lightning's save_last alone left it at the top-k step, 8
    assert torch.equal(last["state_dict"]["w.weight"], trainer.lightning_module.w.weight.detach())
    c = cfg(tmp_path, save_top_k=1, resume="last")
    c.trainer.max_steps = 24
    trainer, _ = fit("toy", c, Worsening(), ToyData())
    assert trainer.global_step == 24 and torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 24


def test_last_checkpoint_follows_the_step_interval_between_validations(tmp_path):
    class Probe(Callback):  # runs after the run's own callbacks: sees last.ckpt as a crash at this step would
        seen = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            last = tmp_path / "toy" / "r" / "ckpts" / "last.ckpt"
            if last.is_file():
                self.seen[trainer.global_step] = torch.load(last, weights_only=True)["global_step"]

    c = cfg(tmp_path, every_n_train_steps=3)
    c.trainer.max_steps = 7  # one epoch is 8 batches: no validation before the end
    _, directory = fit("toy", c, Worsening(), ToyData(), [Probe()])
    assert Probe.seen == {3: 3, 4: 3, 5: 3, 6: 6, 7: 6}
    assert torch.load(directory / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 7  # at the end


def test_resume_last_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        fit("toy", cfg(tmp_path, name="nothing", resume="last"), Toy(), ToyData())


def test_runs_without_a_terminal_print_progress_lines(tmp_path, capsys):
    import io

    from one2345pp.training.progress import LineProgress, progress_callback

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_callback("toy", 2, Tty()) is None  # a terminal keeps Lightning's bar
    assert isinstance(progress_callback("toy", 2, io.StringIO()), LineProgress)
    bar = LineProgress("toy", 2, io.StringIO())  # LightningModule.print asks the bar whether it is enabled
    assert bar.is_enabled
    bar.disable()
    assert not bar.is_enabled
    c = cfg(tmp_path)
    c.trainer.enable_progress_bar = True
    c.trainer.log_every_n_steps = 3
    c.trainer.max_steps = 8  # one epoch of 8 batches, then validation
    fit("toy", c, Toy(), ToyData())  # pytest's captured stderr is not a terminal
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[toy] ")]
    steps = [ln.split()[2] for ln in lines if ln.split()[1] == "step"]
    assert steps == ["3/8", "6/8", "8/8"]
    assert all("it/s" in ln and "train/loss" in ln for ln in lines if ln.split()[1] == "step")
    assert lines[0] == "[toy] training from step 0 to 8" and lines[-1].startswith("[toy] done at step 8")
    assert any(ln.startswith("[toy] validation at step 8: val/loss") for ln in lines)
