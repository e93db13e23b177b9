"""``one2345pp demo --out outputs/demo [--config experiments/demo.yaml] [--force] [key=value ...]``: the whole
project end to end on the embedded procedural dataset (``make demo``).

Steps (``OUT/logs/<step>.log`` holds each one's output; progress lines are echoed with the step's name):

1. ``data``: ``one2345pp data build --source procedural`` of ``data.num_objects`` training objects with the tiny
   recipe (``experiments/tiny/data.yaml``) -> ``OUT/data/`` (the last shard is the stages' validation set);
   ``data-sheet``: a contact sheet of the first objects;
2. ``heldout``: ``images.num_images`` objects of another procedural seed rendered as the shards render a condition
   view, with their ground-truth views -> ``OUT/heldout/`` (:mod:`one2345pp.demo.heldout`);
3. ``train-<stage>`` for the four stages: ``one2345pp train --stage S --config C`` with
   ``run.root=OUT/checkpoints``, ``run.name=demo``, ``data.train_shards=OUT/data``, the demo's step count and
   overrides; ``jobs`` at a time, each with ``threads`` torch threads (default ``cores // jobs``): the small models
   of the tiny presets gain little from a second thread, so two single-threaded stages side by side use two cores
   better than one two-threaded stage after the other. A stage with ``train.<stage>.pretrained`` (by default the
   multi-view stage: the shipped ``checkpoints/tiny/multiview``) is not trained: its run folder is copied to
   ``OUT/checkpoints/<stage>/demo`` instead; ``one2345pp demo --from-scratch`` trains all four;
4. ``export``: ``one2345pp export --multiview --coarse --fine --texture`` -> ``OUT/pipeline/``;
5. ``infer`` (the held-out images -> ``OUT/infer/<name>/``: mesh.glb, views.png, turntable.png, result.json) beside
   ``eval`` (``one2345pp eval --dataset procedural`` on ``eval.num_objects`` held-out objects -> ``OUT/eval/``:
   metrics.csv, metrics.json, report.html);
6. ``OUT/index.html`` (:mod:`one2345pp.demo.report`): the steps with their seconds, the training data, the stages,
   per held-out image the input, the ground-truth and generated views, the turntable and the GLB, and the
   evaluation table; its path is printed last.

The subprocesses (the package's own command line) keep each step's memory apart and make a failure name its step.
``OUT/demo.json`` records each finished step (seconds, summary, outputs). A rerun skips a step recorded as done whose
outputs exist; an interrupted step resumes where its command resumes (the data builder continues its manifest, a
stage with ``ckpts/last.ckpt`` continues with ``run.resume=last``, ``infer`` and ``eval`` skip finished images and
objects). A rerun with other settings into the same folder is refused (``OUT/demo_config.yaml``; ``jobs``,
``threads`` and ``progress_interval`` may change) unless ``--force``, which removes the demo's earlier outputs
(only the names the demo writes) and redoes every step. A failed step is recorded with its reason and the last lines
of its log, the steps that need it are recorded as not run, the others go on, the page is still written, and the
command returns 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..config import check_or_save_config, load_config, save_config, to_object
from ..pipeline.build import resolve_run
from ..utils.atomic import atomic_folder
from .config import RUN_ONLY_KEYS, STAGE_NAMES, DemoConfig, DemoStageConfig, load_demo_config
from .heldout import FOLDER as HELDOUT
from .heldout import INDEX as HELDOUT_INDEX
from .heldout import SHARDS as HELDOUT_SHARDS
from .heldout import extract_images
from .report import INDEX_FILE, write_index
from .steps import (
    STATE_FILE,
    Console,
    DemoState,
    Task,
    cli,
    count,
    data_summary,
    eval_summary,
    infer_summary,
    load_average,
    recon_summary,
    run_inline,
    run_tasks,
    stage_summary,
)

__all__ = ["DemoConfig", "load_demo_config", "run_demo"]

CONFIG_FILE = "demo_config.yaml"
RUN_NAME = "demo"
# what the demo writes under OUT (``--force`` removes these names, nothing else)
OWNED = (
    "data",
    HELDOUT,
    "checkpoints",
    "pipeline",
    "infer",
    "eval",
    "recon",
    "logs",
    STATE_FILE,
    CONFIG_FILE,
    INDEX_FILE,
)
INFER_FILES = ("mesh.glb", "views.png", "turntable.png", "result.json")
EVAL_FILES = ("metrics.csv", "metrics.json", "report.html")


def _check_or_save_config(out: Path, cfg) -> None:
    check_or_save_config(
        out / CONFIG_FILE,
        cfg,
        what="a demo",
        remedy="rerun with --force to redo it, or choose another --out",
        ignore=RUN_ONLY_KEYS,
    )


def clear_outputs(out: Path) -> list[str]:
    """Remove what earlier demo runs wrote into ``out`` (the names of :data:`OWNED` only)."""
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


def _threads(cfg: DemoConfig) -> int:
    return cfg.threads if cfg.threads is not None else max(1, (os.cpu_count() or 1) // cfg.jobs)


def _stage_task(cfg: DemoConfig, out: Path, name: str, threads: int) -> Task:
    st: DemoStageConfig = getattr(cfg.train, name)
    run = out / "checkpoints" / name / RUN_NAME
    argv = [
        *cli(),
        "train",
        "--stage",
        name,
        "--config",
        st.config,
        f"data.train_shards={out / 'data'}",
        f"run.root={out / 'checkpoints'}",
        f"run.name={RUN_NAME}",
    ]
    if st.max_steps is not None:
        argv.append(f"trainer.max_steps={st.max_steps}")
    argv += list(st.overrides)
    if name != "texture" and (run / "ckpts" / "last.ckpt").is_file():
        argv.append("run.resume=last")  # an interrupted run continues from its last checkpoint
    rel = f"checkpoints/{name}/{RUN_NAME}"
    outputs = [f"{rel}/config.yaml", f"{rel}/export/{'model_index.json' if name == 'multiview' else 'config.json'}"]
    if name == "texture":
        outputs.append(f"{rel}/metrics.json")
    return Task(f"train-{name}", argv, outputs, lambda: stage_summary(name, run), ("data",), threads)


def _shipped_step(out: Path, name: str, shipped: Path):
    """The step that stands for ``train-<name>`` when the stage comes shipped: the run folder is copied to where a
    demo-trained run would be (a temporary name, then renamed), so the export, the report and a rerun read it alike."""

    def step():
        dest = out / "checkpoints" / name / RUN_NAME
        with atomic_folder(dest) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        src = resolve_run(name, dest)
        outputs = [dest / "config.yaml", src.export_dir or src.checkpoint]
        summary = f"shipped model {shipped} ({shipped / 'MODEL_CARD.md'}); {stage_summary(name, dest)}"
        return [p.relative_to(out).as_posix() for p in outputs], summary, None

    return step


def _data_task(name: str, cfg: DemoConfig, out: Path, folder: Path, num: int, extra: list[str], threads: int) -> Task:
    argv = [*cli(), "data", "build", "--source", "procedural", "--num-objects", str(num), "--out", str(folder)]
    argv += ["--workers", str(cfg.data.workers)]
    argv += ["--config", cfg.data.config] if cfg.data.config else []
    rel = folder.relative_to(out).as_posix()
    outputs = [f"{rel}/manifest.jsonl", f"{rel}/config.yaml"]
    return Task(name, [*argv, *cfg.data.overrides, *extra], outputs, lambda: data_summary(folder), threads=threads)


def run_demo(out, config_path=None, overrides=(), force: bool = False, stream=None) -> int:
    """Run (or resume) the demo into ``out``; returns 0 when every step succeeded, else 1 (see the module doc). Bad
    settings, and other settings than the folder's without ``force``, raise ConfigError before any work."""
    from ..cli import DataBuildConfig

    started = time.perf_counter()
    cfg_node, cfg = load_demo_config(config_path, overrides)
    to_object(load_config(DataBuildConfig, cfg.data.config, cfg.data.overrides))  # bad data keys fail here
    out = Path(out)
    console = Console(stream)
    if force and out.is_dir():
        removed = clear_outputs(out)
        if removed:
            console.print(f"demo: --force: removed {', '.join(removed)} from {out}")
    elif out.is_dir():
        _check_or_save_config(out, cfg_node)  # refuse before writing anything
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg_node, out / CONFIG_FILE)
    state = DemoState(out)
    state.data["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_start": load_average()})
    state.save()
    cores, threads = os.cpu_count() or 1, _threads(cfg)
    console.print(
        f"demo -> {out}/ ({cores} CPU cores, load average {load_average()}; {cfg.jobs} step(s) at a time, "
        f"{threads} torch thread(s) each; each step's output in {out / 'logs'}/)"
    )
    failed: set[str] = set()

    def skipped(name: str) -> bool:
        if not state.finished(name):
            return False
        rec = state.step(name)
        console.print(f"[{name}] skipped: finished before ({rec['seconds']:.1f} s): {rec['summary']}")
        return True

    def phase(key: str, title: str, tasks: list[Task], jobs: int) -> None:
        todo = [t for t in tasks if not skipped(t.name)]
        if todo:
            console.print(f"== {title}")
            t0 = time.perf_counter()
            run_tasks(todo, jobs, state, console, cfg.progress_interval, failed)
            state.record_phase(key, time.perf_counter() - t0)

    # 1. training data, held-out objects (the same recipe, another procedural seed, one condition view each)
    data_dir, heldout_dir = out / "data", out / HELDOUT_SHARDS
    heldout_args = [f"data.procedural.seed={cfg.images.seed}", "data.cond_samples=1"]
    phase(
        "data",
        f"1/4 data: {cfg.data.num_objects} training objects -> {data_dir}, {cfg.images.num_images} held-out objects "
        f"(procedural seed {cfg.images.seed}) -> {heldout_dir}",
        [
            _data_task("data", cfg, out, data_dir, cfg.data.num_objects, [], cores),
            _data_task("heldout", cfg, out, heldout_dir, cfg.images.num_images, heldout_args, cores),
        ],
        1,
    )

    def sheet():
        from ..data.contact_sheet import write_contact_sheet

        path = write_contact_sheet(data_dir, data_dir / "contact_sheet.png", num=cfg.data.sheet_objects)
        return ["data/contact_sheet.png"], str(path.relative_to(out)), None

    def images():
        found = extract_images(out, cfg.images.num_images)
        outputs = [f"{HELDOUT}/{HELDOUT_INDEX}", *(im["input"] for im in found), *(im["gt_views"] for im in found)]
        return outputs, f"{count(len(found), 'input image')} and their ground-truth views in {HELDOUT}/", None

    for name, fn, needs in (("data-sheet", sheet, ("data",)), ("heldout-images", images, ("heldout",))):
        if not skipped(name):
            run_inline(state, console, name, fn, failed, needs)
    inputs = json.loads((out / HELDOUT / HELDOUT_INDEX).read_text()) if state.finished("heldout-images") else []

    # 2.-4. the four stages, then (as soon as what each needs is there) the 3D stages alone on ground-truth views,
    # the pipeline folder, infer and eval
    ckpt = out / "checkpoints"
    runs = {n: ckpt / n / RUN_NAME for n in STAGE_NAMES}
    shipped = {n: Path(getattr(cfg.train, n).pretrained) for n in STAGE_NAMES if getattr(cfg.train, n).pretrained}
    for name, folder in shipped.items():
        if not skipped(f"train-{name}"):
            run_inline(state, console, f"train-{name}", _shipped_step(out, name, folder), failed)
    tasks = [_stage_task(cfg, out, n, threads) for n in cfg.train.order if n not in shipped]
    tasks.append(
        Task(
            "export",
            [
                *cli(),
                "export",
                *(a for n in STAGE_NAMES for a in (f"--{n}", str(runs[n]))),
                "--out",
                str(out / "pipeline"),
                *([f"coarse_steps={cfg.coarse_steps}"] if cfg.coarse_steps else []),
                *cfg.export_overrides,
            ],
            ["pipeline/model_index.json"],
            lambda: f"pipeline folder {out / 'pipeline'}",
            tuple(f"train-{n}" for n in STAGE_NAMES),
            threads,
        )
    )
    tasks.append(
        Task(
            "infer",
            [
                *cli(),
                "infer",
                *(str(out / im["input"]) for im in inputs),
                "--pipeline",
                str(out / "pipeline"),
                "--out",
                str(out / "infer"),
                "--seed",
                str(cfg.infer.seed),
                *cfg.infer.overrides,
            ],
            [f"infer/{im['name']}/{f}" for im in inputs for f in INFER_FILES],
            lambda: infer_summary(out / "infer"),
            ("export", "heldout-images"),
            threads,
        )
    )
    argv = [
        *cli(),
        "eval",
        "--dataset",
        "procedural",
        "--pipeline",
        str(out / "pipeline"),
        "--out",
        str(out / "eval"),
        "--limit",
        str(cfg.eval.num_objects),
    ]
    argv += ["--config", cfg.eval.config] if cfg.eval.config else []
    tasks.append(
        Task(
            "eval",
            [*argv, f"procedural.num_objects={cfg.eval.num_objects}", *cfg.eval.overrides],
            [f"eval/{f}" for f in EVAL_FILES],
            lambda: eval_summary(out / "eval"),
            ("export",),
            threads,
        )
    )
    tasks.append(
        Task(
            "recon",
            [
                sys.executable,
                "-m",
                "one2345pp.demo.recon",
                "--coarse",
                str(runs["coarse"]),
                "--fine",
                str(runs["fine"]),
                "--heldout",
                str(heldout_dir),
                "--train",
                str(data_dir),
                "--out",
                str(out / "recon"),
                "--points",
                str(cfg.recon_points),
                *(["--coarse-steps", str(cfg.coarse_steps)] if cfg.coarse_steps else []),
            ],
            ["recon/metrics.json"],
            lambda: recon_summary(out / "recon"),
            ("train-coarse", "train-fine", "heldout"),
            threads,
        )
    )
    plan = ", ".join(
        f"{n} shipped"
        if n in shipped
        else f"{n} {getattr(cfg.train, n).max_steps or 'default'} steps"
        if n != "texture"
        else "texture 1 epoch"
        for n in cfg.train.order
    )
    phase(
        "stages, pipeline, infer, eval",
        f"2/4 train the four tiny stages ({plan}), export the pipeline, infer on the held-out images, evaluate; "
        f"the 3D stages alone on ground-truth views ({cfg.jobs} at a time, each as soon as what it needs is there)",
        tasks,
        cfg.jobs,
    )

    # the page
    seconds = time.perf_counter() - started
    with state.lock:
        state.data["runs"][-1].update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(seconds, 1),
            load_end=load_average(),
            failed=sorted(failed),
        )
        state.save()
    index = write_index(out, cfg, state, inputs, seconds, RUN_NAME)
    console.print(f"== 3/4 report: {index}")
    console.print(f"{'step':<17}{'status':<9}{'seconds':>9}{'CPU s':>9}  summary")
    for name, rec in state.data["steps"].items():
        secs, cpu = ("" if rec.get(k) is None else f"{rec[k]:.1f}" for k in ("seconds", "cpu_seconds"))
        console.print(f"{name:<17}{str(rec.get('status')):<9}{secs:>9}{cpu:>9}  {rec.get('summary') or ''}")
    for key, secs in state.data["phases"].items():
        console.print(f"{secs:>35.1f}  wall-clock of: {key}")
    verdict = "finished" if not failed else f"finished with failures ({', '.join(sorted(failed))})"
    console.print(f"== 4/4 demo {verdict} in {seconds:.0f} s; open {index.resolve()}")
    return 1 if failed else 0
