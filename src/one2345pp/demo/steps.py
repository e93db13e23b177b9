"""Running the demo's steps: subprocesses of the ``one2345pp`` command line at most ``jobs`` at a time, their output in
``OUT/logs/<step>.log`` with the progress lines echoed, and the record of every step in ``OUT/demo.json``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..utils.atomic import write_json
from .config import STAGE_NAMES

STATE_FILE = "demo.json"
# the steps in pipeline order (the order of the timings tables)
STEPS = (
    "data",
    "heldout",
    "data-sheet",
    "heldout-images",
    *(f"train-{s}" for s in STAGE_NAMES),
    "export",
    "infer",
    "eval",
    "recon",
)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class DemoState:
    """``OUT/demo.json``: per step ``status`` (done / failed / not run), ``seconds``, ``summary``, ``outputs``
    (paths relative to OUT), when it finished and the load average then; per phase its wall-clock seconds; one
    record per demo run (start, end, seconds, load averages, failed steps)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / STATE_FILE
        self.data: dict = {"steps": {}, "phases": {}, "runs": []}
        if self.path.is_file():
            try:
                held = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ConfigError(f"{self.path}: unreadable ({exc}); remove it or rerun with --force") from exc
            if not isinstance(held, dict) or not isinstance(held.get("steps"), dict):
                raise ConfigError(f"{self.path}: not a demo state file; remove it or rerun with --force")
            self.data.update(held)
        self.lock = threading.RLock()

    def step(self, name: str) -> dict | None:
        return self.data["steps"].get(name)

    def finished(self, name: str) -> bool:
        """Recorded as done, and every output it recorded still exists."""
        rec = self.step(name)
        return bool(
            rec and rec.get("status") == "done" and all((self.out / p).exists() for p in rec.get("outputs", []))
        )

    def record(self, name: str, **rec) -> None:
        with self.lock:
            rec = {**rec, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "load": load_average()}
            steps = {**self.data["steps"], name: rec}
            order = {n: i for i, n in enumerate(STEPS)}
            self.data["steps"] = dict(sorted(steps.items(), key=lambda kv: order.get(kv[0], len(order))))
            self.save()

    def record_phase(self, name: str, seconds: float) -> None:
        with self.lock:
            self.data["phases"][name] = seconds
            self.save()

    def save(self) -> None:
        with self.lock:
            write_json(self.path, self.data, default=str)


class Console:
    """Prints the demo's lines (and the steps' progress lines) under one lock."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def print(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)


@dataclass
class Task:
    """One step run as a subprocess."""

    name: str
    argv: list[str]
    outputs: list[str]  # paths relative to OUT that must exist when it succeeded
    summary: object = None  # callable () -> str, read after success
    needs: tuple[str, ...] = ()  # steps that must not have failed
    threads: int = 1  # OMP / MKL threads (torch's intra-op threads) of the subprocess


def cli() -> list[str]:
    """The command line of this package, in the interpreter that runs the demo."""
    return [sys.executable, "-m", "one2345pp"]


# echoed progress: the stages' lines ("[coarse] step 10/150 ...") and the bars of the data builder, infer and eval
# (not the bars of model loading and saving); the logs keep everything
_STAGE_LINE = re.compile(r"^\[(?:" + "|".join(STAGE_NAMES) + r")\] ")
_BAR_LINE = re.compile(r"^(?:shards rank \d+/\d+|infer|eval \w+):\s+\d+%\|.*?(\d+)/(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _child_env(threads: int, progress_interval: float) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TQDM_MININTERVAL=str(progress_interval),
    )
    return env


def _pump(proc, log_path: Path, name: str, console: Console, tail: deque, interval: float) -> None:
    """Copy the child's output into its log; echo its stage progress lines, and its progress bars' lines (tqdm's
    carriage-return updates split) at most once per ``interval`` seconds and when they complete."""
    with open(log_path, "ab") as log:
        pending, shown, shown_at = b"", None, -math.inf
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            log.write(chunk)
            log.flush()
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
                if not line:
                    continue
                tail.append(line)
                if _STAGE_LINE.match(line):
                    console.print(line)
                    continue
                bar = _BAR_LINE.match(line)
                if bar is None or bar.groups() == shown:  # a bar's closing repeat of its last count is not echoed
                    continue
                if time.monotonic() - shown_at >= interval or bar.group(1) == bar.group(2):
                    shown, shown_at = bar.groups(), time.monotonic()
                    console.print(f"[{name}] {line}")
        if pending.strip():
            tail.append(_ANSI.sub("", pending.decode("utf-8", "replace")).rstrip())


def run_tasks(
    tasks: list[Task], jobs: int, state: DemoState, console: Console, progress_interval: float, failed: set[str]
) -> None:
    """Run ``tasks`` at most ``jobs`` at a time and record each in ``state``. A task starts once none of its
    ``needs`` is still waiting or running in this batch (the first ready one in list order); it is recorded as not
    run when one of them failed. A failing task (exit code, or an output missing) is recorded with the reason and the
    last lines of its log, and its name is added to ``failed``."""
    out = state.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue = list(tasks)
    pending = {t.name for t in tasks}
    running: list[tuple[Task, subprocess.Popen, threading.Thread, float, deque]] = []
    while queue or running:
        for task in list(queue):
            if len(running) >= jobs:
                break
            missing = [n for n in task.needs if n in failed]
            if missing:
                reason = f"not run: needs {', '.join(missing)}, which failed"
                state.record(task.name, status="not run", seconds=None, summary=reason, outputs=[])
                failed.add(task.name)
                queue.remove(task)
                pending.discard(task.name)
                console.print(f"[{task.name}] {reason}")
                continue
            if any(n in pending for n in task.needs):
                continue  # waits for a step of this batch
            queue.remove(task)
            running.append(_start(task, logs, console, progress_interval))
        if queue and not running:
            raise RuntimeError(f"demo steps wait on each other: {', '.join(t.name for t in queue)}")
        time.sleep(0.2)
        for entry in list(running):
            task, proc, pump, t0, tail = entry
            code, cpu = _reap(proc)
            if code is None:
                continue
            pump.join()
            running.remove(entry)
            pending.discard(task.name)
            seconds = time.perf_counter() - t0
            missing = [p for p in task.outputs if not (out / p).exists()]
            if code != 0 or missing:
                why = f"exit code {code}" if code else f"missing outputs: {', '.join(missing)}"
                last = [ln for ln in tail if ln.strip()][-8:]
                state.record(
                    task.name, status="failed", seconds=seconds, cpu_seconds=cpu, summary=why, outputs=[], tail=last
                )
                failed.add(task.name)
                console.print(f"[{task.name}] FAILED after {seconds:.1f} s ({why}); last lines of {task.name}.log:")
                for ln in last:
                    console.print(f"    {ln}")
                continue
            finish(state, console, task.name, seconds, cpu, task.outputs, task.summary)


def _start(task: Task, logs: Path, console: Console, progress_interval: float):
    log_path = logs / f"{task.name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(task.argv)}\n".encode())
    console.print(f"[{task.name}] started (log: {log_path})")
    proc = subprocess.Popen(
        task.argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_child_env(task.threads, progress_interval),
    )
    tail: deque = deque(maxlen=25)
    pump = threading.Thread(target=_pump, args=(proc, log_path, task.name, console, tail, progress_interval))
    pump.daemon = True
    pump.start()
    return task, proc, pump, time.perf_counter(), tail


def _reap(proc: subprocess.Popen) -> tuple[int | None, float | None]:
    """(exit code, CPU seconds of the process and of the children it waited for, e.g. its loader workers) once it
    has ended, else (None, None). Where ``os.wait4`` is missing the CPU seconds are None."""
    if not hasattr(os, "wait4"):
        return proc.poll(), None
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere
        return proc.poll(), None
    if pid == 0:
        return None, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def finish(
    state: DemoState, console: Console, name: str, seconds: float, cpu: float | None, outputs: list[str], summary=None
) -> None:
    """Record a successful step with its summary (a summary that cannot be read does not undo the step)."""
    try:
        text = summary() if summary else ""
    except Exception as exc:
        text = f"(summary unavailable: {type(exc).__name__}: {exc})"
    state.record(name, status="done", seconds=seconds, cpu_seconds=cpu, summary=text, outputs=list(outputs))
    cpu_text = "" if cpu is None else f" ({cpu:.1f} CPU s)"
    console.print(f"[{name}] done in {seconds:.1f} s{cpu_text}: {text}")


def run_inline(state: DemoState, console: Console, name: str, fn, failed: set[str], needs=()) -> object:
    """Run ``fn() -> (outputs, summary text, value)`` in this process as step ``name`` (recorded like a task);
    returns the value, or None when it failed or could not run."""
    missing = [n for n in needs if n in failed]
    if missing:
        reason = f"not run: needs {', '.join(missing)}, which failed"
        state.record(name, status="not run", seconds=None, summary=reason, outputs=[])
        failed.add(name)
        console.print(f"[{name}] {reason}")
        return None
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        outputs, text, value = fn()
    except Exception as exc:  # recorded with its reason; the steps that need it are then not run
        reason = f"{type(exc).__name__}: {exc}"
        state.record(name, status="failed", seconds=time.perf_counter() - t0, summary=reason, outputs=[])
        failed.add(name)
        console.print(f"[{name}] FAILED: {reason}")
        return None
    finish(state, console, name, time.perf_counter() - t0, time.process_time() - c0, outputs, lambda: text)
    return value


# ---------------------------------------------------------------------------------------------------- summaries
def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def data_summary(folder: Path) -> str:
    records = [json.loads(ln) for ln in (folder / "manifest.jsonl").read_text().splitlines() if ln.strip()]
    done = sum(r.get("status") == "done" for r in records)
    failed = [r for r in records if r.get("status") == "failed"]
    text = f"{count(done, 'object')} in {count(len(list(folder.glob('shard-*.tar'))), 'shard')}"
    if failed:
        text += f", {len(failed)} failed (first: {failed[0].get('uid')}: {failed[0].get('reason')})"
    return text


def training_metrics(run: Path) -> dict:
    """The last logged value of every ``train/`` and ``val/`` column of ``RUN/logs/metrics.csv``."""
    import csv

    path = run / "logs" / "metrics.csv"
    last: dict = {}
    if not path.is_file():
        return last
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key and value not in (None, "") and key.startswith(("train/", "val/")):
                    try:
                        last[key] = float(value)
                    except ValueError:
                        continue
    return last


def stage_summary(stage: str, run: Path) -> str:
    """One line per trained stage: steps and the last logged losses / validation metrics (texture: its PSNRs)."""
    from omegaconf import OmegaConf

    if stage == "texture":
        m = json.loads((run / "metrics.json").read_text())
        parts = [
            f"{split} PSNR {m[split]['psnr_mean']:.2f} dB over {count(m[split]['objects'], 'object')}"
            for split in ("train", "val")
            if isinstance(m.get(split), dict) and m[split].get("psnr_mean") is not None
        ]
        return "; ".join(parts) or "no objects fitted"
    m = training_metrics(run)
    keys = ["train/loss", *sorted(k for k in m if k.startswith("val/"))]
    text = ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)
    steps = OmegaConf.load(run / "config.yaml").trainer.max_steps
    return f"{steps} steps; " + (text or "no metrics logged")


def infer_summary(folder: Path) -> str:
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/result.json"))]
    ok = [d for d in docs if d.get("status") == "ok"]
    failed = [d for d in docs if d.get("status") != "ok"]
    secs = [d["timings"]["total"] for d in ok if "timings" in d]
    text = count(len(ok), "mesh", "meshes")
    if secs:
        text += f", {sum(secs) / len(secs):.1f} s per image (pipeline)"
    if failed:
        text += f", {len(failed)} failed (first: {failed[0].get('reason')})"
    return text


def eval_summary(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    mean = m.get("mean") or {}
    parts = [f"{m.get('succeeded')} of {count(m.get('count'), 'object')}"]
    for key, label, fmt in (
        ("fscore", "F-Score@0.05", "{:.3f}"),
        ("chamfer", "Chamfer", "{:.4f}"),
        ("psnr", "PSNR", "{:.2f} dB"),
        ("mask_iou", "mask IoU", "{:.3f}"),
    ):
        if mean.get(key) is not None:
            parts.append(f"{label} {fmt.format(mean[key])}")
    return ", ".join(parts)


def recon_summary(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    mean = m["mean"]

    def f(key, spec="{:.3f}"):
        return "—" if mean.get(key) is None else spec.format(mean[key])

    return (
        f"{count(len(m['objects']), 'object')} from their ground-truth views: shell IoU {f('iou')}, F-Score@0.05 "
        f"{f('fscore')}, Chamfer {f('chamfer', '{:.4f}')} (a sphere of the mean radius: F-Score "
        f"{f('sphere_fscore')}, Chamfer {f('sphere_chamfer', '{:.4f}')})"
    )
