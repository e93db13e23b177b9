"""The Lightning ``Trainer`` of a run: checkpoints (top-k and last), logger, progress lines, the checkpoint to
resume from, and the callbacks every run gets (per-rank seeds, the logging step of a resumed run)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar

from ..utils.run_layout import checkpoint_dir, last_checkpoint
from .config import RunConfig, TrainerConfig
from .loggers import make_logger
from .progress import progress_callback


def resume_path(run: RunConfig, directory: Path) -> str | None:
    if run.resume is None:
        return None
    if run.resume == "last":
        last = last_checkpoint(directory)
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
    ckpt = ModelCheckpoint(
        dirpath=str(checkpoint_dir(directory)),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        save_last=False,  # LatestCheckpoint owns last.ckpt
        save_top_k=run.save_top_k if run.monitor else 0,
        monitor=run.monitor,
        every_n_train_steps=run.every_n_train_steps,
    )
    logger = make_logger(run, directory, stage)
    cbs = [ckpt, LatestCheckpoint(last_checkpoint(directory), run.every_n_train_steps), *callbacks]
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


class LatestCheckpoint(Callback):
    """Writes ``last.ckpt``, the state resume and export read, after every validation, every ``every_n_train_steps``
    steps (the interval ``run.every_n_train_steps`` also gives the step checkpoints) and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` (2.6) writes ``last.ckpt`` only at steps where it also writes a
    top-k or interval checkpoint: with a monitored ``val/loss`` it stays at the latest improvement, so a run that
    stopped improving resumed from an earlier step and exported older weights (a 20000-step run left it at 19250).
    Written under a temporary name and renamed, so an interrupted write leaves the previous one whole.
    """

    def __init__(self, path: Path, every_n_train_steps: int | None = None):
        self.path = Path(path)
        self.every_n_train_steps = every_n_train_steps
        self._written_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        # global_step counts optimizer steps: with gradient accumulation it stays (0 too) over several batches
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._write(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        if trainer.global_step == self._written_step or trainer.state.fn != "fit":
            return
        # not utils.atomic.atomic_file: its temporary name is random per process, and every rank must call
        # save_checkpoint with the same path (rank 0 writes, or each writes its shard; then all meet at a barrier)
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(str(tmp))
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._written_step = trainer.global_step


class RankSeed(Callback):
    """Seeds each process with ``seed + global rank`` once its rank is final: the ``setup`` hook runs in every
    process (also those ``ddp_spawn`` starts) after the strategy has set up the process group, which re-seeds every
    process with the seed of the launching one."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def setup(self, trainer, pl_module, stage: str) -> None:
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
