"""``run_demo``: prepare the output folder, run the steps of :mod:`one2345pp.demo.plan` phase by phase (a rerun skips
the finished ones), then write the page and print the timings (see :mod:`one2345pp.demo` for the whole story)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..config import check_or_save_config
from .config import RUN_ONLY_KEYS, DemoConfig, data_build_config, load_demo_config
from .heldout import FOLDER as HELDOUT
from .heldout import INDEX as HELDOUT_INDEX
from .plan import (
    CONFIG_FILE,
    OWNED,
    RUN_NAME,
    data_tasks,
    data_title,
    images_step,
    sheet_step,
    shipped_runs,
    shipped_step,
    stage_tasks,
    stages_title,
    torch_threads,
)
from .report import write_index
from .steps import Console, DemoState, Task, load_average, run_inline, run_tasks


def clear_outputs(out: Path) -> list[str]:
    """Remove what earlier demo runs wrote into ``out`` (the names of :data:`~one2345pp.demo.plan.OWNED` only)."""
    removed = []
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_folder(out: Path, cfg_node, force: bool, console: Console) -> None:
    """Clear the demo's earlier outputs (``force``), or refuse other settings than the folder's before writing
    anything; then record the settings."""
    if force and out.is_dir():
        removed = clear_outputs(out)
        if removed:
            console.print(f"demo: --force: removed {', '.join(removed)} from {out}")
    out.mkdir(parents=True, exist_ok=True)
    check_or_save_config(
        out / CONFIG_FILE,
        cfg_node,
        what="a demo",
        remedy="rerun with --force to redo it, or choose another --out",
        ignore=RUN_ONLY_KEYS,
    )


class Phases:
    """Runs the steps of each phase that are not finished yet, and records which failed."""

    def __init__(self, cfg: DemoConfig, state: DemoState, console: Console):
        self.cfg, self.state, self.console = cfg, state, console
        self.failed: set[str] = set()

    def skipped(self, name: str) -> bool:
        if not self.state.finished(name):
            return False
        rec = self.state.step(name)
        self.console.print(f"[{name}] skipped: finished before ({rec['seconds']:.1f} s): {rec['summary']}")
        return True

    def run(self, key: str, title: str, tasks: list[Task], jobs: int) -> None:
        """Subprocess steps, ``jobs`` at a time; the phase's wall-clock seconds are recorded as ``key``."""
        todo = [t for t in tasks if not self.skipped(t.name)]
        if todo:
            self.console.print(f"== {title}")
            t0 = time.perf_counter()
            run_tasks(todo, jobs, self.state, self.console, self.cfg.progress_interval, self.failed)
            self.state.record_phase(key, time.perf_counter() - t0)

    def inline(self, name: str, fn, needs=()) -> None:
        """A step run in this process (``fn() -> (outputs, summary, extra)``)."""
        if not self.skipped(name):
            run_inline(self.state, self.console, name, fn, self.failed, needs)


def start_run(out: Path, cfg: DemoConfig, console: Console) -> DemoState:
    """The state file with this run's record opened, and the opening line."""
    state = DemoState(out)
    state.data["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_start": load_average()})
    state.save()
    console.print(
        f"demo -> {out}/ ({os.cpu_count() or 1} CPU cores, load average {load_average()}; {cfg.jobs} step(s) at a "
        f"time, {torch_threads(cfg)} torch thread(s) each; each step's output in {out / 'logs'}/)"
    )
    return state


def finish_run(out: Path, cfg: DemoConfig, state: DemoState, inputs: list[dict], failed: set[str], seconds: float):
    """Close this run's record, write the page, print the steps' timings; the page's path."""
    with state.lock:
        state.data["runs"][-1].update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(seconds, 1),
            load_end=load_average(),
            failed=sorted(failed),
        )
        state.save()
    return write_index(out, cfg, state, inputs, seconds, RUN_NAME)


def print_timings(console: Console, state: DemoState) -> None:
    console.print(f"{'step':<17}{'status':<9}{'seconds':>9}{'CPU s':>9}  summary")
    for name, rec in state.data["steps"].items():
        secs, cpu = ("" if rec.get(k) is None else f"{rec[k]:.1f}" for k in ("seconds", "cpu_seconds"))
        console.print(f"{name:<17}{str(rec.get('status')):<9}{secs:>9}{cpu:>9}  {rec.get('summary') or ''}")
    for key, secs in state.data["phases"].items():
        console.print(f"{secs:>35.1f}  wall-clock of: {key}")


def run_demo(out, config_path=None, overrides=(), force: bool = False, stream=None) -> int:
    """Run (or resume) the demo into ``out``; returns 0 when every step succeeded, else 1 (see the package doc). Bad
    settings, and other settings than the folder's without ``force``, raise ConfigError before any work."""
    started = time.perf_counter()
    # 1. check the settings (the data keys too) and the folder, before any work
    cfg_node, cfg = load_demo_config(config_path, overrides)
    data_build_config(cfg)
    out, console = Path(out), Console(stream)
    prepare_folder(out, cfg_node, force, console)
    state = start_run(out, cfg, console)
    phases, threads = Phases(cfg, state, console), torch_threads(cfg)

    # 2. training data and held-out objects, their contact sheet and images
    phases.run("data", data_title(cfg, out), data_tasks(cfg, out, os.cpu_count() or 1), 1)
    phases.inline("data-sheet", sheet_step(cfg, out), ("data",))
    phases.inline("heldout-images", images_step(cfg, out), ("heldout",))
    inputs = json.loads((out / HELDOUT / HELDOUT_INDEX).read_text()) if state.finished("heldout-images") else []

    # 3. the shipped stages copied in; the others trained, then export, infer, eval and the 3D stages alone
    shipped = shipped_runs(cfg)
    for name, folder in shipped.items():
        phases.inline(f"train-{name}", shipped_step(out, name, folder))
    tasks = stage_tasks(cfg, out, inputs, shipped, threads)
    phases.run("stages, pipeline, infer, eval", stages_title(cfg, shipped), tasks, cfg.jobs)

    # 4. the page and the timings
    seconds = time.perf_counter() - started
    index = finish_run(out, cfg, state, inputs, phases.failed, seconds)
    console.print(f"== 3/4 report: {index}")
    print_timings(console, state)
    failed = phases.failed
    verdict = "finished" if not failed else f"finished with failures ({', '.join(sorted(failed))})"
    console.print(f"== 4/4 demo {verdict} in {seconds:.0f} s; open {index.resolve()}")
    return 1 if failed else 0
