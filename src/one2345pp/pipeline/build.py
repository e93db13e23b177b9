"""Build a pipeline folder from trained runs: ``one2345pp export --multiview RUN --coarse RUN --fine RUN
[--texture CONFIG_OR_RUN] --out DIR [key=value ...]``.

Each of ``--multiview`` / ``--coarse`` / ``--fine`` is a run directory (``checkpoints/<stage>/<name>/``) or a
checkpoint inside a run's ``ckpts/``. A run's ``export/`` is used when present, else its ``ckpts/last.ckpt`` (or the
given checkpoint) goes through the stage's own ``export()`` into a temporary folder; nothing is written into the runs.

``--texture`` is optional (default: :class:`~one2345pp.texture.settings.TextureSettings` defaults) and may be a texture
stage YAML config (``experiments/tiny/texture.yaml``), a texture run directory, its checkpoint, or a texture export
folder / its ``config.json``.

:class:`~one2345pp.pipeline.one2345.PipelineSettings` come from what the stages trained on, never from defaults:
every run's ``config.yaml`` names its loader settings (``data.train_shards``, ``data.view_resolution``,
``data.cond_resolution``, ``data.background``) and the shard folder's own ``config.yaml`` (written by
``one2345pp data build``) holds the camera layout, the camera distance and the normalisation extent. The three runs
must agree on layout, distance, extent and view size, the coarse and fine runs on the condition-image size and on a
gray background (the multi-view stage generates on gray), and the coarse grid must be what the fine stage refines;
otherwise the build is refused with the values side by side. The preprocessing output size is the 3D stages'
condition size; its fill ratio (0.53 at the framing distance) scales with ``framing distance / distance`` when the
data used another distance; the 3D sampling steps are the models' own ``diffusion.sample_steps``.

Trailing ``key=value`` overrides set :class:`PipelineSettings` keys (``num_inference_steps=50``,
``preprocess.fill=0.5``). When a run's shards are not reachable (trained elsewhere), giving ``layout=``, ``extent=``
and ``distance=`` (``null``: the framing distance) supplies those facts for it; they are still checked against the
runs whose shards were found. A run folder moved away from its shards (the shipped ``checkpoints/tiny/multiview``)
may carry a copy of the shards' ``config.yaml`` as ``data_config.yaml``; it is read when the shards are not there.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..cameras import framing_distance, get_layout
from ..config import ConfigError, load_config, parse_overrides, to_object
from ..data.config import DataConfig
from ..data.sample import camera_distance
from ..models.multiview_builders import MultiViewModelConfig
from ..registry import PIPELINE_STAGES, component_class, export_marker, has_export, stage_module
from ..texture.settings import SETTINGS_FILE, TextureSettings, load_settings
from ..utils.run_layout import last_checkpoint, run_of_checkpoint
from .one2345 import One2345PPPipeline, PipelineSettings, settings_from_dict
from .preprocess import PreprocessConfig

STAGE_NAMES = PIPELINE_STAGES
RUN_DATA_CONFIG = "data_config.yaml"  # a copy of the shards' config.yaml inside a run folder shipped without them
DATA_FACTS = ("layout", "distance", "extent")


@dataclass
class RunSource:
    """Where one stage comes from."""

    stage: str
    given: Path  # what the user named
    run_dir: Path  # the run directory (holds config.yaml)
    checkpoint: Path | None  # the checkpoint to export when there is no export folder to use
    export_dir: Path | None  # the run's export/ when it is used as it is


@dataclass
class DataFacts:
    """What one run's data config says about the images its stage trained on."""

    stage: str
    source: str  # where the camera facts were read (a shard config.yaml, or "overrides")
    layout: str
    distance: float  # resolved camera distance
    distance_setting: float | None  # the data's data.distance (None: the framing distance)
    extent: float
    view_size: int
    cond_size: int
    background: str
    cond_fill: float | None = None  # the run's data.cond_fill: its condition views were framed at this share


def resolve_run(stage: str, path: str | os.PathLike) -> RunSource:
    """A run directory or a checkpoint in a run's ``ckpts/`` -> :class:`RunSource` (FileNotFoundError when neither)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise FileNotFoundError(f"--{stage} {p}: not a run directory (no config.yaml)")
        export_dir = p / "export"
        if has_export(stage, export_dir):
            return RunSource(stage, p, p, None, export_dir)
        ckpt = last_checkpoint(p)
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"--{stage} {p}: the run has neither export/{export_marker(stage)} nor ckpts/last.ckpt"
            )
        return RunSource(stage, p, p, ckpt, None)
    if p.is_file():
        run_dir = run_of_checkpoint(p)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--{stage} {p}: no config.yaml in the run directory {run_dir} of the checkpoint")
        return RunSource(stage, p, run_dir, p, None)
    raise FileNotFoundError(f"--{stage} {p}: no such run directory or checkpoint")


def _read_yaml(path: Path):
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException) as exc:
        raise ValueError(f"{path}: not a readable YAML config ({exc})") from exc


def _shards_config(train_shards: str) -> Path:
    """The ``config.yaml`` of the shard folder named by a loader's ``train_shards`` (folder, glob or brace pattern)."""
    p = Path(train_shards)
    pattern = any(ch in p.name for ch in "*?[{") or p.name.endswith(".tar")
    return (p.parent if pattern and not p.is_dir() else p) / "config.yaml"


def data_facts(src: RunSource, overrides: dict) -> DataFacts:
    """Read the run's loader settings and its shards' data config (see the module doc)."""
    run_cfg = _read_yaml(src.run_dir / "config.yaml")
    loader = run_cfg.get("data") if hasattr(run_cfg, "get") else None
    if loader is None or "train_shards" not in loader:
        raise ValueError(f"{src.run_dir / 'config.yaml'}: no data.train_shards (not a stage run config)")
    shards_cfg = _shards_config(str(loader.train_shards))
    if not shards_cfg.is_file() and (src.run_dir / RUN_DATA_CONFIG).is_file():
        shards_cfg = src.run_dir / RUN_DATA_CONFIG  # a run shipped without its shards carries their data config
    if shards_cfg.is_file():
        try:
            data = OmegaConf.to_object(
                OmegaConf.merge(OmegaConf.structured(DataConfig), _read_yaml(shards_cfg).get("data") or {})
            )
        except OmegaConfBaseException as exc:
            raise ValueError(f"{shards_cfg}: not a data config of `one2345pp data build` ({exc})") from exc
    elif all(k in overrides for k in DATA_FACTS):
        # the image sizes are unknown without the shards (0): the run's loader settings must give them
        data = DataConfig(
            layout=overrides["layout"],
            distance=overrides["distance"],
            normalize_extent=float(overrides["extent"]),
            view_resolution=0,
            cond_resolution=0,
        )
        shards_cfg = "overrides"
    else:
        raise FileNotFoundError(
            f"--{src.stage} {src.given}: the {src.stage} run trained on data.train_shards={loader.train_shards!r}, "
            f"whose data config {shards_cfg} is not here; run the export where the shards are, or give the camera "
            "facts as overrides: layout=NAME extent=X distance=D|null"
        )
    view = loader.get("view_resolution") or data.view_resolution
    cond = loader.get("cond_resolution") or data.cond_resolution
    if not view or not cond:
        raise ValueError(
            f"--{src.stage} {src.given}: the run's data.view_resolution / data.cond_resolution are not set and its "
            "shards' data config is not here, so the image sizes it trained on are unknown"
        )
    facts = facts_of_data(src.stage, str(shards_cfg), data, loader.get("cond_fill"))
    return replace(facts, view_size=int(view), cond_size=int(cond), background=str(loader.get("background", "gray")))


def facts_of_data(stage: str, source: str, data: DataConfig, cond_fill: float | None = None) -> DataFacts:
    """The facts of the images ``data`` renders (gray background, its own sizes), for a loader that frames the
    condition views at ``cond_fill`` (None: as rendered)."""
    return DataFacts(
        stage,
        source,
        str(data.layout),
        camera_distance(data),
        None if data.distance is None else float(data.distance),
        float(data.normalize_extent),
        int(data.view_resolution),
        int(data.cond_resolution),
        "gray",
        None if cond_fill is None else float(cond_fill),
    )


def condition_fill(facts: DataFacts) -> float:
    """The preprocessing fill ratio that frames an input image as the run's condition views were framed: the run's
    ``data.cond_fill`` when it trained on framed conditions; else as the shards render them, the default ratio at the
    framing distance, scaled by ``framing distance / distance`` for closer cameras."""
    if facts.cond_fill is not None:
        return float(facts.cond_fill)
    fill = PreprocessConfig().fill * framing_distance(get_layout(facts.layout).fov_deg, facts.extent) / facts.distance
    return round(min(1.0, fill), 4)


def multiview_view_size(src: RunSource) -> int:
    """The view size the multi-view run's export generates by default (its ``model.view_size``)."""
    model = _read_yaml(src.run_dir / "config.yaml").get("model") or {}
    return int(model.get("view_size", MultiViewModelConfig().view_size))


def check_agreement(facts: list[DataFacts], multiview_view_size: int) -> None:
    """Refuse stages trained on different data (ValueError listing every disagreement with the values)."""
    problems = []

    def differ(what: str, values: dict, same) -> None:
        first = next(iter(values.values()))
        if not all(same(v, first) for v in values.values()):
            problems.append(f"{what}: " + ", ".join(f"{k} {v}" for k, v in values.items()))

    by = {f.stage: f for f in facts}
    differ("camera layout", {s: f.layout for s, f in by.items()}, lambda a, b: a == b)
    differ("camera distance", {s: round(f.distance, 6) for s, f in by.items()}, lambda a, b: math.isclose(a, b))
    differ("normalisation extent", {s: f.extent for s, f in by.items()}, lambda a, b: math.isclose(a, b))
    views = {s: f.view_size for s, f in by.items() if s != "multiview"}
    views["multiview (generated)"] = multiview_view_size
    differ("view size", views, lambda a, b: a == b)
    differ("condition image size", {s: by[s].cond_size for s in ("coarse", "fine")}, lambda a, b: a == b)
    for s in ("coarse", "fine"):
        if by[s].background != "gray":
            problems.append(
                f"{s} trained on views composited on data.background={by[s].background!r}, but the multi-view "
                "stage generates views on gray"
            )
    if problems:
        raise ValueError("the stages were trained on different data and cannot be chained: " + "; ".join(problems))


def load_texture(source: str | os.PathLike | None, scratch: Path):
    """Texture settings from a YAML stage config, a run directory, a checkpoint or an export (see the module doc)."""
    if source is None:
        return TextureSettings()
    p = Path(source)
    if p.is_file() and p.suffix in (".yaml", ".yml"):  # a stage config: its schema lives with the training stage
        schema = stage_module("texture").TextureStageConfig
        return TextureSettings.from_stage_config(to_object(load_config(schema, p)))
    if p.is_file() and p.suffix == ".json":
        return load_settings(p)
    if p.is_dir() and (p / SETTINGS_FILE).is_file():
        return load_settings(p)
    if p.is_dir() and (p / "export" / SETTINGS_FILE).is_file():
        return load_settings(p / "export")
    if p.is_dir() or p.is_file():  # a run without an export, or a checkpoint: the stage's export, into scratch
        return load_settings(stage_module("texture").export(p, scratch / "texture"))
    raise FileNotFoundError(f"--texture {p}: no such config, run directory, checkpoint or export")


def _load_stage(src: RunSource, scratch: Path):
    """The component of one run: its export/ as it is, else the stage's export() of the checkpoint into scratch."""
    folder = src.export_dir
    if folder is None:  # exporting a checkpoint is training code, imported only here
        folder = stage_module(src.stage).export(src.checkpoint, scratch / src.stage)
    if src.stage == "multiview":
        pipe = component_class("multiview").from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return component_class(src.stage).from_pretrained(folder)


def build_pipeline(
    multiview: str | os.PathLike,
    coarse: str | os.PathLike,
    fine: str | os.PathLike,
    out: str | os.PathLike,
    texture: str | os.PathLike | None = None,
    overrides=(),
) -> Path:
    """Write the pipeline folder ``out`` from three runs (and texture settings); returns ``out``."""
    try:
        given = OmegaConf.to_container(parse_overrides(list(overrides)), resolve=True) if overrides else {}
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad overrides {list(overrides)}: {exc}") from exc
    settings_from_dict(given, "overrides")  # unknown keys and bad values fail before any work
    sources = {name: resolve_run(name, path) for name, path in zip(STAGE_NAMES, (multiview, coarse, fine))}
    facts = [data_facts(src, given) for src in sources.values()]
    check_agreement(facts, multiview_view_size(sources["multiview"]))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        parts = {name: _load_stage(src, scratch) for name, src in sources.items()}
        tex = load_texture(texture, scratch)
        f, mv = facts[1], facts[0]  # the coarse run's data (all agree on the cameras); the multi-view run's framing
        derived = {
            "layout": f.layout,
            "distance": f.distance_setting,
            "extent": f.extent,
            "view_size": f.view_size,
            "coarse_steps": parts["coarse"].cfg.diffusion.sample_steps,
            "fine_steps": parts["fine"].cfg.diffusion.sample_steps,
            "preprocess": {"size": mv.cond_size, "fill": condition_fill(mv)},
        }
        merged = OmegaConf.merge(OmegaConf.structured(PipelineSettings), derived, given)
        settings = settings_from_dict(OmegaConf.to_container(merged), "pipeline settings")
        pipe = One2345PPPipeline(parts["multiview"], parts["coarse"], parts["fine"], tex, settings)
        return pipe.save_pretrained(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
