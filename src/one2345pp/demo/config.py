"""The demo's typed config (``one2345pp demo --config experiments/demo.yaml key=value ...``).

The defaults are the recipe of ``make demo`` (``experiments/demo.yaml`` writes them out with the measurements behind
the step counts). Paths are relative to the current directory (the repository root for ``make demo``); every
``overrides`` list holds ``key=value`` items passed on to that step's command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_config, to_object
from ..data.config import DataBuildConfig
from ..pipeline.build import resolve_run
from ..registry import STAGES

STAGE_NAMES = tuple(STAGES)
SHIPPED_MULTIVIEW = "checkpoints/tiny/multiview"
SHIPPABLE = ("multiview",)  # stages whose trained run folder the demo can take instead of training them
# keys that change how the demo runs, not what it makes: free to differ when a demo is resumed
RUN_ONLY_KEYS = ("jobs", "threads", "progress_interval")


@dataclass
class DemoDataConfig:
    config: str | None = "experiments/tiny/data.yaml"  # the data recipe (`one2345pp data build --config`)
    num_objects: int = 32  # training objects (procedural seed data.procedural.seed, 0 by default)
    workers: int = 2
    # 28 objects in shard 0 (training) and the last 4 in shard 1 (the stages hold the last shard out for validation)
    overrides: list[str] = field(default_factory=lambda: ["data.shards.max_samples=28"])
    sheet_objects: int = 4  # rows of OUT/data/contact_sheet.png


@dataclass
class DemoStageConfig:
    config: str = ""  # the stage's YAML (experiments/tiny/STAGE.yaml)
    max_steps: int | None = None  # trainer.max_steps (None: the config's); the texture stage runs one epoch
    overrides: list[str] = field(default_factory=list)
    # a trained run folder shipped with the repository (config.yaml + export/, see checkpoints/README.md) used
    # instead of training the stage; None (or `one2345pp demo --from-scratch`): train it in the demo
    pretrained: str | None = None


def _stage(name: str, max_steps: int | None, *overrides: str) -> DemoStageConfig:
    return DemoStageConfig(f"experiments/tiny/{name}.yaml", max_steps, list(overrides))


@dataclass
class DemoTrainConfig:
    order: list[str] = field(default_factory=lambda: ["coarse", "multiview", "fine", "texture"])  # start order
    # the shipped tiny multi-view model (checkpoints/tiny/multiview/MODEL_CARD.md, 28000 steps on 8192 objects): 400
    # steps on the demo's 28 objects follow the input less well (measured with the model shipped before it, 4000
    # steps: val/cond_gain 0.20 vs 0.49, eval F 0.667 vs 0.707); trained here it keeps the 800-step VAE fit it was
    # measured with (the recipe's 1600 steps would add about 9 minutes)
    multiview: DemoStageConfig = field(
        default_factory=lambda: DemoStageConfig(
            "experiments/tiny/multiview.yaml", 400, ["train.vae_fit.steps=800"], pretrained=SHIPPED_MULTIVIEW
        )
    )
    coarse: DemoStageConfig = field(default_factory=lambda: _stage("coarse", 180))
    fine: DemoStageConfig = field(default_factory=lambda: _stage("fine", 180))
    texture: DemoStageConfig = field(
        default_factory=lambda: _stage(
            "texture",
            None,
            "data.view_resolution=64",
            "data.cond_resolution=64",
            "data.max_objects=2",
            "data.max_val_objects=1",
        )
    )


@dataclass
class DemoImagesConfig:
    num_images: int = 4  # held-out images for `infer`
    seed: int = 2000  # their procedural seed (training data: 0; `eval --dataset procedural`: 1000)


@dataclass
class DemoInferConfig:
    seed: int = 0
    overrides: list[str] = field(default_factory=lambda: ["turntable.size=128"])


@dataclass
class DemoEvalConfig:
    config: str | None = "experiments/eval/procedural.yaml"
    num_objects: int = 4
    overrides: list[str] = field(default_factory=list)


@dataclass
class DemoConfig:
    jobs: int = 2  # subprocesses at once (the training stages; infer beside eval)
    threads: int | None = None  # torch threads per subprocess that runs beside others; None: max(1, cores // jobs)
    progress_interval: float = 5.0  # seconds between the progress-bar lines of a step (TQDM_MININTERVAL)
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    images: DemoImagesConfig = field(default_factory=DemoImagesConfig)
    train: DemoTrainConfig = field(default_factory=DemoTrainConfig)
    # coarse sampling steps of the pipeline (infer, eval) and of the recon step; null: the model's own (50). 25 gave
    # the same held-out F-Score from ground-truth views as 50 (0.874 / 0.876, 4 objects) in 70% of the time
    coarse_steps: int | None = 25
    export_overrides: list[str] = field(default_factory=list)  # more pipeline settings (num_inference_steps=...)
    infer: DemoInferConfig = field(default_factory=DemoInferConfig)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    recon_points: int = 20_000  # surface samples per mesh of the `recon` step (the 3D stages on ground-truth views)


def all_overrides(cfg: DemoConfig) -> list[str]:
    out = [*cfg.data.overrides, *cfg.export_overrides, *cfg.infer.overrides, *cfg.eval.overrides]
    for name in STAGE_NAMES:
        out += getattr(cfg.train, name).overrides
    return out


def check_config(cfg: DemoConfig) -> None:
    """Raise ConfigError naming every bad value (before any work)."""
    problems = []
    if cfg.jobs < 1:
        problems.append(f"jobs={cfg.jobs} (must be >= 1)")
    if cfg.threads is not None and cfg.threads < 1:
        problems.append(f"threads={cfg.threads} (must be >= 1 or null)")
    if cfg.progress_interval < 0:
        problems.append(f"progress_interval={cfg.progress_interval} (must be >= 0)")
    if cfg.data.num_objects < 2:
        problems.append(f"data.num_objects={cfg.data.num_objects} (need >= 2)")
    if cfg.data.workers < 1:
        problems.append(f"data.workers={cfg.data.workers} (must be >= 1)")
    if cfg.data.sheet_objects < 1:
        problems.append(f"data.sheet_objects={cfg.data.sheet_objects} (must be >= 1)")
    if cfg.images.num_images < 1:
        problems.append(f"images.num_images={cfg.images.num_images} (must be >= 1)")
    if cfg.coarse_steps is not None and cfg.coarse_steps < 1:
        problems.append(f"coarse_steps={cfg.coarse_steps} (must be >= 1 or null)")
    if cfg.recon_points < 100:
        problems.append(f"recon_points={cfg.recon_points} (need >= 100 surface samples)")
    if cfg.eval.num_objects < 1:
        problems.append(f"eval.num_objects={cfg.eval.num_objects} (must be >= 1)")
    if sorted(cfg.train.order) != sorted(STAGE_NAMES):
        problems.append(f"train.order={list(cfg.train.order)} (must name each of {', '.join(STAGE_NAMES)} once)")
    for name in STAGE_NAMES:
        st: DemoStageConfig = getattr(cfg.train, name)
        if name == "texture" and st.max_steps is not None:
            problems.append("train.texture.max_steps must be null (the texture stage fits its objects in one epoch)")
        elif st.max_steps is not None and st.max_steps < 1:
            problems.append(f"train.{name}.max_steps={st.max_steps} (must be >= 1 or null)")
    for name in STAGE_NAMES:
        shipped = getattr(cfg.train, name).pretrained
        if shipped is None:
            continue
        if name not in SHIPPABLE:
            problems.append(f"train.{name}.pretrained={shipped}: only {', '.join(SHIPPABLE)} can be shipped")
            continue
        try:  # a run folder that the pipeline export accepts as trained
            if not Path(shipped).is_dir():
                raise FileNotFoundError(f"{shipped} is not a folder")
            resolve_run(name, shipped)
        except FileNotFoundError as exc:
            problems.append(
                f"train.{name}.pretrained={shipped}: {exc} (a trained run folder is needed; or run "
                "`one2345pp demo --from-scratch` to train every stage)"
            )
    files = [("data.config", cfg.data.config), ("eval.config", cfg.eval.config)]
    files += [(f"train.{n}.config", getattr(cfg.train, n).config) for n in STAGE_NAMES]
    for key, path in files:
        if key.startswith("train.") and not path:
            problems.append(f"{key} is empty (name the stage's YAML config)")
        elif path and not Path(path).is_file():
            problems.append(f"{key}={path}: file not found (paths are relative to the current directory)")
    bad = [o for o in all_overrides(cfg) if "=" not in o or o.startswith("=")]
    if bad:
        problems.append(f"overrides must look like key=value, got: {' '.join(bad)}")
    if problems:
        raise ConfigError("bad demo config: " + "; ".join(problems))


def load_demo_config(config_path=None, overrides=()) -> tuple[object, DemoConfig]:
    """(resolved omegaconf, checked :class:`DemoConfig`) of the defaults <- ``config_path`` <- overrides."""
    cfg = load_config(DemoConfig, config_path, overrides)
    conf = to_object(cfg)
    check_config(conf)
    return cfg, conf


def data_build_config(cfg: DemoConfig) -> DataBuildConfig:
    """The data recipe the demo builds its objects with: ``data.config`` <- ``data.overrides`` (ConfigError: bad)."""
    return to_object(load_config(DataBuildConfig, cfg.data.config, cfg.data.overrides))
