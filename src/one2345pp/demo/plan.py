"""What the demo runs: the names it owns under OUT, and its steps as :class:`~one2345pp.demo.steps.Task` s (the
package's own command line, one subprocess each) or inline callables; :mod:`one2345pp.demo.run` runs them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from ..data.contact_sheet import write_contact_sheet
from ..pipeline.build import resolve_run
from ..utils.atomic import atomic_folder
from ..utils.run_layout import last_checkpoint
from .config import STAGE_NAMES, DemoConfig, DemoStageConfig, data_build_config
from .heldout import FOLDER as HELDOUT
from .heldout import INDEX as HELDOUT_INDEX
from .heldout import SHARDS as HELDOUT_SHARDS
from .heldout import extract_images
from .report import INDEX_FILE
from .steps import STATE_FILE, Task, cli, count, data_summary, eval_summary, infer_summary, recon_summary, stage_summary

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


def torch_threads(cfg: DemoConfig) -> int:
    """Torch threads of each step: ``threads``, else the cores shared by the ``jobs`` steps that run at once."""
    return cfg.threads if cfg.threads is not None else max(1, (os.cpu_count() or 1) // cfg.jobs)


def run_folders(out: Path) -> dict[str, Path]:
    """Each stage's run folder under ``OUT/checkpoints``."""
    return {n: out / "checkpoints" / n / RUN_NAME for n in STAGE_NAMES}


def shipped_runs(cfg: DemoConfig) -> dict[str, Path]:
    """The stages that come shipped (``train.<stage>.pretrained``) and their run folders."""
    return {n: Path(getattr(cfg.train, n).pretrained) for n in STAGE_NAMES if getattr(cfg.train, n).pretrained}


# ------------------------------------------------------------------------------------------------ 1. data
def data_task(name: str, cfg: DemoConfig, out: Path, folder: Path, num: int, extra: list[str], threads: int) -> Task:
    argv = [*cli(), "data", "build", "--source", "procedural", "--num-objects", str(num), "--out", str(folder)]
    argv += ["--workers", str(cfg.data.workers)]
    argv += ["--config", cfg.data.config] if cfg.data.config else []
    rel = folder.relative_to(out).as_posix()
    outputs = [f"{rel}/manifest.jsonl", f"{rel}/config.yaml"]
    return Task(name, [*argv, *cfg.data.overrides, *extra], outputs, lambda: data_summary(folder), threads=threads)


def data_tasks(cfg: DemoConfig, out: Path, threads: int) -> list[Task]:
    """The training shards, and the held-out objects (the same recipe, another procedural seed, one condition view
    each)."""
    heldout_args = [f"data.procedural.seed={cfg.images.seed}", "data.cond_samples=1"]
    return [
        data_task("data", cfg, out, out / "data", cfg.data.num_objects, [], threads),
        data_task("heldout", cfg, out, out / HELDOUT_SHARDS, cfg.images.num_images, heldout_args, threads),
    ]


def data_title(cfg: DemoConfig, out: Path) -> str:
    return (
        f"1/4 data: {cfg.data.num_objects} training objects -> {out / 'data'}, {cfg.images.num_images} held-out "
        f"objects (procedural seed {cfg.images.seed}) -> {out / HELDOUT_SHARDS}"
    )


def sheet_step(cfg: DemoConfig, out: Path):
    """``data-sheet``: a contact sheet of the first training objects."""

    def step():
        data_dir = out / "data"
        path = write_contact_sheet(data_dir, data_dir / "contact_sheet.png", num=cfg.data.sheet_objects)
        return ["data/contact_sheet.png"], str(path.relative_to(out)), None

    return step


def images_step(cfg: DemoConfig, out: Path):
    """``heldout-images``: the held-out objects' condition views and ground-truth views as images."""

    def step():
        found = extract_images(out, cfg.images.num_images)
        outputs = [f"{HELDOUT}/{HELDOUT_INDEX}", *(im["input"] for im in found), *(im["gt_views"] for im in found)]
        return outputs, f"{count(len(found), 'input image')} and their ground-truth views in {HELDOUT}/", None

    return step


# ------------------------------------------------------------------------------------------------ 2. stages
def stage_task(cfg: DemoConfig, out: Path, name: str, threads: int) -> Task:
    st: DemoStageConfig = getattr(cfg.train, name)
    run = run_folders(out)[name]
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
    if name != "texture" and last_checkpoint(run).is_file():
        argv.append("run.resume=last")  # an interrupted run continues from its last checkpoint
    rel = f"checkpoints/{name}/{RUN_NAME}"
    outputs = [f"{rel}/config.yaml", f"{rel}/export/{'model_index.json' if name == 'multiview' else 'config.json'}"]
    if name == "texture":
        outputs.append(f"{rel}/metrics.json")
    return Task(f"train-{name}", argv, outputs, lambda: stage_summary(name, run), ("data",), threads)


def shipped_step(out: Path, name: str, shipped: Path):
    """The step that stands for ``train-<name>`` when the stage comes shipped: the run folder is copied to where a
    demo-trained run would be (a temporary name, then renamed), so the export, the report and a rerun read it alike."""

    def step():
        dest = run_folders(out)[name]
        with atomic_folder(dest) as tmp:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        src = resolve_run(name, dest)
        outputs = [dest / "config.yaml", src.export_dir or src.checkpoint]
        summary = f"shipped model {shipped} ({shipped / 'MODEL_CARD.md'}); {stage_summary(name, dest)}"
        return [p.relative_to(out).as_posix() for p in outputs], summary, None

    return step


def stages_title(cfg: DemoConfig, shipped: dict[str, Path]) -> str:
    plan = ", ".join(
        f"{n} shipped"
        if n in shipped
        else f"{n} {getattr(cfg.train, n).max_steps or 'default'} steps"
        if n != "texture"
        else "texture 1 epoch"
        for n in cfg.train.order
    )
    return (
        f"2/4 train the four tiny stages ({plan}), export the pipeline, infer on the held-out images, evaluate; "
        f"the 3D stages alone on ground-truth views ({cfg.jobs} at a time, each as soon as what it needs is there)"
    )


# ------------------------------------------------------------------------------- 3.-5. export, infer, eval, recon
def export_task(cfg: DemoConfig, out: Path, threads: int) -> Task:
    runs = run_folders(out)
    argv = [*cli(), "export", *(a for n in STAGE_NAMES for a in (f"--{n}", str(runs[n])))]
    argv += ["--out", str(out / "pipeline"), *([f"coarse_steps={cfg.coarse_steps}"] if cfg.coarse_steps else [])]
    argv += cfg.export_overrides
    needs = tuple(f"train-{n}" for n in STAGE_NAMES)
    return Task(
        "export", argv, ["pipeline/model_index.json"], lambda: f"pipeline folder {out / 'pipeline'}", needs, threads
    )


def infer_task(cfg: DemoConfig, out: Path, inputs: list[dict], threads: int) -> Task:
    argv = [*cli(), "infer", *(str(out / im["input"]) for im in inputs), "--pipeline", str(out / "pipeline")]
    argv += ["--out", str(out / "infer"), "--seed", str(cfg.infer.seed), *cfg.infer.overrides]
    outputs = [f"infer/{im['name']}/{f}" for im in inputs for f in INFER_FILES]
    return Task("infer", argv, outputs, lambda: infer_summary(out / "infer"), ("export", "heldout-images"), threads)


def recipe_overrides(cfg: DemoConfig) -> list[str]:
    """The training objects' recipe, all but its seed, as ``eval`` overrides: the eval's held-out objects are then of
    the kind the stages trained on (upright when the training objects are), drawn from the eval's own seed."""
    procedural = data_build_config(cfg).data.procedural
    return [
        f"procedural.{f.name}={json.dumps(getattr(procedural, f.name))}"
        for f in dataclasses.fields(procedural)
        if f.name != "seed"
    ]


def eval_task(cfg: DemoConfig, out: Path, threads: int) -> Task:
    argv = [*cli(), "eval", "--dataset", "procedural", "--pipeline", str(out / "pipeline")]
    argv += ["--out", str(out / "eval"), "--limit", str(cfg.eval.num_objects)]
    argv += ["--config", cfg.eval.config] if cfg.eval.config else []
    argv += [*recipe_overrides(cfg), f"procedural.num_objects={cfg.eval.num_objects}", *cfg.eval.overrides]
    outputs = [f"eval/{f}" for f in EVAL_FILES]
    return Task("eval", argv, outputs, lambda: eval_summary(out / "eval"), ("export",), threads)


def recon_task(cfg: DemoConfig, out: Path, threads: int) -> Task:
    """The 3D stages alone on the held-out objects' ground-truth views (:mod:`one2345pp.demo.recon`)."""
    runs = run_folders(out)
    argv = [sys.executable, "-m", "one2345pp.demo.recon", "--coarse", str(runs["coarse"]), "--fine", str(runs["fine"])]
    argv += ["--heldout", str(out / HELDOUT_SHARDS), "--train", str(out / "data"), "--out", str(out / "recon")]
    argv += ["--points", str(cfg.recon_points)]
    argv += ["--coarse-steps", str(cfg.coarse_steps)] if cfg.coarse_steps else []
    needs = ("train-coarse", "train-fine", "heldout")
    return Task("recon", argv, ["recon/metrics.json"], lambda: recon_summary(out / "recon"), needs, threads)


def stage_tasks(cfg: DemoConfig, out: Path, inputs: list[dict], shipped: dict[str, Path], threads: int) -> list[Task]:
    """The stages to train, then what reads them: each runs as soon as what it needs is there."""
    stages = [stage_task(cfg, out, n, threads) for n in cfg.train.order if n not in shipped]
    readers = [export_task(cfg, out, threads), infer_task(cfg, out, inputs, threads)]
    return [*stages, *readers, eval_task(cfg, out, threads), recon_task(cfg, out, threads)]
