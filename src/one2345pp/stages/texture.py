"""Stage 4: texture refinement as a training stage (``one2345pp train --stage texture``; METHOD.md, stage 4).

Nothing is shared between objects: "training" fits every object of the shards on its own, exactly as the pipeline
refines a generated mesh against generated views, and reports how well the fit predicts a view it did not see.
The stage's hyperparameters (``field``, ``refine``, ``bake``) are what sweeps tune; the metric is ``val/psnr``
(``val/loss`` is its MSE, lower is better, the default checkpoint monitor).

Per object (:meth:`TextureStage.fit_object`):

1. the ground-truth mesh is read from the file recorded in ``meta.json`` (``source``; a relative path is also
   looked up beside the shard) and normalised with meta's ``normalize_scale`` / ``normalize_offset``; its colours
   are dropped (geometry only);
2. the supervising views are condition ``data.supervise_condition``'s input view and its six target views
   (alpha and background from the shard), fitted by :func:`one2345pp.texture.refine.refine_texture`;
3. the held-out view is the input view of condition ``data.holdout_condition`` (another random pose, so shards
   need ``data.cond_samples >= 2``): its PSNR inside the mask is logged as ``train/psnr`` (training shards) or
   ``val/psnr`` (validation shards), the fit's own PSNR on the supervising pixels as ``*/fit_psnr``;
4. the first ``export_objects`` training objects are baked (``bake``) and written to ``<run dir>/meshes/<uid>.<fmt>``
   for every format in ``export_formats`` (glb, obj, ply), as samples to look at.

**Export** (``one2345pp export --stage texture --run RUN``; also written by ``train`` to ``RUN/export``): the stage
learns no weights, so what the pipeline needs is its settings. The export folder holds one ``config.json``::

    {"stage": "texture", "format_version": 1,
     "field": {...}, "refine": {...}, "bake": {...}, "rasterizer": {...},   # TextureSettings
     "metrics": {"train": {"objects", "psnr_mean", "psnr_min", "seconds_mean"}, "val": {...}},   # when known
     "source": "<run directory or checkpoint>"}

:func:`load_settings` reads it back (unknown keys and bad values are errors) and :func:`texture_mesh` runs
refinement and baking with it on a generated mesh and generated views.

The module has no parameters of its own and optimises manually (one Adam per object inside ``training_step``), so
``trainer.gradient_clip_val`` must be null and it runs on one device; run one process per GPU on disjoint shards
to use more. Each epoch is one pass over the shards (``resampled: false`` by default); ``data.max_objects`` and
``data.max_val_objects`` cap the objects per epoch and loader worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig

from ..cameras import NUM_VIEWS, Camera, untile
from ..config import ConfigError, load_config, to_object
from ..data.config import LoaderConfig
from ..data.datamodule import ShardDataModule
from ..data.decode import (
    CorruptSample,
    background_level,
    composite,
    condition_count,
    read_json,
    read_rgba,
)
from ..geometry.mesh import Mesh
from ..geometry.mesh_io import load_mesh
from ..models.color_field import ColorFieldConfig
from ..rendering.rasterizer import RasterizerConfig, make_rasterizer
from ..texture.bake import BakeConfig, bake
from ..texture.export import EXPORT_SUFFIXES, export_mesh
from ..texture.refine import RefineConfig, View, psnr_from_mse, refine_texture, view_psnr
from ..texture.settings import TextureSettings, save_settings
from ..training.config import RunConfig, TrainerConfig
from ..training.media import log_mesh
from ..training.runner import fit
from ..utils.atomic import write_json
from ..utils.run_layout import run_of_checkpoint

__all__ = [
    "TextureDataModule",
    "TextureDecoder",
    "TextureLoaderConfig",
    "TextureStage",
    "TextureStageConfig",
    "export",
    "load_stage_config",
    "load_object_mesh",
    "train",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class TextureLoaderConfig(LoaderConfig):
    train_shards: str = "data/procedural"
    batch_size: int = 1  # objects per training_step (each is fitted on its own)
    num_workers: int = 0
    shuffle_buffer: int = 0
    resampled: bool = False  # one pass over the shards per epoch
    supervise_condition: int = 0  # condition k whose input view + six target views supervise the fit
    holdout_condition: int = 1  # condition whose input view is held out for the PSNR
    max_objects: int | None = None  # training objects per epoch and loader worker (None: all)
    max_val_objects: int | None = 4  # validation objects per epoch and loader worker (None: all)


def _texture_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=-1, max_epochs=1, devices="1", gradient_clip_val=None, log_every_n_steps=1)


@dataclass
class TextureStageConfig:
    data: TextureLoaderConfig = dataclasses.field(default_factory=TextureLoaderConfig)
    field: ColorFieldConfig = dataclasses.field(default_factory=ColorFieldConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    bake: BakeConfig = dataclasses.field(default_factory=BakeConfig)
    rasterizer: RasterizerConfig = dataclasses.field(default_factory=RasterizerConfig)
    export_objects: int = 1  # training objects baked and written to <run dir>/export/
    export_formats: list[str] = dataclasses.field(default_factory=lambda: ["glb"])  # any of glb, obj, ply
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=_texture_trainer)


def check_stage_config(cfg: TextureStageConfig) -> None:
    """Raise :class:`ConfigError` for settings the stage cannot run with."""
    d = cfg.data
    if d.supervise_condition < 0 or d.holdout_condition < 0 or d.supervise_condition == d.holdout_condition:
        raise ConfigError(
            f"data.supervise_condition ({d.supervise_condition}) and data.holdout_condition ({d.holdout_condition}) "
            "must be different condition indices >= 0"
        )
    for key in ("max_objects", "max_val_objects"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null, got {value}")
    if d.background == "random":
        raise ConfigError("data.background=random is not supported by the texture stage; use gray, white or a number")
    if cfg.trainer.gradient_clip_val is not None:
        raise ConfigError(
            "the texture stage optimises each object itself (manual optimisation): set trainer.gradient_clip_val=null"
        )
    if str(cfg.trainer.devices).strip() != "1" or cfg.trainer.num_nodes != 1:
        raise ConfigError(
            f"the texture stage fits objects independently on one device (trainer.devices=1, num_nodes=1), got "
            f"devices={cfg.trainer.devices!r}, num_nodes={cfg.trainer.num_nodes}; run one process per GPU on "
            "disjoint shards instead"
        )
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be >= 1 (each epoch is one pass), got {cfg.trainer.max_epochs}")
    if d.resampled and d.max_objects is None:
        raise ConfigError("data.resampled=true streams forever: set data.max_objects to end each epoch")
    bad = [f for f in cfg.export_formats if "." + str(f).lower().lstrip(".") not in EXPORT_SUFFIXES]
    if bad:
        raise ConfigError(f"export_formats {bad} not supported; choose from {', '.join(EXPORT_SUFFIXES)}")
    if cfg.export_objects < 0:
        raise ConfigError(f"export_objects must be >= 0, got {cfg.export_objects}")
    TextureSettings.from_stage_config(cfg).check()


# ------------------------------------------------------------------------------------------------------------ data
def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    y = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", antialias=True)
    return y.reshape(*lead, *y.shape[-3:]).clamp_(0.0, 1.0)


@dataclass
class TextureDecoder:
    """Raw shard sample -> the views, alphas and cameras of one object's fit plus its held-out view and meta."""

    background: str | float = "gray"
    view_resolution: int | None = None
    cond_resolution: int | None = None
    supervise_condition: int = 0
    holdout_condition: int = 1

    def __call__(self, sample: Mapping) -> dict:
        n = condition_count(sample)
        url = sample.get("__url__")
        for k, what in ((self.supervise_condition, "supervise"), (self.holdout_condition, "holdout")):
            if k >= n:
                raise ValueError(
                    f"{url}: sample {sample.get('__key__')!r} has {n} condition view(s) but data.{what}_condition={k}; "
                    "the texture stage needs shards built with data.cond_samples >= 2 (one supervising condition, "
                    "one held out)"
                )
        level = background_level(self.background)
        k, h = self.supervise_condition, self.holdout_condition
        cams = read_json(sample, "cams.json")
        meta = read_json(sample, "meta.json")
        try:
            fov = float(cams["fov_deg"])
            entries = cams["samples"]
            sup, held = entries[k], entries[h]
            view_dicts = list(sup["views"])
        except Exception as exn:
            raise CorruptSample(sample.get("__key__"), url, f"cams.json lacks fov_deg / samples ({exn!r})") from exn
        if len(view_dicts) != NUM_VIEWS:
            raise CorruptSample(sample.get("__key__"), url, f"cams.json samples[{k}] has {len(view_dicts)} views")

        cond, cond_a = composite(read_rgba(sample, f"cond{k}.png"), level)
        hold, hold_a = composite(read_rgba(sample, f"cond{h}.png"), level)
        grid = read_rgba(sample, f"mv{k}.png")
        views, views_a = composite(untile(grid), level)
        cond, cond_a = _resize(cond, self.cond_resolution), _resize(cond_a, self.cond_resolution)
        hold, hold_a = _resize(hold, self.cond_resolution), _resize(hold_a, self.cond_resolution)
        views, views_a = _resize(views, self.view_resolution), _resize(views_a, self.view_resolution)
        try:
            cameras = [Camera.from_dict(sup["cond"], fov, cond.shape[-1])]
            cameras += [Camera.from_dict(v, fov, views.shape[-1]) for v in view_dicts]
            holdout_camera = Camera.from_dict(held["cond"], fov, hold.shape[-1])
        except Exception as exn:
            raise CorruptSample(sample.get("__key__"), url, f"cams.json has unreadable cameras ({exn!r})") from exn
        return {
            "__key__": sample.get("__key__"),
            "__url__": url,
            "background": torch.tensor(level, dtype=torch.float32),
            "cond": cond,
            "cond_alpha": cond_a,
            "views": views,
            "views_alpha": views_a,
            "holdout": hold,
            "holdout_alpha": hold_a,
            # plain dicts (Camera fields): Lightning moves batches with apply_to_collection, which rejects frozen
            # dataclasses
            "cameras": [asdict(c) for c in cameras],
            "holdout_camera": asdict(holdout_camera),
            "meta": meta,
        }


class TextureDataModule(ShardDataModule):
    """One object per sample: supervising views, held-out view, cameras and meta (see :class:`TextureDecoder`)."""

    def __init__(self, cfg: TextureLoaderConfig):
        super().__init__(cfg)

    def sample_decoder(self, train: bool, split: int) -> TextureDecoder:
        c = self.cfg
        return TextureDecoder(
            c.background, c.view_resolution, c.cond_resolution, c.supervise_condition, c.holdout_condition
        )

    def build_dataset(self, urls: list[str], train: bool):
        ds = super().build_dataset(urls, train)
        cap = self.cfg.max_objects if train else self.cfg.max_val_objects
        if cap is not None:
            ds = ds.with_epoch(math.ceil(cap / self.cfg.batch_size))
        return ds


def resolve_source(source: str, shard_url: str | None, uid: str | None = None) -> Path:
    """The mesh file behind ``meta.json``'s ``source``: as recorded, else relative to the shard's folder, else in
    the builder's ``meshes/<uid>/`` layout beside the shard."""
    candidates = [Path(source)]
    if shard_url and "://" not in shard_url:
        folder = Path(shard_url).parent
        if not Path(source).is_absolute():
            candidates.append(folder / source)
        if uid:
            candidates.append(folder / "meshes" / uid / Path(source).name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mesh of {uid or 'the sample'} not found; tried {', '.join(str(p) for p in candidates)} "
        "(meta.json 'source'; keep the builder's meshes/ folder beside the shards)"
    )


def load_object_mesh(meta: Mapping, shard_url: str | None = None) -> Mesh:
    """The ground-truth geometry of a shard sample, normalised as in the shard, colours dropped."""
    try:
        source = str(meta["source"])
        scale = float(meta["normalize_scale"])
        offset = np.asarray(meta["normalize_offset"], dtype=np.float64).reshape(3)
    except Exception as exn:
        raise ValueError(f"meta.json lacks source / normalize_scale / normalize_offset ({exn!r})") from exn
    path = resolve_source(source, shard_url, meta.get("uid"))
    mesh = load_mesh(path)
    return Mesh(mesh.vertices * scale + offset, mesh.faces, source=str(path))


def _object(batch: dict, i: int) -> dict:
    """Object ``i`` of a collated batch."""
    return {key: value[i] for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------------- module
class TextureStage(LightningModule):
    """Fits a colour field per object (manual optimisation) and logs the held-out PSNR."""

    def __init__(
        self,
        field: dict | None = None,
        refine: dict | None = None,
        bake: dict | None = None,
        rasterizer: dict | None = None,
        export_objects: int = 1,
        export_formats: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # plain dicts: what a sweep varies, stored with every checkpoint
        self.automatic_optimization = False
        self.field_cfg = ColorFieldConfig(**(field or {}))
        self.refine_cfg = RefineConfig(**(refine or {}))
        self.bake_cfg = BakeConfig(**(bake or {}))
        self.raster_cfg = RasterizerConfig(**(rasterizer or {}))
        self.export_objects = int(export_objects)
        self.export_formats = [str(f).lower().lstrip(".") for f in (export_formats or ["glb"])]
        self._rasterizer = None
        self.results: dict[str, list[dict]] = {"train": [], "val": []}
        self.exported: list[Path] = []

    @classmethod
    def from_config(cls, cfg: TextureStageConfig) -> TextureStage:
        return cls(
            asdict(cfg.field),
            asdict(cfg.refine),
            asdict(cfg.bake),
            asdict(cfg.rasterizer),
            cfg.export_objects,
            list(cfg.export_formats),
        )

    def configure_optimizers(self):
        return None  # one Adam per object, created inside refine_texture

    @property
    def rasterizer(self):
        if self._rasterizer is None or self._rasterizer.device != self.device:
            self._rasterizer = make_rasterizer(self.raster_cfg.backend, self.device, self.raster_cfg.threads)
        return self._rasterizer

    def fit_object(self, obj: dict) -> dict:
        """Refine one object; returns its metrics, the field and the prepared mesh."""
        t0 = time.perf_counter()
        mesh = load_object_mesh(obj["meta"], obj.get("__url__"))
        bg = float(obj["background"])
        images = [obj["cond"], *obj["views"]]
        alphas = [obj["cond_alpha"], *obj["views_alpha"]]
        weights = [self.refine_cfg.input_view_weight] + [1.0] * NUM_VIEWS
        cams = [Camera(**c) for c in obj["cameras"]]
        views = [View(c, im, a, bg, w) for c, im, a, w in zip(cams, images, alphas, weights)]
        rmesh = self.rasterizer.prepare(mesh)
        result = refine_texture(rmesh, views, self.field_cfg, self.refine_cfg, self.rasterizer, self.device)
        held = View(Camera(**obj["holdout_camera"]), obj["holdout"], obj["holdout_alpha"], bg)
        holdout_psnr = view_psnr(result.field, self.rasterizer, rmesh, held, self.refine_cfg.mask_threshold)
        tail = result.losses[-10:] if result.losses else [float("nan")]
        return {
            "uid": obj["meta"].get("uid", obj.get("__key__")),
            "psnr": holdout_psnr,
            "mse": 10.0 ** (-holdout_psnr / 10.0),
            "fit_psnr": psnr_from_mse(float(np.mean(tail))),
            "seconds": time.perf_counter() - t0,
            "field": result.field,
            "mesh": rmesh,
        }

    def _run(self, batch: dict, split: str) -> None:
        for i in range(len(batch["meta"])):
            r = self.fit_object(_object(batch, i))
            self.log(f"{split}/psnr", r["psnr"], batch_size=1, on_step=split == "train", on_epoch=True)
            self.log(f"{split}/loss", r["mse"], batch_size=1, on_step=False, on_epoch=True)
            self.log(f"{split}/fit_psnr", r["fit_psnr"], batch_size=1, on_step=False, on_epoch=True)
            self.log(f"{split}/seconds", r["seconds"], batch_size=1, on_step=False, on_epoch=True)
            self.results[split].append({k: r[k] for k in ("uid", "psnr", "fit_psnr", "seconds")})
            self.print(
                f"texture {split} {r['uid']}: held-out PSNR {r['psnr']:.2f} dB (fit {r['fit_psnr']:.2f} dB, "
                f"{r['seconds']:.1f} s)"
            )
            if split == "train" and len(self.exported) < self.export_objects and self.trainer.is_global_zero:
                self._export(r)

    def _export(self, r: dict) -> None:
        folder = Path(self.trainer.default_root_dir) / "meshes"
        baked = bake(r["field"], r["mesh"], self.bake_cfg, self.rasterizer)
        paths = {fmt: export_mesh(baked, folder / f"{r['uid']}.{fmt}") for fmt in self.export_formats}
        for path in paths.values():
            self.exported.append(path)
            self.print(f"texture: exported {path}")
        # one copy to the logger (W&B Object3D / run media): the GLB when exported, with its texture
        log_mesh(self.trainer, f"train/mesh_{r['uid']}", paths.get("glb", next(iter(paths.values()))))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._run(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._run(batch, "val")

    def metrics(self) -> dict[str, dict]:
        """Per split: objects fitted, held-out PSNR mean / min (dB) and mean seconds per object."""
        out = {}
        for split, rows in self.results.items():
            if rows:
                values = [r["psnr"] for r in rows]
                out[split] = {
                    "objects": len(rows),
                    "psnr_mean": float(np.mean(values)),
                    "psnr_min": float(np.min(values)),
                    "seconds_mean": float(np.mean([r["seconds"] for r in rows])),
                }
        return out

    def summary(self) -> str:
        parts = [
            f"{split}: {m['objects']} fits, held-out PSNR mean {m['psnr_mean']:.2f} dB (min {m['psnr_min']:.2f}), "
            f"{m['seconds_mean']:.1f} s per object"
            for split, m in self.metrics().items()
        ]
        return "; ".join(parts) or "no objects fitted"


def _settings_from_checkpoint(path: Path) -> TextureSettings:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, Mapping) or not {"field", "refine", "bake", "rasterizer"} <= set(hp):
        raise ValueError(f"{path} is not a texture-stage checkpoint (no field / refine / bake / rasterizer settings)")
    try:
        return TextureSettings(
            ColorFieldConfig(**dict(hp["field"] or {})),
            RefineConfig(**dict(hp["refine"] or {})),
            BakeConfig(**dict(hp["bake"] or {})),
            RasterizerConfig(**dict(hp["rasterizer"] or {})),
        )
    except TypeError as exc:
        raise ValueError(f"{path}: unreadable texture settings ({exc})") from exc


def export(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A run directory (its resolved ``config.yaml``) or a stage checkpoint -> export folder with ``config.json``
    (default ``RUN/export``; beside a checkpoint's run directory for a ``.ckpt``)."""
    run = Path(run)
    if run.is_dir():
        config = run / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{run} is not a texture run directory: {config} does not exist")
        settings = TextureSettings.from_stage_config(to_object(load_config(TextureStageConfig, config)))
        folder = run
    elif run.is_file():
        settings = _settings_from_checkpoint(run)
        folder = run_of_checkpoint(run)
    else:
        raise FileNotFoundError(f"no texture run directory or checkpoint at {run}")
    metrics = None
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
    return save_settings(settings, Path(out) if out is not None else folder / "export", metrics, str(run))


def load_stage_config(config_path=None, overrides=()) -> DictConfig:
    """The stage's config, checked as ``train`` runs it."""
    cfg = load_config(TextureStageConfig, config_path, overrides)
    check_stage_config(to_object(cfg))
    return cfg


def train(config_path=None, overrides=()) -> int:
    """``one2345pp train --stage texture``: fit every object of the shards, print the held-out PSNR, write
    ``RUN/metrics.json`` and the export folder ``RUN/export``."""
    cfg = load_stage_config(config_path, overrides)
    conf: TextureStageConfig = to_object(cfg)
    datamodule = TextureDataModule(conf.data)
    trainer, directory = fit("texture", cfg, lambda: TextureStage.from_config(conf), datamodule)
    module: TextureStage = trainer.lightning_module
    if trainer.is_global_zero:
        metrics = module.metrics()
        write_json(directory / "metrics.json", metrics)
        out = save_settings(TextureSettings.from_stage_config(conf), directory / "export", metrics, str(directory))
        print(f"texture stage: {module.summary()}; export in {out}")
    return 0
