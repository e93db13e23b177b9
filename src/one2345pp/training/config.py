"""The run and trainer sections every stage's config holds (``run:`` and ``trainer:``), read by the runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    # run directory name; None: derived from the launcher's job (SLURM, torchrun, W&B sweep) when several processes
    # share the run, else a timestamp (see run_name); config.yaml records the name used
    name: str | None = None
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
