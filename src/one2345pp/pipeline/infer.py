"""``one2345pp infer IMAGE [IMAGE ...] --pipeline DIR --out DIR [--seed N] [key=value ...]``: images -> meshes.

Per image ``OUT/<image stem>/``:

* ``mesh.glb`` -- the textured mesh (:func:`one2345pp.texture.export.save_glb`; vertex colours with ``refine=false``),
  in the normalised frame (inside [-0.5, 0.5]^3), written in glTF's convention (+Y up in the file, linear vertex
  colours), which :func:`one2345pp.geometry.mesh_io.load_mesh` and glTF viewers show upright, +Z up;
* ``views.png`` -- the six generated views as the 3x2 grid;
* ``turntable.png`` -- renders around the mesh (:mod:`one2345pp.pipeline.turntable`);
* ``result.json`` -- ``status`` ("ok" / "failed"), ``reason`` (failures), the image, the seed, the pipeline folder,
  seconds per stage (``timings``: the pipeline's stages, ``turntable``, ``write``), the parameters that ran
  (``run``), the full pipeline / texture / turntable settings, mesh sizes and package versions.

The outputs of one image are written into a temporary folder beside ``OUT/<stem>`` and renamed when complete. An
image whose four outputs exist with status "ok" is skipped unless ``overwrite``; a failed image (bad file, empty
coarse volume, ...) gets a ``result.json`` with status "failed" and its reason, a line on stderr, and the others go
on; a failed rerun of a finished image keeps its previous outputs.

Overrides (``key=value``): :class:`~one2345pp.pipeline.one2345.PipelineSettings` keys as they are
(``num_inference_steps=50 guidance_scale=3 coarse_steps=20 refine=false preprocess.fill=0.6``), texture settings under
``texture.`` (``texture.refine.iterations=100 texture.bake.texture_size=512``) and turntable settings under
``turntable.`` (``turntable.views=12 turntable.size=128``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ..cameras import get_layout
from ..config import ConfigError, parse_overrides
from ..texture.export import save_glb
from ..texture.settings import TextureSettings
from ..utils.atomic import atomic_folder, write_json, write_png
from ..utils.timing import timed
from .one2345 import One2345PPPipeline, PipelineSettings, read_index
from .turntable import TurntableConfig, render_turntable
from .turntable import check_config as check_turntable

OUTPUTS = ("mesh.glb", "views.png", "turntable.png", "result.json")
RESULT = "result.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VERSIONED = ("one2345pp", "torch", "diffusers", "transformers", "numpy", "open3d", "trimesh")


@dataclass
class InferOptions:
    """Settings of one ``infer`` job: the pipeline's (with overrides), texture, turntable."""

    settings: object  # PipelineSettings
    texture: object  # TextureSettings
    turntable: TurntableConfig


@dataclass
class ImageResult:
    image: str
    stem: str
    status: str  # "ok", "skipped", "failed"
    reason: str | None = None
    out_dir: Path | None = None


def expand_inputs(items) -> list[Path]:
    """Image paths; a folder stands for its images (sorted, by suffix). Missing paths stay (they fail per image)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {p}")
            out += found
        else:
            out.append(p)
    stems: dict[str, Path] = {}
    for p in out:
        if p.stem in stems and stems[p.stem] != p:
            raise ValueError(f"two inputs share the output name {p.stem!r}: {stems[p.stem]} and {p}; rename one")
        stems[p.stem] = p
    return list(dict.fromkeys(out))


def _merge(base, keys: dict, what: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), keys))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override rejected ({what}): {exc}") from exc


def apply_overrides(settings, texture, overrides) -> InferOptions:
    """Split ``key=value`` overrides into pipeline settings, ``texture.*`` and ``turntable.*`` (each checked)."""
    given = OmegaConf.to_container(parse_overrides(list(overrides))) if overrides else {}
    tex_keys, turn_keys = given.pop("texture", {}), given.pop("turntable", {})
    options = InferOptions(
        _merge(settings, given, "pipeline settings"),
        _merge(texture, tex_keys or {}, "texture."),
        _merge(TurntableConfig(), turn_keys or {}, "turntable."),
    )
    try:
        options.settings.check()
        check_turntable(options.turntable)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    options.texture.check()
    return options


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_device(device: str | None) -> str:
    """``device`` checked (ValueError for an unknown name or a CUDA device this machine lacks); None: CUDA when
    available, else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc})") from exc
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return str(dev)


def finished(folder: Path) -> bool:
    """Whether ``folder`` holds the four outputs of a successful run."""
    if not all((folder / name).is_file() for name in OUTPUTS):
        return False
    try:
        return json.loads((folder / RESULT).read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def run_image(pipe, image: Path, folder: Path, options: InferOptions, seed: int, record: dict) -> dict:
    """Run the pipeline on one image and write its four outputs into ``folder`` (temporary folder, renamed)."""
    out = pipe(image, seed=seed)
    with atomic_folder(folder) as tmp:
        s = options.settings
        timings = dict(out.timings)
        with timed(timings, "turntable"):
            strip = render_turntable(out.mesh, options.turntable, s.camera_distance, get_layout(s.layout).fov_deg)
        with timed(timings, "write"):
            save_glb(out.mesh, tmp / "mesh.glb")
            write_png(tmp / "views.png", out.grid)
            write_png(tmp / "turntable.png", strip)
        doc = {
            **record,
            "status": "ok",
            "reason": None,
            "timings": timings,
            "run": out.settings,
            "mesh": {
                "vertices": int(out.mesh.num_vertices),
                "faces": int(out.mesh.num_faces),
                "textured": bool(out.mesh.textured),
                "raw_vertices": int(out.mesh_raw.num_vertices),
                "raw_faces": int(out.mesh_raw.num_faces),
                "coarse_occupied_cells": int(out.coarse_occupancy.sum()),
            },
            "outputs": list(OUTPUTS),
        }
        write_json(tmp / RESULT, doc, default=str)
    return doc


def infer_images(
    images,
    pipeline_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overrides=(),
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    stream=None,
) -> list[ImageResult]:
    """The ``infer`` job (see the module doc); returns one :class:`ImageResult` per image. ``device``: None picks
    CUDA when available, else the CPU. Bad overrides, a
    missing or broken pipeline folder and clashing output names raise before any image is run."""
    stream = stream if stream is not None else sys.stderr
    paths = expand_inputs(images)
    if not paths:
        raise ValueError("no input images")
    pipeline_dir = Path(pipeline_dir)
    read_index(pipeline_dir)
    device = check_device(device)

    apply_overrides(PipelineSettings(), TextureSettings(), overrides)  # bad keys fail before loading anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe = options = None
    results: list[ImageResult] = []
    bar = tqdm(paths, desc="infer", unit="image", disable=not progress, file=stream)
    for path in bar:
        folder = out_dir / path.stem
        bar.set_postfix_str(path.name)
        if not overwrite and finished(folder):
            results.append(ImageResult(str(path), path.stem, "skipped", out_dir=folder))
            continue
        if pipe is None:  # loaded only when some image needs it
            pipe = One2345PPPipeline.from_pretrained(pipeline_dir, device=device)
            options = apply_overrides(pipe.settings, pipe.texture, overrides)
            pipe.settings, pipe.texture = options.settings, options.texture
        record = {
            "image": str(path),
            "seed": int(seed),
            "pipeline": str(pipeline_dir.resolve()),
            "device": str(pipe.device),
            "settings": dataclasses.asdict(options.settings),
            "texture": dataclasses.asdict(options.texture),
            "turntable": dataclasses.asdict(options.turntable),
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            run_image(pipe, path, folder, options, seed, record)
            results.append(ImageResult(str(path), path.stem, "ok", out_dir=folder))
        except Exception as exc:  # one bad image is recorded and the job goes on
            reason = f"{type(exc).__name__}: {exc}"
            kept = folder.is_dir() and finished(folder)
            if not kept:
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / RESULT, {**record, "status": "failed", "reason": reason}, default=str)
            note = " (previous outputs kept)" if kept else ""
            tqdm.write(f"failed: {path}: {reason}{note}", file=stream)
            results.append(ImageResult(str(path), path.stem, "failed", reason, folder))
    return results


def summary(results: list[ImageResult]) -> str:
    counts = {k: sum(r.status == k for r in results) for k in ("ok", "skipped", "failed")}
    return f"{counts['ok']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed"
