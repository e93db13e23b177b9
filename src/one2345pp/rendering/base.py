"""Backend-neutral rendering interface: what a renderer returns, the light it shades with, and the base class.

Every backend (the CPU ray caster here, a GPU rasteriser later) implements :class:`Renderer` and returns a
:class:`RenderOutput` with the same conventions:

* ``rgba`` float32 [H, W, 4], *straight* (non-premultiplied) alpha in [0, 1]. Pixels with alpha 0 hold the
  background colour; anti-aliased edge pixels have fractional alpha and an unpremultiplied colour.
* ``depth`` float32 [H, W]: camera z-depth along the OpenCV forward axis, 0 where nothing was hit.
* ``normals`` float32 [H, W, 3]: world-space unit shading normals facing the camera, 0 where empty.
* ``face_ids`` int64 [H, W]: the triangle seen through the pixel centre, -1 where empty.

Shading is Lambert + ambient under one world-fixed directional light:
``rgb = albedo * (ambient + diffuse * max(0, n . l))`` with ``l`` the unit direction *towards* the light.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..cameras import Camera, camera_position
from ..geometry.mesh import Mesh

__all__ = [
    "BACKGROUNDS",
    "Light",
    "RenderConfig",
    "RenderOutput",
    "Renderer",
    "background_color",
    "light_from_config",
]

BACKGROUNDS: dict[str, float] = {"gray": 0.5, "white": 1.0}


@dataclass
class RenderConfig:
    background: str = "gray"  # "gray" (0.5) or "white"; RGBA outputs keep alpha either way
    supersample: int = 3  # s x s samples at silhouette and triangle-edge pixels (adaptive anti-aliasing); 1 = off
    ambient: float = 0.45  # Lambert + ambient: albedo * (ambient + diffuse * max(0, n.l))
    diffuse: float = 0.55
    light_azimuth_deg: float = 45.0  # a world-fixed directional light, so all views of an object agree
    light_elevation_deg: float = 55.0
    random_lighting: bool = False  # per object: random light direction (upper hemisphere) and ambient in [0.3, 0.6]
    threads: int = 0  # open3d ray-casting threads, 0 = all (the shard builder sets 1 per worker process)
    # single-sided glTF materials: False draws the back of their faces too, as Blender's Cycles does (the reference
    # the renderings follow, and what the occupancy volume holds); True culls them as a real-time glTF viewer does
    cull_back_faces: bool = False


def background_color(background: str | float | Sequence[float]) -> np.ndarray:
    """RGB float32 [3] of a background: a name ("gray" = 0.5, "white" = 1.0), a grey level or an RGB triple."""
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; expected one of {', '.join(sorted(BACKGROUNDS))}")
        return np.full(3, BACKGROUNDS[background], dtype=np.float32)
    arr = np.asarray(background, dtype=np.float32).reshape(-1)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3)
    if arr.shape[0] != 3 or not np.isfinite(arr).all():
        raise ValueError(f"background must be a name, a grey level or an RGB triple, got {background!r}")
    return arr


@dataclass
class Light:
    """A directional light: unit world-space ``direction`` towards the light, ambient and diffuse weights."""

    direction: np.ndarray
    ambient: float = 0.45
    diffuse: float = 0.55

    def __post_init__(self):
        d = np.asarray(self.direction, dtype=np.float64).reshape(3)
        norm = float(np.linalg.norm(d))
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError(f"light direction must be a non-zero finite vector, got {self.direction!r}")
        self.direction = d / norm
        self.ambient = float(self.ambient)
        self.diffuse = float(self.diffuse)


def light_from_config(cfg: RenderConfig, rng: np.random.Generator | None = None) -> Light:
    """The light of ``cfg``: fixed (``light_azimuth_deg`` / ``light_elevation_deg``, ``ambient`` / ``diffuse``), or,
    with ``cfg.random_lighting``, a direction uniform on the upper hemisphere and ambient uniform in [0.3, 0.6]
    (diffuse = 1 - ambient) drawn from ``rng``."""
    if not cfg.random_lighting:
        direction = camera_position(cfg.light_azimuth_deg, cfg.light_elevation_deg, 1.0)
        return Light(direction, cfg.ambient, cfg.diffuse)
    if rng is None:
        raise ValueError("random_lighting draws the light per object: pass an np.random.Generator")
    z = rng.uniform(0.0, 1.0)  # uniform z on [0, 1] is uniform over the hemisphere's area
    phi = rng.uniform(0.0, 2.0 * math.pi)
    rho = math.sqrt(max(0.0, 1.0 - z * z))
    ambient = float(rng.uniform(0.3, 0.6))
    return Light(np.array([rho * math.cos(phi), rho * math.sin(phi), z]), ambient, 1.0 - ambient)


@dataclass
class RenderOutput:
    """One rendered view (see the module docstring for the conventions of each field)."""

    rgba: np.ndarray  # float32 [H, W, 4], straight alpha
    depth: np.ndarray  # float32 [H, W], 0 = empty
    normals: np.ndarray  # float32 [H, W, 3], 0 = empty
    face_ids: np.ndarray  # int64 [H, W], -1 = empty
    background: np.ndarray = field(default_factory=lambda: background_color("gray"))  # RGB of alpha-0 pixels

    @property
    def alpha(self) -> np.ndarray:
        return self.rgba[..., 3]

    @property
    def mask(self) -> np.ndarray:
        """Pixels whose centre sees the surface."""
        return self.face_ids >= 0

    def composite(self, background: str | float | Sequence[float] | None = None) -> np.ndarray:
        """RGB float32 [H, W, 3] over a background colour (default: the one the view was rendered with)."""
        bg = self.background if background is None else background_color(background)
        a = self.rgba[..., 3:4]
        return (self.rgba[..., :3] * a + bg * (1.0 - a)).astype(np.float32)

    def to_uint8_rgba(self) -> np.ndarray:
        """uint8 [H, W, 4] (rounded, straight alpha)."""
        return np.round(np.clip(self.rgba, 0.0, 1.0) * 255.0).astype(np.uint8)


class Renderer(abc.ABC):
    """A renderer of meshes through :class:`~one2345pp.cameras.Camera` s."""

    @abc.abstractmethod
    def render(self, mesh: Mesh, camera: Camera, light: Light | None = None) -> RenderOutput:
        """Render one view of ``mesh`` (``light=None``: the renderer's configured light)."""

    def render_many(self, mesh: Mesh, cameras: Sequence[Camera], light: Light | None = None) -> list[RenderOutput]:
        """Render several views of one mesh under one light."""
        return [self.render(mesh, cam, light) for cam in cameras]
