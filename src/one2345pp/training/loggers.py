"""The run's Lightning logger (CSV, TensorBoard or W&B) and what keeps a resumed run's curve in one place: the CSV
appended to, the W&B run id kept in ``RUN/logs/``, W&B offline unless a key or ``WANDB_MODE`` says otherwise."""

from __future__ import annotations

import csv
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ..config import ConfigError
from .config import RunConfig

WANDB_ID_FILE = "wandb-run-id"  # in RUN/logs/: a resumed run keeps logging to the same W&B run


def _wandb_hosts(env) -> set[str]:
    """The W&B server hosts a stored key could be for: ``WANDB_BASE_URL``, else the installed wandb's default (it
    changed between versions) and the classic api.wandb.ai."""
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
    if run.logger == "csv":
        kind = ResumedCSVLogger if continues_a_run(run, directory) else CSVLogger
        return kind(str(directory), name="logs", version="")
    if run.logger == "tensorboard":
        return TensorBoardLogger(str(directory), name="logs", version="")
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
        return WandbLogger(
            project=run.wandb_project,
            name=f"{stage}/{directory.name}",
            save_dir=str(logs),
            tags=[stage],
            **kwargs,
        )
    raise ConfigError(f"run.logger must be csv, tensorboard or wandb, got {run.logger!r}")


def wandb_loggers(trainer) -> list:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
