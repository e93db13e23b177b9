"""Images and meshes a stage shows people: saved in the run directory and sent to the run's logger (rank 0 only).

- ``log_image``: ``RUN/media/<key>/step<N>.png``; W&B ``log_image``, TensorBoard ``add_image``; CSV runs keep the file.
- ``log_mesh``: ``RUN/media/<key>/step<N>.glb`` (or the given file's suffix); W&B ``wandb.Object3D`` (GLB/glTF/OBJ/STL
  as they are; PLY/OFF converted to a GLB beside the copy), TensorBoard ``add_mesh`` (vertices, faces, colours); CSV
  runs keep the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..geometry.gltf import gltf_bytes
from ..geometry.mesh_io import load_mesh
from ..utils.atomic import atomic_file, write_bytes, write_png


def _rank_zero(trainer) -> bool:
    return trainer is None or bool(getattr(trainer, "is_global_zero", True))


def _is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def _media_path(trainer, key: str, step: int, suffix: str) -> Path:
    root = Path(getattr(trainer, "default_root_dir", None) or ".")
    folder = root / "media" / key.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"step{step:07d}{suffix}"


def as_uint8_image(image) -> np.ndarray:
    """HWC uint8 from an HWC/CHW array or tensor in [0, 1] (float) or [0, 255] (uint8)."""
    a = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.uint8(np.clip(np.round(a * 255.0), 0, 255))
    if a.ndim not in (2, 3):
        raise ValueError(f"an image must be HW, HWC or CHW, got shape {a.shape}")
    return a


def log_image(trainer, key: str, image, step: int | None = None) -> Path | None:
    """Save ``image`` under the run directory and log it; returns the PNG path (None on ranks other than 0)."""
    if not _rank_zero(trainer):
        return None
    step = int(getattr(trainer, "global_step", 0) if step is None else step)
    img = as_uint8_image(image)
    path = _media_path(trainer, key, step, ".png")
    write_png(path, img)
    for logger in getattr(trainer, "loggers", []) or []:
        if _is_wandb(logger):
            logger.log_image(key=key, images=[img], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(key, img, step, dataformats="HWC" if img.ndim == 3 else "HW")
    return path


WANDB_3D_SUFFIXES = (".glb", ".gltf", ".obj", ".stl")  # files wandb.Object3D takes as they are


def _as_glb(path: Path) -> Path:
    """A GLB copy of a mesh file (vertex colours kept) beside it, for viewers that do not read its format: read
    with the project's loader (+Z up) and written in glTF's convention (+Y up, linear vertex colours), so that the
    viewer shows it upright in its colours."""
    out = path.with_suffix(".glb")
    return write_bytes(out, gltf_bytes(load_mesh(path)))


def log_mesh(trainer, key: str, mesh_file: str | os.PathLike, step: int | None = None) -> Path | None:
    """Copy a mesh file (GLB/OBJ/PLY) under the run directory and log it as a 3D object."""
    if not _rank_zero(trainer):
        return None
    step = int(getattr(trainer, "global_step", 0) if step is None else step)
    src = Path(mesh_file)
    if not src.is_file():
        raise FileNotFoundError(f"mesh to log does not exist: {src}")
    path = _media_path(trainer, key, step, src.suffix.lower())
    with atomic_file(path) as tmp:
        shutil.copyfile(src, tmp)
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if _is_wandb(logger):
            import wandb

            shown = path if path.suffix in WANDB_3D_SUFFIXES else _as_glb(path)
            experiment.log({key: wandb.Object3D(str(shown)), "trainer/global_step": step})
        elif hasattr(experiment, "add_mesh"):  # TensorBoard
            import trimesh

            tm = trimesh.load(path, force="mesh")
            colors = getattr(tm.visual, "vertex_colors", None)
            experiment.add_mesh(
                key,
                vertices=np.asarray(tm.vertices, np.float32)[None],
                faces=np.asarray(tm.faces, np.int32)[None],
                colors=None if colors is None else np.asarray(colors, np.uint8)[None, :, :3],
                global_step=step,
            )
    return path
