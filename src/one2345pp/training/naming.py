"""Run names and directories: every process of one launch (Lightning's DDP launcher, ``srun``, ``torchrun``, a W&B
sweep agent) resolves the same ``<run.root>/<stage>/<run name>``."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path

from ..config import ConfigError
from .config import RunConfig

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
def handed_down(name: str):
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
