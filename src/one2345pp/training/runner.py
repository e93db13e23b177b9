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
"""

from __future__ import annotations

import contextlib
import copy
import csv
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, save_config
from ..utils.atomic import write_text


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


# ----------------------------------------------------------------------------------------- launchers and run names
_NAME_ENV = "ONE2345PP_RUN_NAME"  # the name a parent process hands to the processes it launches
_SLURM_SPECIAL_STEPS = 4294967290  # step ids from here up are SLURM's batch / extern / interactive steps


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def launcher_world_size(env=None) -> int:
    """How many processes the launcher started for this run: torchrun's / Lightning's ``WORLD_SIZE``, else the
    number of SLURM tasks of an ``srun`` step (``SLURM_NTASKS``, not in SLURM's interactive mode); 1 otherwise."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE", "").strip():
        return int(env["WORLD_SIZE"])
    interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if env.get("SLURM_NTASKS", "").strip() and env.get("SLURM_PROCID", "").strip() and not interactive:
        return int(env["SLURM_NTASKS"])
    return 1


def launcher_run_name(env=None) -> str | None:
    """The name every process of one launch derives alike, or None when there is none to derive.

    - a W&B sweep trial (``WANDB_SWEEP_ID`` + ``WANDB_RUN_ID``, set by ``wandb agent``): ``sweep-<run id>``
    - several SLURM tasks: ``slurm-<job id>`` (``.<step id>`` for the n-th ``srun`` of a job script); the same after
      a requeue, so Lightning's SLURM auto-resume finds the run's checkpoints again
    - torchrun: ``torchrun-<rendezvous id>`` (``--standalone`` draws a fresh one; torchrun's default id ``none``
      is not unique and does not count)
    """
    env = os.environ if env is None else env
    if env.get("WANDB_SWEEP_ID", "").strip() and env.get("WANDB_RUN_ID", "").strip():
        return "sweep-" + _clean(env["WANDB_RUN_ID"])
    if launcher_world_size(env) > 1:
        job = env.get("SLURM_JOB_ID", "").strip()
        if job and env.get("SLURM_PROCID", "").strip():
            step = env.get("SLURM_STEP_ID", "").strip()
            suffix = f".{step}" if step.isdigit() and 0 < int(step) < _SLURM_SPECIAL_STEPS else ""
            return f"slurm-{_clean(job)}{suffix}"
        rdzv = env.get("TORCHELASTIC_RUN_ID", "").strip()
        if rdzv and rdzv != "none":
            return "torchrun-" + _clean(rdzv)
    return None


def run_name(run: RunConfig, env=None) -> str:
    """``run.name``; else the name the launching process handed down (Lightning's DDP launcher re-runs the command
    for every local rank), the launcher's job (:func:`launcher_run_name`), or, for a single process, a timestamp
    with a random suffix. Several processes without any shared name are refused: each would invent its own."""
    env = os.environ if env is None else env
    if run.name:
        return run.name
    for name in (env.get(_NAME_ENV, "").strip(), launcher_run_name(env)):
        if name:
            return name
    world = launcher_world_size(env)
    if world > 1:
        raise ConfigError(
            f"run.name is not set and this is one of {world} processes (WORLD_SIZE / SLURM_NTASKS) without a job id "
            "to name the run after (no SLURM_JOB_ID, TORCHELASTIC_RUN_ID is unset or 'none'): every process would "
            "pick its own directory. Set run.name=NAME (or use torchrun --standalone / --rdzv-id=ID)"
        )
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def run_dir(stage: str, run: RunConfig, env=None) -> Path:
    """``<run.root>/<stage>/<run name>`` (see :func:`run_name`); the same on every rank of one launch."""
    return Path(run.root) / stage / run_name(run, env)


@contextlib.contextmanager
def _handed_down(name: str):
    """Export the run name to processes started inside the block (Lightning's DDP launcher), then restore."""
    before = os.environ.get(_NAME_ENV)
    os.environ[_NAME_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_NAME_ENV, None)
        else:
            os.environ[_NAME_ENV] = before


# ---------------------------------------------------------------------------------------------------------- loggers
WANDB_ID_FILE = "wandb-run-id"  # in RUN/logs/: a resumed run keeps logging to the same W&B run


def _wandb_hosts(env) -> set[str]:
    """The W&B server hosts a stored key could be for: ``WANDB_BASE_URL``, else the installed wandb's default (it
    changed between versions) and the classic api.wandb.ai."""
    from urllib.parse import urlparse

    if env.get("WANDB_BASE_URL", "").strip():
        return {urlparse(env["WANDB_BASE_URL"]).hostname}
    urls = ["https://api.wandb.ai"]
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL

        urls.append(DEFAULT_BASE_URL)
    except ImportError:  # another wandb layout: the classic host only
        pass
    return {urlparse(u).hostname for u in urls}


def _wandb_key_available(env=None) -> bool:
    """``WANDB_API_KEY``, or a key that ``wandb login`` stored in the netrc file for the W&B host."""
    import netrc

    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return True
    try:
        stored = netrc.netrc(env.get("NETRC") or None)
    except (OSError, netrc.NetrcParseError):
        return False
    return any(stored.authenticators(host) is not None for host in _wandb_hosts(env))


def wandb_offline(env=None) -> bool:
    """W&B runs offline unless ``WANDB_MODE`` says otherwise or a key is available."""
    env = os.environ if env is None else env
    mode = env.get("WANDB_MODE", "").strip()
    if mode:
        return mode in ("offline", "dryrun")
    return not _wandb_key_available(env)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but continuing the ``metrics.csv`` of the run being resumed (Lightning's deletes it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumedCSVLogger(CSVLogger):
    """CSV logger of a resumed run: new rows are appended, so ``metrics.csv`` holds the whole curve."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def continues_a_run(run: RunConfig, directory: Path) -> bool:
    """``run.resume`` is set, or Lightning will restore the ``hpc_ckpt_N.ckpt`` its SLURM plugin saved in the run
    directory before a requeue."""
    return run.resume is not None or any(directory.glob("hpc_ckpt_*.ckpt"))


def make_logger(run: RunConfig, directory: Path, stage: str):
    """The run's Lightning logger, writing under ``directory/logs``."""
    from lightning.pytorch import loggers

    if run.logger == "csv":
        kind = ResumedCSVLogger if continues_a_run(run, directory) else loggers.CSVLogger
        return kind(str(directory), name="logs", version="")
    if run.logger == "tensorboard":
        return loggers.TensorBoardLogger(str(directory), name="logs", version="")
    if run.logger == "wandb":
        logs = directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)  # wandb only warns when its folder is missing
        kwargs = {}
        if wandb_offline():  # passed to wandb.init (Lightning's offline=True would set WANDB_MODE process-wide)
            kwargs["mode"] = "offline"
        if not os.environ.get("WANDB_SWEEP_ID"):  # a sweep agent chooses the trial's run id itself
            id_file = logs / WANDB_ID_FILE
            if continues_a_run(run, directory) and id_file.is_file():
                kwargs["id"] = id_file.read_text().strip()
            else:
                kwargs["id"] = secrets.token_hex(4)
        return loggers.WandbLogger(
            project=run.wandb_project,
            name=f"{stage}/{directory.name}",
            save_dir=str(logs),
            tags=[stage],
            **kwargs,
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


class RankSeed(Callback):
    """Seeds each process with ``seed + global rank`` once its rank is final: the ``setup`` hook runs in every
    process (also those ``ddp_spawn`` starts) after the strategy has set up the process group, which re-seeds every
    process with the seed of the launching one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch import seed_everything

        seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


class ResumedLogStep(Callback):
    """Keeps the logging step of a resumed run on the global step.

    Lightning (2.6) counts the checkpoint's last batch twice when it resumes from a checkpoint written at the end of
    a training batch (``last.ckpt`` after a validation): every row logged after the resume is one step ahead of the
    curve before it. With automatic optimisation and one optimizer the logging step ("batches that stepped") equals
    ``trainer.global_step``, so the first batch after a restore sets it back to that.
    """

    def __init__(self):
        self._restored = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._restored = trainer.global_step > 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restored and pl_module.automatic_optimization and len(trainer.optimizers) == 1:
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        self._restored = False


def write_run_config(trainer, cfg, directory: Path) -> Path | None:
    """The resolved config as ``directory/config.yaml``, written by global rank 0 only (None on other ranks)."""
    if not trainer.is_global_zero:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return save_config(cfg, directory / "config.yaml")


def _wandb_loggers(trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def fit(stage: str, cfg, module, datamodule, callbacks=()):
    """Run (or resume) training of one stage; returns ``(trainer, run directory)``.

    ``cfg`` is the stage's resolved structured config (omegaconf) with ``run`` and ``trainer`` sections. ``module`` is
    a LightningModule or a function that builds one: built after seeding with ``run.seed`` so that the initial
    weights are the same on every rank and every rerun. Training then runs with seed ``run.seed + global rank``
    (different noise, dropout and augmentation per rank; Lightning derives the data-loader worker seeds from it).

    Every rank resolves the same run directory (:func:`run_name`); global rank 0 writes ``config.yaml``, the W&B
    run id and the logs. A W&B run is finished when training ends, so a later run in the same process starts its own.
    """
    from lightning.pytorch import seed_everything

    run: RunConfig = OmegaConf.to_object(cfg.run) if not isinstance(cfg.run, RunConfig) else cfg.run
    trainer_cfg = cfg.trainer if isinstance(cfg.trainer, TrainerConfig) else OmegaConf.to_object(cfg.trainer)
    directory = run_dir(stage, run)
    ckpt_path = resume_path(run, directory)
    resolved = copy.deepcopy(cfg) if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    resolved.run.name = directory.name  # config.yaml names the run it belongs to (also when the name was derived)
    with _handed_down(directory.name):
        seed_everything(run.seed, workers=True, verbose=False)
        if callable(module) and not hasattr(module, "training_step"):
            module = module()
        trainer = build_trainer(trainer_cfg, run, directory, stage, [*callbacks, RankSeed(run.seed), ResumedLogStep()])
        write_run_config(trainer, resolved, directory)
        wandb_loggers = _wandb_loggers(trainer)
        if trainer.is_global_zero:
            for lg in wandb_loggers:
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
                for lg in wandb_loggers:
                    if getattr(lg, "_experiment", None) is not None:  # created (not only configured)
                        lg.experiment.finish()
    return trainer, directory
