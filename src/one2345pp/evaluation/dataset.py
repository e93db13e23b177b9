"""Scoring a pipeline over a dataset: ``one2345pp eval --dataset gso|procedural`` (:func:`evaluate_dataset`).

For every object: read the mesh, normalise it as the shard builder does, render the input view, run the pipeline,
score its mesh and six views (:mod:`one2345pp.evaluation.scoring`), and write ``OUT/objects/<uid>/``::

    input.png          the rendered input (RGBA)
    views.png          the pipeline's 3x2 grid of generated views
    gt_views.png       the ground truth rendered at the same six cameras (on the same gray)
    turntable.png      the predicted mesh from the evaluation views (one row per elevation)
    gt_turntable.png   the ground truth from the same views
    mesh.glb           the predicted (textured) mesh
    metrics.json       the object's row, written last (temporary name, renamed): its presence marks it finished

then the tables over all objects (:func:`one2345pp.evaluation.report.write_report`): ``OUT/metrics.csv``,
``metrics.json``, ``report.md`` (our means beside the published numbers of METHOD.md) and ``report.html``.

Datasets: ``gso`` reads a Google Scanned Objects folder (``<name>/meshes/model.obj``, see
:func:`one2345pp.data.sources.gso_items`); ``procedural`` generates ``procedural.num_objects`` held-out objects
in code (seed ``procedural.seed``, 1000 by default where the training data use 0), writes them under
``OUT/meshes/`` and reads them back through the same loader as real meshes.

A failing object (unreadable mesh, an empty prediction, ...) is recorded with the step and the reason and the run
goes on. A rerun into the same folder skips every object with a ``metrics.json`` (``retry_failed=true``: not the
failed ones) and refuses other settings (``OUT/eval_config.yaml``; keys of
:data:`~one2345pp.evaluation.config.RUN_ONLY_KEYS` may change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from ..cameras import Camera, get_layout
from ..config import ConfigError, check_or_save_config, load_config, to_object
from ..data.sources import SourceItem, gso_items, procedural_items
from ..geometry.mesh import Mesh, MeshError
from ..geometry.mesh_io import normalize, resolve_up_axis
from ..pipeline.one2345 import INDEX_FILE, One2345PPPipeline
from ..texture.export import export_mesh
from ..utils.atomic import write_json, write_png
from .config import RUN_ONLY_KEYS, EvalConfig
from .report import _json_value, normalize_rows, summarize, write_report
from .scoring import ObjectScorer, resolve_device, unavailable_metrics

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "RUN_FILE",
    "evaluate_dataset",
    "evaluate_object",
    "frame_ground_truth",
    "input_camera",
    "list_objects",
    "load_eval_config",
]

DATASETS = ("gso", "procedural")
RUN_FILE = "eval_config.yaml"
OBJECTS = "objects"
METRICS_FILE = "metrics.json"
TITLES = {"gso": "Google Scanned Objects", "procedural": "held-out procedural objects"}
MESH_FORMATS = ("glb", "obj", "ply")


# ------------------------------------------------------------------------------------------------------ config
def load_eval_config(overrides: Sequence[str] = (), config_path: str | os.PathLike | None = None) -> EvalConfig:
    """The :class:`EvalConfig` of the defaults <- ``config_path`` <- overrides, checked."""
    cfg = to_object(load_config(EvalConfig, config_path, overrides))
    if cfg.mesh_format not in MESH_FORMATS:
        raise ConfigError(f"mesh_format must be one of {MESH_FORMATS}, got {cfg.mesh_format!r}")
    if not -90.0 < cfg.input.elevation_deg < 90.0:
        raise ConfigError(f"input.elevation_deg must lie in (-90, 90), got {cfg.input.elevation_deg}")
    if cfg.input.resolution is not None and cfg.input.resolution < 8:
        raise ConfigError(f"input.resolution must be >= 8 pixels, got {cfg.input.resolution}")
    if cfg.procedural.num_objects < 1:
        raise ConfigError(f"procedural.num_objects must be >= 1, got {cfg.procedural.num_objects}")
    if cfg.points < 100:
        raise ConfigError(f"points must be >= 100 surface samples, got {cfg.points}")
    if not cfg.tau > 0:
        raise ConfigError(f"tau must be > 0, got {cfg.tau}")
    return cfg


# ----------------------------------------------------------------------------------------------------- objects
def list_objects(dataset: str, input_dir, cfg: EvalConfig, out_dir: str | os.PathLike) -> list[SourceItem]:
    """The objects of a dataset, in a fixed order (GSO: sorted folder names; procedural: by index)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "gso":
        if input_dir is None:
            raise ValueError("--dataset gso needs --input GSO_DIR (the Google Scanned Objects folder)")
        items = gso_items(input_dir)
    else:
        if input_dir is not None:
            raise ValueError(
                "--dataset procedural generates its objects in code and takes no --input "
                "(set procedural.num_objects / procedural.seed instead)"
            )
        items = procedural_items(cfg.procedural, cfg.procedural.num_objects, Path(out_dir) / "meshes")
    dup = sorted(u for u, n in Counter(it.uid for it in items).items() if n > 1)
    if dup:
        raise ValueError(f"duplicate object uids in the {dataset} dataset: {dup[:5]}")
    return items


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def frame_ground_truth(mesh: Mesh, extent: float, input_azimuth_deg: float = 0.0) -> Mesh:
    """The ground truth in the prediction's frame: normalised like the training data (bounding box centred, longest
    side ``extent``), then turned by ``-input_azimuth_deg`` about +Z so that the input camera sits at azimuth 0."""
    norm, _, _ = normalize(mesh, extent)
    if input_azimuth_deg % 360.0 == 0.0:
        return norm
    return dataclasses.replace(norm, vertices=norm.vertices @ _rot_z(-input_azimuth_deg).T)


def input_camera(settings, cfg: EvalConfig) -> Camera:
    """The input view's camera in the prediction's frame: azimuth 0, ``input.elevation_deg``, the pipeline's
    distance and FoV, ``input.resolution`` (default: the pipeline's preprocessing size)."""
    size = cfg.input.resolution or settings.preprocess.size
    fov = get_layout(settings.layout).fov_deg
    return Camera(0.0, float(cfg.input.elevation_deg), float(settings.camera_distance), fov, size, size)


def _read_row(path: Path, uid: str) -> dict | None:
    """A finished object's row, or None (absent, unreadable or someone else's file: the object is evaluated)."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); evaluating %s again", path, exc, uid)
        return None
    if not isinstance(row, dict) or row.get("uid") != uid or row.get("status") not in ("ok", "failed"):
        log.warning("%s is not a metrics file of %s; evaluating it again", path, uid)
        return None
    return row


# ------------------------------------------------------------------------------------------------------ object
def evaluate_object(item: SourceItem, pipe, scorer, cfg: EvalConfig, out_dir: Path) -> dict:
    """Evaluate one object into ``out_dir/objects/<uid>/`` and return its row (``status`` ok or failed; a failure
    names the step: load, ground truth, pipeline, scoring)."""
    from PIL import Image

    rel = Path(OBJECTS) / item.uid
    folder = out_dir / rel
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    row: dict = {"uid": item.uid, "source": item.path}
    call = {k: v for k, v in dataclasses.asdict(cfg.pipeline).items() if v is not None}
    step = "load"
    try:
        mesh = item.load(cfg.procedural, cfg.up_axis)
        row["source"] = mesh.source or item.path
        step = "ground truth"
        gt = frame_ground_truth(mesh, pipe.settings.extent, cfg.input.azimuth_deg)
        rgba = scorer.renderer.render(gt, input_camera(pipe.settings, cfg)).to_uint8_rgba()
        write_png(folder / "input.png", rgba)
        row["input_image"] = (rel / "input.png").as_posix()
        step = "pipeline"
        result = pipe(Image.fromarray(rgba, "RGBA"), seed=cfg.seed, **call)
        write_png(folder / "views.png", result.grid)
        row["views_image"] = (rel / "views.png").as_posix()
        mesh_name = f"mesh.{cfg.mesh_format}"
        export_mesh(result.mesh, folder / mesh_name)
        row["mesh"] = (rel / mesh_name).as_posix()
        row["seconds"] = float(result.timings["total"])
        row["timings"] = {k: float(v) for k, v in result.timings.items()}
        step = "scoring"
        generated = np.stack([np.asarray(v.convert("RGB")) for v in result.views])
        scored = scorer.score(
            result.mesh_raw,
            gt,
            generated,
            result.cameras,
            pred_render_mesh=result.mesh.to_mesh(),
            alpha_threshold=pipe.settings.view_alpha_threshold,
        )
        for name, image in scored.images.items():
            write_png(folder / f"{name}.png", image)
            row[f"{name}_image"] = (rel / f"{name}.png").as_posix()
        row.update(scored.metrics)
        row.update(status="ok", reason=None)
    except Exception as exc:  # one object's failure is recorded with its reason; the run goes on
        reason = exc.reason if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
        row.update(status="failed", reason=f"{step}: {reason}")
        log.warning("object %s failed at %s: %s", item.uid, step, reason)
    row["eval_seconds"] = time.perf_counter() - t0
    row = _json_value(row)  # what the file holds (an infinite PSNR becomes null), so reruns read the same rows
    write_json(folder / METRICS_FILE, _json_value(row), allow_nan=False)
    return row


# ------------------------------------------------------------------------------------------------------- runs
def _check_pipeline_dir(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {path}")
    index = path / INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(
            f"{path} is not a pipeline folder (no {INDEX_FILE}); pass a folder written by "
            "One2345PPPipeline.save_pretrained"
        )
    try:
        return json.loads(index.read_text())
    except ValueError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc})") from exc


def _run_record(dataset: str, input_dir, pipeline_dir: Path, cfg: EvalConfig) -> dict:
    return {
        "dataset": dataset,
        "input": None if input_dir is None else str(Path(input_dir).resolve()),
        "pipeline": str(pipeline_dir.resolve()),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }


def _check_or_save_run(out: Path, record: dict) -> None:
    check_or_save_config(
        out / RUN_FILE,
        OmegaConf.create(record),
        what="an evaluation",
        remedy="choose another --out, or rerun with the same settings to resume",
        ignore=[f"config.{k}" for k in RUN_ONLY_KEYS],
    )


def evaluate_dataset(
    dataset: str,
    input_dir: str | os.PathLike | None,
    pipeline_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    overrides: Sequence[str] = (),
    *,
    config_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate the pipeline in ``pipeline_dir`` on ``dataset`` (``gso`` with ``input_dir`` = the GSO folder, or
    ``procedural``) into ``out_dir`` (see the module doc); ``limit``: the first N objects only; ``overrides``:
    ``key=value`` settings of :class:`~one2345pp.evaluation.config.EvalConfig` over ``config_path`` (YAML).

    Returns the summary: ``count`` / ``succeeded`` / ``failed`` objects, ``evaluated`` (this run) and ``skipped``
    (finished before), ``mean`` and ``n`` per metric, ``failures`` (uid, reason), ``unavailable`` (metric ->
    reason), ``files`` (kind -> path) and ``out_dir``. A missing GSO folder, pipeline folder or model path, a folder
    that is not a pipeline, or a bad setting raises FileNotFoundError / ValueError / ConfigError before anything is
    evaluated."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    cfg = load_eval_config(overrides, config_path)
    resolve_up_axis("model.glb", cfg.up_axis)  # an unknown up axis fails before anything is written
    pipeline_dir, out = Path(pipeline_dir), Path(out_dir)
    index = _check_pipeline_dir(pipeline_dir)
    items = list_objects(dataset, input_dir, cfg, out)
    if limit is not None:
        items = items[:limit]
    out.mkdir(parents=True, exist_ok=True)
    record = _run_record(dataset, input_dir, pipeline_dir, cfg)
    _check_or_save_run(out, record)

    rows: dict[str, dict] = {}
    for it in items:
        row = _read_row(out / OBJECTS / it.uid / METRICS_FILE, it.uid)
        if row is not None and not (cfg.retry_failed and row["status"] == "failed"):
            rows[it.uid] = row
    todo = [it for it in items if it.uid not in rows]
    skipped = len(items) - len(todo)
    if todo:
        device = resolve_device(cfg.device)
        scorer = ObjectScorer(cfg, device)  # loads CLIP / LPIPS when configured: a bad path fails here
        pipe = One2345PPPipeline.from_pretrained(pipeline_dir, device=device)
        bar = tqdm(total=len(todo), desc=f"eval {dataset}", unit="obj", disable=not cfg.progress)
        counts = Counter()
        try:
            for it in todo:
                row = evaluate_object(it, pipe, scorer, cfg, out)
                rows[it.uid] = row
                counts[row["status"]] += 1
                bar.update(1)
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"], skipped=skipped)
        finally:
            bar.close()
    ordered = [rows[it.uid] for it in items]
    unavailable = unavailable_metrics(cfg)
    settings = {**record, "limit": limit, "pipeline_settings": index.get("settings", {})}
    files = write_report(
        ordered,
        out,
        dataset=dataset,
        title=f"One-2-3-45++ evaluation: {TITLES[dataset]}",
        settings=settings,
        unavailable=unavailable,
    )
    summary = summarize(normalize_rows(ordered, out))
    return {
        "dataset": dataset,
        "out_dir": str(out),
        **summary,
        "evaluated": len(todo),
        "skipped": skipped,
        "unavailable": unavailable,
        "files": {kind: str(p) for kind, p in files.items()},
    }
