"""Training at scale: run names every rank of a launch agrees on (SLURM, torchrun, Lightning's DDP launcher), the
config written by global rank 0 only, and real two-process DDP runs (gloo, CPU) of the tiny coarse stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from one2345pp.config import ConfigError
from one2345pp.training.config import RunConfig, TrainerConfig
from one2345pp.training.naming import launcher_world_size, run_dir
from one2345pp.training.runner import write_run_config
from one2345pp.training.trainer import build_trainer


# what `srun --ntasks-per-node=2` on one node gives task `rank` (trimmed to what Lightning and the runner read)
def slurm_env(rank: int, job: str = "4242", step: str = "0") -> dict:
    return {
        "SLURM_JOB_ID": job,
        "SLURM_STEP_ID": step,
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODELIST": "node7",
    }


# what `torchrun --standalone --nproc-per-node=2` gives worker `rank`
def torchrun_env(rank: int, run_id: str = "5c1d6e0a-1b2c-4d5e-8f90-0123456789ab") -> dict:
    return {
        "TORCHELASTIC_RUN_ID": run_id,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }


LAUNCH_VARS = sorted({*slurm_env(0), *torchrun_env(0), "ONE2345PP_RUN_NAME", "WANDB_SWEEP_ID", "WANDB_RUN_ID"})


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the machine running the tests."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_every_rank_of_a_launch_resolves_the_same_run_directory(tmp_path):
    run = RunConfig(root=str(tmp_path))
    slurm = {run_dir("coarse", run, slurm_env(r)) for r in (0, 1)}
    assert slurm == {tmp_path / "coarse" / "slurm-4242"}
    # the second `srun` of one job script is another run; a requeued job (same id, step 0 again) is the same one
    assert run_dir("coarse", run, slurm_env(1, step="1")) == tmp_path / "coarse" / "slurm-4242.1"
    torchrun = {run_dir("coarse", run, torchrun_env(r)) for r in (0, 1)}
    assert torchrun == {tmp_path / "coarse" / "torchrun-5c1d6e0a-1b2c-4d5e-8f90-0123456789ab"}
    # Lightning's own DDP launcher re-runs the command for local rank 1 with the name rank 0 handed down
    child = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "ONE2345PP_RUN_NAME": "20261201-101010-ab12"}
    assert run_dir("coarse", run, child) == tmp_path / "coarse" / "20261201-101010-ab12"
    # a W&B sweep trial is named after its run id (several trials of one agent in one SLURM job stay apart)
    trial = {**slurm_env(0), "WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "r7x"}
    assert run_dir("coarse", run, trial).name == "sweep-r7x"
    # an explicit name always wins
    named = RunConfig(root=str(tmp_path), name="coarse-a")
    assert {run_dir("coarse", named, e) for e in (slurm_env(1), torchrun_env(0), {})} == {tmp_path / "coarse/coarse-a"}


def test_unnamed_runs_of_one_process_get_distinct_names_and_unnamable_launches_are_refused(tmp_path):
    run = RunConfig(root=str(tmp_path))
    names = {run_dir("fine", run, {}).name for _ in range(20)}
    assert len(names) == 20  # timestamp + random suffix: sweep trials started in the same second stay apart
    # SLURM's interactive mode is not a multi-process launch; one task under srun is a single process
    assert launcher_world_size({**slurm_env(0), "SLURM_JOB_NAME": "interactive"}) == 1
    assert launcher_world_size({**slurm_env(0), "SLURM_NTASKS": "1"}) == 1
    # torchrun without --standalone / --rdzv-id has the run id "none", shared by unrelated jobs: refused
    with pytest.raises(ConfigError, match="run.name=NAME"):
        run_dir("fine", run, torchrun_env(0, run_id="none"))
    with pytest.raises(ConfigError, match="one of 4 processes"):
        run_dir("fine", run, {"WORLD_SIZE": "4", "RANK": "3"})


@dataclass
class _Cfg:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
def test_only_global_rank_zero_writes_the_config(tmp_path, clean_env, launcher):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    clean_env.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the DDP strategy sets it process-wide
    trainer_cfg = TrainerConfig(accelerator="cpu", devices="2", strategy="ddp", enable_progress_bar=False)
    cfg = OmegaConf.structured(_Cfg(run=RunConfig(root=str(tmp_path)), trainer=trainer_cfg))
    written = {}
    for rank in (1, 0):
        for var, value in (slurm_env(rank) if launcher == "slurm" else torchrun_env(rank)).items():
            clean_env.setenv(var, value)
        directory = run_dir("coarse", cfg.run)
        trainer = build_trainer(trainer_cfg, cfg.run, directory, "coarse")  # the cluster environment Lightning detects
        assert (trainer.global_rank, trainer.world_size) == (rank, 2)
        written[rank] = write_run_config(trainer, cfg, directory)
        if rank == 1:
            assert written[1] is None and not directory.exists()
    assert written[0] == directory / "config.yaml" and OmegaConf.load(written[0]).trainer.devices == "2"


# ------------------------------------------------------------------------------------------------- real DDP runs
RANK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from lightning.pytorch.callbacks import Callback
from one2345pp.config import load_config, to_object
from one2345pp.data.datamodule import VolumeDataModule
from one2345pp.stages.coarse import CoarseConfig, CoarseStage
from one2345pp.training.runner import fit

out, overrides = Path(sys.argv[1]), sys.argv[2:]


class Record(Callback):
    # what this rank saw: the seed training started from, the samples of its batches, its losses
    def on_train_start(self, trainer, pl_module):
        self.seed, self.uids, self.losses = torch.initial_seed(), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.uids += [m["uid"] for m in batch["meta"]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        doc = {"rank": trainer.global_rank, "world_size": trainer.world_size, "step": trainer.global_step,
               "seed": self.seed, "uids": self.uids, "losses": self.losses, "root": trainer.default_root_dir,
               "weight": float(next(pl_module.parameters()).detach().flatten()[0])}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(doc))


cfg = load_config(CoarseConfig, None, overrides)
conf = to_object(cfg)
fit("coarse", cfg, lambda: CoarseStage(conf), VolumeDataModule(conf.data), callbacks=[Record()])
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
    from one2345pp.data.shards import build_shards

    out = tmp_path_factory.mktemp("ddp_shards")
    cfg = DataConfig(
        view_resolution=32,
        cond_resolution=32,
        cond_samples=1,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=16),
        procedural=ProceduralConfig(seed=7, texture_resolution=32),
        shards=ShardConfig(max_samples=2),
    )
    build_shards("procedural", out, cfg, num_objects=8, progress=False)  # 4 shards: 2 per rank for validation
    return out


def tiny_ddp_overrides(root: Path, shards: Path) -> list[str]:
    """The tiny coarse run of tests/test_coarse.py on two CPU processes (gloo), run.name unset."""
    from test_coarse import tiny_overrides

    extra = {
        "model.diffusion.sample_steps": 3,
        # every rank needs validation batches (the stage's sync_dist reductions wait for all ranks): with 4 shards
        # split by node each rank reads 2
        "data.val_shards": str(shards),
        "data.epoch_samples": 4,
        "trainer.max_steps": 2,
        "trainer.devices": 2,
        "trainer.strategy": "ddp",
    }
    return [
        o for o in tiny_overrides(root, shards, **extra) if not o.startswith(("run.name=", "model.unet.channels_last="))
    ]


@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
@pytest.mark.slow
def test_two_process_ddp_run_shares_one_run_directory(shards, tmp_path, launcher):
    """torchrun starts both workers (the run is named after its rendezvous id); Lightning's DDP launcher re-runs
    the script for local rank 1 (the name is handed down). Gloo on CPU; run.name unset in both."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "ranks"
    out.mkdir()
    root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [str(script), str(out), *tiny_ddp_overrides(root, shards)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    runs = list((root / "coarse").iterdir())
    assert len(runs) == 1, runs  # one run directory for both processes
    run = runs[0]
    assert run.name.startswith("torchrun-") if launcher == "torchrun" else not run.name.startswith("torchrun-")
    assert {r["root"] for r in ranks} == {str(run)}
    assert [p.name for p in run.glob("**/config.yaml")] == ["config.yaml"]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.trainer.devices == "2" and saved.run.name == run.name  # the derived name is recorded
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [2, 2]  # both ranks reach the same global step
    assert torch.load(run / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 2
    # gradients are averaged: the weights are the same on both ranks after the steps
    assert ranks[0]["weight"] == ranks[1]["weight"]
    # per-rank seeds: run.seed + global rank, hence other noise and another sample stream on each rank
    assert [r["seed"] for r in ranks] == [0, 1]
    assert ranks[0]["uids"] != ranks[1]["uids"] and len(ranks[0]["uids"]) == 4
    assert ranks[0]["losses"] != ranks[1]["losses"]


SPAWN_SCRIPT = """
import json, sys
from dataclasses import dataclass, field
from pathlib import Path
import torch
from lightning.pytorch import LightningModule
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from one2345pp.training.config import RunConfig, TrainerConfig
from one2345pp.training.runner import fit


class Toy(LightningModule):
    def __init__(self, out):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)
        self.out = out

    def on_train_start(self):
        self.seed, self.noise = torch.initial_seed(), torch.rand(2).tolist()

    def training_step(self, batch, _):
        return (self.w(batch[0]) ** 2).mean()

    def on_train_end(self):
        doc = {"seed": self.seed, "noise": self.noise, "step": self.trainer.global_step,
               "root": self.trainer.default_root_dir}
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(doc))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)


@dataclass
class Cfg:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


if __name__ == "__main__":
    cfg = OmegaConf.structured(Cfg(run=RunConfig(root=sys.argv[2], seed=5, monitor=None)))
    cfg.trainer = OmegaConf.merge(cfg.trainer, {"max_steps": 2, "accelerator": "cpu", "devices": "2",
                                                "strategy": "ddp_fork", "enable_progress_bar": False})
    fit("toy", cfg, Toy(sys.argv[1]), None)
"""


@pytest.mark.slow
def test_forked_or_spawned_workers_get_per_rank_seeds(tmp_path):
    """ddp_spawn starts fresh processes that Lightning re-seeds with the launching process's seed; the runner's
    ``setup`` hook gives each its own again (without it both ranks draw the same noise)."""
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path / "runs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["seed"] for r in ranks] == [5, 6] and ranks[0]["noise"] != ranks[1]["noise"]
    assert [r["step"] for r in ranks] == [2, 2] and ranks[0]["root"] == ranks[1]["root"]
    assert len(list((tmp_path / "runs" / "toy").glob("*/config.yaml"))) == 1
