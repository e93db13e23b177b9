"""The one place where a stage becomes a Lightning run: run directory, resolved config, seeds, logger, checkpoints,
resume, trainer.

Every stage's ``train(config_path, overrides)`` loads its own typed config (which contains ``run: RunConfig`` and
``trainer: TrainerConfig``), builds its LightningModule and DataModule, and calls :func:`fit`. Runs live in
``<run.root>/<stage>/<run.name>/``::

    config.yaml      the resolved config (written by global rank 0)
    ckpts/           top-k checkpoints and last.ckpt
    logs/            CSV / TensorBoard / W&B files
    export/          what the stage exports for the pipeline (written by the stage)

``run.resume=last`` continues ``ckpts/last.ckpt`` of the same run directory (same global step, optimizer, EMA and
callback states); ``run.resume=PATH`` continues a given checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..config import ConfigError, save_config


@dataclass
class RunConfig:
    name: str | None = None  # run directory name; None: a timestamp (must be set explicitly for multi-node runs)
    root: str = "checkpoints"
    seed: int = 0
    resume: str | None = None  # None, "last" or a checkpoint path
    logger: str = "csv"  # "csv", "tensorboard" or "wandb" (offline unless WANDB_API_KEY or WANDB_MODE says otherwise)
    wandb_project: str = "one2345pp"
    save_top_k: int = 2
    monitor: str | None = "val/loss"  # metric for top-k; None keeps only last.ckpt and periodic ones
    every_n_train_steps: int | None = None  # also checkpoint every N steps (None: at validation only)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_epochs: int = -1
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("4") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp" on clusters
    precision: str = "32-true"  # "bf16-mixed" on GPUs
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_val_batches: float = 1.0
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True


def global_rank() -> int:
    """This process's global rank as the launcher reports it (torchrun, SLURM), before any process group exists."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    return 0


def run_dir(stage: str, run: RunConfig) -> Path:
    """``<root>/<stage>/<name>``; an unnamed run gets a timestamp, shared with the processes a launcher forks."""
    name = run.name or os.environ.get("ONE2345PP_RUN_NAME") or time.strftime("%Y%m%d-%H%M%S")
    os.environ["ONE2345PP_RUN_NAME"] = name
    return Path(run.root) / stage / name


def make_logger(run: RunConfig, directory: Path, stage: str):
    from lightning.pytorch import loggers

    if run.logger == "csv":
        return loggers.CSVLogger(str(directory), name="logs", version="")
    if run.logger == "tensorboard":
        return loggers.TensorBoardLogger(str(directory), name="logs", version="")
    if run.logger == "wandb":
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        return loggers.WandbLogger(
            project=run.wandb_project, name=f"{stage}/{directory.name}", save_dir=str(directory / "logs")
        )
    raise ConfigError(f"run.logger must be csv, tensorboard or wandb, got {run.logger!r}")


def resume_path(run: RunConfig, directory: Path) -> str | None:
    if run.resume is None:
        return None
    if run.resume == "last":
        last = directory / "ckpts" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"run.resume=last but {last} does not exist (is run.name the run to continue?)")
        return str(last)
    if not Path(run.resume).is_file():
        raise FileNotFoundError(f"run.resume: checkpoint not found: {run.resume}")
    return run.resume


def _devices(value: str):
    v = str(value).strip()
    if v == "auto":
        return "auto"
    if "," in v:
        return [int(x) for x in v.split(",") if x.strip()]
    return int(v)


def build_trainer(cfg_trainer: TrainerConfig, run: RunConfig, directory: Path, stage: str, callbacks=()):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    from .progress import progress_callback

    ckpt = ModelCheckpoint(
        dirpath=str(directory / "ckpts"),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=run.save_top_k if run.monitor else 0,
        monitor=run.monitor,
        every_n_train_steps=run.every_n_train_steps,
    )
    logger = make_logger(run, directory, stage)
    cbs = [ckpt, *callbacks]
    t = cfg_trainer
    if t.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in cbs):
        line_progress = progress_callback(stage, max(1, t.log_every_n_steps))  # None on a terminal: Lightning's bar
        if line_progress is not None:
            cbs.append(line_progress)
    if run.logger != "csv":
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return Trainer(
        default_root_dir=str(directory),
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=t.enable_progress_bar,
        logger=logger,
        callbacks=cbs,
    )


def fit(stage: str, cfg, module, datamodule, callbacks=()):
    """Run (or resume) training of one stage; returns ``(trainer, run directory)``.

    ``cfg`` is the stage's resolved structured config (omegaconf) with ``run`` and ``trainer`` sections. ``module`` is
    a LightningModule or a function that builds one: built after seeding with ``run.seed`` so that the initial
    weights are the same on every rank and every rerun. Training then runs with seed ``run.seed + global rank``
    (different noise, dropout and augmentation per rank; Lightning derives the data-loader worker seeds from it).
    """
    from lightning.pytorch import seed_everything

    run: RunConfig = OmegaConf.to_object(cfg.run) if not isinstance(cfg.run, RunConfig) else cfg.run
    trainer_cfg = cfg.trainer if isinstance(cfg.trainer, TrainerConfig) else OmegaConf.to_object(cfg.trainer)
    directory = run_dir(stage, run)
    ckpt_path = resume_path(run, directory)
    if global_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_config(cfg, directory / "config.yaml")
    seed_everything(run.seed, workers=True, verbose=False)
    if callable(module) and not hasattr(module, "training_step"):
        module = module()
    trainer = build_trainer(trainer_cfg, run, directory, stage, callbacks)
    seed_everything(run.seed + trainer.global_rank, workers=True, verbose=False)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    # checkpoints hold tensors and plain containers only (modules keep no pickled objects in their state), so they
    # load with weights_only=True like every other file the package reads
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return trainer, directory
