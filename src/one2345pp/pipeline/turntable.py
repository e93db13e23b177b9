"""A strip of renders around a generated mesh (``turntable.png`` of ``one2345pp infer``).

Views at ``views`` evenly spaced azimuths starting at the input view's (azimuth 0), one elevation, the camera
distance and field of view of the pipeline's layout (so the object fills the frame as in the generated views),
rendered with the project's CPU ray caster (:class:`~one2345pp.rendering.raycast.RaycastRenderer`: UV textures,
Lambert + ambient under a world-fixed light, gray background) and concatenated left to right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cameras import Camera
from ..rendering import RaycastRenderer, RenderConfig


@dataclass
class TurntableConfig:
    views: int = 8  # azimuths, every 360 / views degrees from the input view's
    elevation_deg: float = 20.0
    size: int = 256  # pixels per view (square)
    supersample: int = 2  # s x s rays at silhouettes and edges (1: off)


def check_config(cfg: TurntableConfig) -> None:
    if cfg.views < 1 or cfg.size < 8 or cfg.supersample < 1 or not -90 < cfg.elevation_deg < 90:
        raise ValueError(
            f"turntable: views must be >= 1, size >= 8, supersample >= 1 and elevation_deg in (-90, 90), got "
            f"views={cfg.views} size={cfg.size} supersample={cfg.supersample} elevation_deg={cfg.elevation_deg}"
        )


def turntable_cameras(cfg: TurntableConfig, distance: float, fov_deg: float) -> list[Camera]:
    step = 360.0 / cfg.views
    return [Camera(i * step, cfg.elevation_deg, distance, fov_deg, cfg.size, cfg.size) for i in range(cfg.views)]


def render_turntable(mesh, cfg: TurntableConfig, distance: float, fov_deg: float) -> np.ndarray:
    """uint8 RGB ``[size, views * size, 3]`` of ``mesh`` (a :class:`~one2345pp.geometry.mesh.Mesh` or a
    :class:`~one2345pp.texture.export.TexturedMesh`)."""
    check_config(cfg)
    if hasattr(mesh, "to_mesh"):
        mesh = mesh.to_mesh()
    renderer = RaycastRenderer(RenderConfig(background="gray", supersample=cfg.supersample))
    frames = [r.composite() for r in renderer.render_many(mesh, turntable_cameras(cfg, distance, fov_deg))]
    return np.round(np.clip(np.concatenate(frames, axis=1), 0.0, 1.0) * 255).astype(np.uint8)
