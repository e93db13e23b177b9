"""Progress for runs whose output is not a terminal (SLURM logs, ``make ... > log``).

Lightning's default bars redraw one line in place, which a log file shows as nothing (rich) or as one endless line
(tqdm). :class:`LineProgress` prints one plain line every ``every`` optimizer steps and after each validation, e.g.::

    [coarse] step 150/2000 (7.5%)  epoch 0  1.93 it/s  eta 16m  train/loss 0.0412
    [coarse] validation at step 200: val/loss 0.0398  val/shell_iou 0.41

:func:`progress_callback` picks it when stderr is not a TTY and the run asked for progress.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt_metrics(metrics: dict, prefix: str) -> str:
    parts = []
    for key in sorted(metrics):
        if not key.startswith(prefix):
            continue
        value = metrics[key]
        try:
            parts.append(f"{key} {float(value):.4g}")
        except (TypeError, ValueError):
            continue
    return "  ".join(parts)


class LineProgress(ProgressBar):
    """One line per ``every`` steps (rank 0 only) with step, rate, ETA and the logged ``train/`` metrics."""

    def __init__(self, stage: str, every: int = 50, stream=None):
        super().__init__()
        if every < 1:
            raise ValueError(f"progress interval must be >= 1 step, got {every}")
        self.stage, self.every = stage, every
        self.stream = stream
        self._enabled = True
        self._t0 = 0.0
        self._step0 = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:  # read by LightningModule.print (which then calls the base class's print)
        return self._enabled

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(f"[{self.stage}] {text}", file=self.stream or sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._print(trainer, f"training from step {trainer.global_step}" + (f" to {total}" if total else ""))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if step == self._step0 or (step % self.every and step != total):
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
        line = f"step {step}"
        if total:
            line += f"/{total} ({100.0 * step / total:.1f}%)"
        line += f"  epoch {trainer.current_epoch}  {rate:.3g} it/s"
        if total and rate > 0:
            line += f"  eta {_fmt_seconds((total - step) / rate)}"
        metrics = _fmt_metrics(trainer.callback_metrics, "train/")
        self._print(trainer, line + (f"  {metrics}" if metrics else ""))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = _fmt_metrics(trainer.callback_metrics, "val/")
        self._print(trainer, f"validation at step {trainer.global_step}: {metrics or '(no val/ metrics)'}")

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._t0
        self._print(trainer, f"done at step {trainer.global_step} in {_fmt_seconds(elapsed)}")


def progress_callback(stage: str, every: int, stream=None) -> ProgressBar | None:
    """:class:`LineProgress` when ``stream`` (default stderr) is not a terminal; None keeps Lightning's bar."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None
    return LineProgress(stage, every, stream)
