"""The texture stage's export: the settings refining and baking one mesh needs (``config.json``), read by the
pipeline without training code, and :func:`texture_mesh`, which runs refinement and baking with them.

The export folder holds one ``config.json``::

    {"stage": "texture", "format_version": 1,
     "field": {...}, "refine": {...}, "bake": {...}, "rasterizer": {...},   # TextureSettings
     "metrics": {"train": {"objects", "psnr_mean", "psnr_min", "seconds_mean"}, "val": {...}},   # when known
     "source": "<run directory or checkpoint>"}
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError
from ..geometry.mesh import Mesh
from ..models.color_field import ColorFieldConfig
from ..models.color_field import check_config as check_field_config
from ..rendering.rasterizer import RasterizerConfig, make_rasterizer, resolve_backend
from ..utils.atomic import write_json
from .bake import BakeConfig, bake
from .bake import check_config as check_bake_config
from .export import TexturedMesh
from .refine import RefineConfig, RefineResult, View, refine_texture
from .refine import check_config as check_refine_config

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "SETTINGS_FILE",
    "TextureSettings",
    "load_settings",
    "save_settings",
    "texture_mesh",
]

EXPORT_FORMAT_VERSION = 1
SETTINGS_FILE = "config.json"


@dataclass
class TextureSettings:
    """What refining and baking one mesh needs: the stage's export (``config.json``) and the pipeline's input."""

    field: ColorFieldConfig = dataclasses.field(default_factory=ColorFieldConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    bake: BakeConfig = dataclasses.field(default_factory=BakeConfig)
    rasterizer: RasterizerConfig = dataclasses.field(default_factory=RasterizerConfig)

    @classmethod
    def from_stage_config(cls, cfg) -> TextureSettings:
        """The settings part of a texture-stage config (``TextureStageConfig``: field, refine, bake, rasterizer)."""
        return cls(cfg.field, cfg.refine, cfg.bake, cfg.rasterizer)

    def check(self) -> None:
        try:
            check_refine_config(self.refine)
            check_bake_config(self.bake)
            resolve_backend(self.rasterizer.backend, "cpu")
            check_field_config(self.field)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def save_settings(
    settings: TextureSettings, folder: str | os.PathLike, metrics: Mapping | None = None, source: str | None = None
) -> Path:
    """Write ``folder/config.json`` (atomically) with the settings, and the metrics / source when given."""
    settings.check()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict = {"stage": "texture", "format_version": EXPORT_FORMAT_VERSION, **asdict(settings)}
    if metrics:
        doc["metrics"] = dict(metrics)
    if source is not None:
        doc["source"] = str(source)
    write_json(folder / SETTINGS_FILE, doc)
    return folder


def load_settings(folder: str | os.PathLike) -> TextureSettings:
    """The :class:`TextureSettings` of an export folder (or of a ``config.json`` path)."""
    path = Path(folder)
    path = path / SETTINGS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"texture export not found: {path} (write one with `one2345pp export --stage texture`)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    stage = doc.get("stage") if isinstance(doc, dict) else None
    if stage != "texture":
        raise ValueError(f"{path}: not a texture-stage export (its 'stage' is {stage!r}, expected 'texture')")
    if doc.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {doc.get('format_version')!r} is not supported (expected {EXPORT_FORMAT_VERSION})"
        )
    body = {k: doc[k] for k in ("field", "refine", "bake", "rasterizer") if k in doc}
    try:
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextureSettings), body))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    settings.check()
    return settings


def texture_mesh(
    mesh: Mesh,
    views: list[View],
    settings: TextureSettings | None = None,
    device: torch.device | str | None = None,
) -> tuple[TexturedMesh, RefineResult]:
    """Refine a colour field on the fixed ``mesh`` against ``views`` and bake it (what the pipeline runs)."""
    settings = settings if settings is not None else TextureSettings()
    settings.check()
    device = torch.device(device) if device is not None else torch.device("cpu")
    rasterizer = make_rasterizer(settings.rasterizer.backend, device, settings.rasterizer.threads)
    rmesh = rasterizer.prepare(mesh)
    result = refine_texture(rmesh, views, settings.field, settings.refine, rasterizer, device)
    return bake(result.field, rmesh, settings.bake, rasterizer), result
