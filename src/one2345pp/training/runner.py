"""The one place where a stage becomes a Lightning run: run directory, resolved config, seeds, logger, checkpoints,
resume, trainer.

Every stage's ``train(config_path, overrides)`` loads its own typed config (which contains ``run: RunConfig`` and
``trainer: TrainerConfig``), builds its LightningModule and DataModule, and calls :func:`fit`. Runs live in
``<run.root>/<stage>/<run.name>/``::

    config.yaml      the resolved config, with the run's name (written by global rank 0)
    ckpts/           top-k checkpoints and last.ckpt
    logs/            CSV / TensorBoard / W&B files (W&B: offline unless a key or WANDB_MODE says otherwise)
    media/           images and meshes the stage shows (training/media.py)
    export/          what the stage exports for the pipeline (written by the stage)

Launchers: Lightning's own DDP launcher (``trainer.devices=N trainer.strategy=ddp``), ``srun`` under SLURM and
``torchrun`` start one process per device; every process resolves the same run name (:func:`run_name`).

``run.resume=last`` continues ``ckpts/last.ckpt`` of the same run directory (same global step, optimizer, EMA and
callback states, the CSV curve and the W&B run); ``run.resume=PATH`` continues a given checkpoint. A SLURM job
requeued by Lightning's SLURM plugin continues from the ``hpc_ckpt_N.ckpt`` it left in the run directory.

Its parts: :mod:`~one2345pp.training.config` (the ``run`` and ``trainer`` sections), :mod:`~.naming` (run names
and directories), :mod:`~.loggers` (the logger, W&B's mode and run id, the resumed CSV), :mod:`~.trainer` (the
Trainer, the checkpoint to resume, the callbacks every run gets); this module puts them together in :func:`fit`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from ..config import save_config
from ..utils.atomic import write_text
from .config import RunConfig, TrainerConfig
from .loggers import WANDB_ID_FILE, wandb_loggers
from .naming import handed_down, run_dir
from .trainer import RankSeed, ResumedLogStep, build_trainer, resume_path

__all__ = ["fit", "write_run_config"]


def write_run_config(trainer, cfg, directory: Path) -> Path | None:
    """The resolved config as ``directory/config.yaml``, written by global rank 0 only (None on other ranks)."""
    if not trainer.is_global_zero:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return save_config(cfg, directory / "config.yaml")


def fit(stage: str, cfg, module, datamodule, callbacks=()):
    """Run (or resume) training of one stage; returns ``(trainer, run directory)``.

    ``cfg`` is the stage's resolved structured config (omegaconf) with ``run`` and ``trainer`` sections. ``module`` is
    a LightningModule or a function that builds one: built after seeding with ``run.seed`` so that the initial
    weights are the same on every rank and every rerun. Training then runs with seed ``run.seed + global rank``
    (different noise, dropout and augmentation per rank; Lightning derives the data-loader worker seeds from it).

    Every rank resolves the same run directory (:func:`run_name`); global rank 0 writes ``config.yaml``, the W&B
    run id and the logs. A W&B run is finished when training ends, so a later run in the same process starts its own.
    """
    run: RunConfig = OmegaConf.to_object(cfg.run) if not isinstance(cfg.run, RunConfig) else cfg.run
    trainer_cfg = cfg.trainer if isinstance(cfg.trainer, TrainerConfig) else OmegaConf.to_object(cfg.trainer)
    directory = run_dir(stage, run)
    ckpt_path = resume_path(run, directory)
    resolved = copy.deepcopy(cfg) if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    resolved.run.name = directory.name  # config.yaml names the run it belongs to (also when the name was derived)
    with handed_down(directory.name):
        seed_everything(run.seed, workers=True, verbose=False)
        if callable(module) and not hasattr(module, "training_step"):
            module = module()
        trainer = build_trainer(trainer_cfg, run, directory, stage, [*callbacks, RankSeed(run.seed), ResumedLogStep()])
        write_run_config(trainer, resolved, directory)
        wandb = wandb_loggers(trainer)
        if trainer.is_global_zero:
            for lg in wandb:
                if lg.version and not os.environ.get("WANDB_SWEEP_ID"):
                    write_text(directory / "logs" / WANDB_ID_FILE, lg.version + "\n")
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(OmegaConf.to_container(resolved, resolve=True))
        try:
            # checkpoints hold tensors and plain containers only (modules keep no pickled objects in their state), so
            # they load with weights_only=True like every other file the package reads
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
        finally:
            if trainer.is_global_zero:
                for lg in wandb:
                    if getattr(lg, "_experiment", None) is not None:  # created (not only configured)
                        lg.experiment.finish()
    return trainer, directory
