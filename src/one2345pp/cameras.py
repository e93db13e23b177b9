"""Cameras: the single source of truth for poses, intrinsics, view layouts and the 3x2 tiling.

Conventions (every other module goes through this one):

* World frame: right-handed, +Z up, the object centred at the origin inside the volume cube [-0.5, 0.5]^3.
* A camera at azimuth ``az``, elevation ``el`` and distance ``d`` sits at
  ``d * (cos(el) cos(az), cos(el) sin(az), sin(el))``, looks at the origin, with world up +Z.
* Camera-to-world matrices (``c2w``) use the OpenCV convention: camera x right, y down, z forward (into the scene).
  To get the OpenGL / Blender convention (x right, y up, z backward) flip the y and z camera axes:
  ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)`` (see :func:`opencv_to_opengl`; the same matrix converts back).
* Pixels: ``(u, v)`` with u to the right and v down, the centre of pixel ``(i, j)`` (column i, row j) at
  ``(i + 0.5, j + 0.5)``. The field of view spans the image width; pixels are square, so for the square views
  of the method it spans the height too.
* Layouts: the six target views of the multi-view stage. Azimuths are relative to the condition view's azimuth,
  elevations are absolute (METHOD.md, stage 1). The tiled grid has 3 rows x 2 columns, row-major:
  (az+30, az+90) / (az+150, az+210) / (az+270, az+330).
* Camera distance is not fixed by the method. By default (``distance=None`` in configs) it is chosen so that the
  bounding sphere of the normalisation cube (side ``normalize_extent``) just fits the field of view:
  ``d = extent * sqrt(3) / 2 / sin(fov / 2)`` (see :func:`framing_distance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LAYOUTS",
    "Camera",
    "Layout",
    "camera_position",
    "framing_distance",
    "get_layout",
    "intrinsics",
    "look_at_c2w",
    "multiview_cameras",
    "opencv_to_opengl",
    "tile",
    "untile",
]

GRID_ROWS = 3
GRID_COLS = 2
NUM_VIEWS = GRID_ROWS * GRID_COLS


@dataclass(frozen=True)
class Layout:
    """The six target views of the multi-view stage."""

    name: str
    azimuth_offsets_deg: tuple[float, ...]  # relative to the condition view
    elevations_deg: tuple[float, ...]  # absolute
    fov_deg: float


LAYOUTS: dict[str, Layout] = {
    "zero123pp-v1.2": Layout(
        "zero123pp-v1.2", (30.0, 90.0, 150.0, 210.0, 270.0, 330.0), (20.0, -10.0, 20.0, -10.0, 20.0, -10.0), 30.0
    ),
    "zero123pp-v1.1": Layout(
        "zero123pp-v1.1",
        (30.0, 90.0, 150.0, 210.0, 270.0, 330.0),
        (30.0, -20.0, 30.0, -20.0, 30.0, -20.0),
        math.degrees(2.0 * math.atan(16.0 / 35.0)),
    ),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown camera layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}") from None


def camera_position(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def look_at_c2w(position: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world matrix of a camera at ``position`` looking at ``target`` (x right, y down, z forward)."""
    position = np.asarray(position, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - position
    norm = np.linalg.norm(forward)
    if norm == 0:
        raise ValueError("camera position coincides with its target")
    forward /= norm
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    rnorm = np.linalg.norm(right)
    if rnorm < 1e-9:
        raise ValueError(f"camera at {position.tolist()} looks along the up axis; elevation must lie in (-90, 90)")
    right /= rnorm
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, position
    return c2w


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Convert a camera-to-world matrix between the OpenCV and OpenGL/Blender conventions (an involution)."""
    return np.asarray(c2w) @ np.diag([1.0, -1.0, -1.0, 1.0])


def intrinsics(fov_deg: float, width: int, height: int) -> np.ndarray:
    """Pinhole intrinsics ``K`` for a horizontal field of view ``fov_deg`` and square pixels."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"field of view must lie in (0, 180) degrees, got {fov_deg}")
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def framing_distance(fov_deg: float, extent: float) -> float:
    """Distance at which the bounding sphere of a cube of side ``extent`` exactly fills the field of view."""
    return extent * math.sqrt(3.0) / 2.0 / math.sin(math.radians(fov_deg) / 2.0)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera on the viewing sphere, looking at the origin."""

    azimuth_deg: float
    elevation_deg: float
    distance: float
    fov_deg: float
    width: int
    height: int

    @property
    def position(self) -> np.ndarray:
        return camera_position(self.azimuth_deg, self.elevation_deg, self.distance)

    @property
    def c2w(self) -> np.ndarray:
        return look_at_c2w(self.position)

    @property
    def w2c(self) -> np.ndarray:
        return np.linalg.inv(self.c2w)

    @property
    def K(self) -> np.ndarray:  # noqa: N802 - the usual name
        return intrinsics(self.fov_deg, self.width, self.height)

    def to_dict(self) -> dict:
        """The ``CAM`` record of ``cams.json``."""
        return {
            "azimuth_deg": float(self.azimuth_deg),
            "elevation_deg": float(self.elevation_deg),
            "distance": float(self.distance),
            "c2w": self.c2w.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict, fov_deg: float, resolution: int | Sequence[int]) -> Camera:
        w, h = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        return cls(float(d["azimuth_deg"]), float(d["elevation_deg"]), float(d["distance"]), float(fov_deg), w, h)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [..., 3] -> pixel coordinates [..., 2] (u right, v down) and camera depth [...] (z forward)."""
        pts = np.asarray(points, dtype=np.float64)
        w2c = self.w2c
        cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[..., 2]
        K = self.K
        with np.errstate(divide="ignore", invalid="ignore"):
            u = K[0, 0] * cam[..., 0] / z + K[0, 2]
            v = K[1, 1] * cam[..., 1] / z + K[1, 2]
        return np.stack([u, v], axis=-1), z

    def rays(self, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins and unit directions [H*s, W*s, 3] through the centres of the (sub-)pixels."""
        s = int(supersample)
        u = (np.arange(self.width * s) + 0.5) / s
        v = (np.arange(self.height * s) + 0.5) / s
        uu, vv = np.meshgrid(u, v)
        return self.rays_at(np.stack([uu, vv], axis=-1))

    def rays_at(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins and unit directions for pixel coordinates [..., 2] (continuous, u right, v down)."""
        K = self.K
        pixels = np.asarray(pixels, dtype=np.float64)
        d_cam = np.stack(
            [(pixels[..., 0] - K[0, 2]) / K[0, 0], (pixels[..., 1] - K[1, 2]) / K[1, 1], np.ones(pixels.shape[:-1])],
            axis=-1,
        )
        c2w = self.c2w
        d = d_cam @ c2w[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        o = np.broadcast_to(c2w[:3, 3], d.shape)
        return o, d


def multiview_cameras(
    cond_azimuth_deg: float, layout: str | Layout, distance: float, resolution: int = 320
) -> list[Camera]:
    """The six target cameras for a condition view at ``cond_azimuth_deg``, in tiling order."""
    lay = get_layout(layout) if isinstance(layout, str) else layout
    return [
        Camera((cond_azimuth_deg + da) % 360.0, el, distance, lay.fov_deg, resolution, resolution)
        for da, el in zip(lay.azimuth_offsets_deg, lay.elevations_deg, strict=True)
    ]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def tile(views):
    """Six views -> one 3-row x 2-column grid, row-major.

    numpy: ``[6, H, W, C]`` (or a list of six ``[H, W, C]``) -> ``[3H, 2W, C]``.
    torch: ``[..., 6, C, H, W]`` -> ``[..., C, 3H, 2W]``.
    """
    if _is_torch(views):
        if views.shape[-4] != NUM_VIEWS:
            raise ValueError(f"tile expects {NUM_VIEWS} views on dim -4, got shape {tuple(views.shape)}")
        *lead, _, c, h, w = views.shape
        x = views.reshape(*lead, GRID_ROWS, GRID_COLS, c, h, w)
        x = x.movedim(-3, -5)  # [..., C, R, Cols, H, W]
        x = x.movedim(-2, -3)  # [..., C, R, H, Cols, W]
        return x.reshape(*lead, c, GRID_ROWS * h, GRID_COLS * w)
    arr = np.stack(list(views)) if not isinstance(views, np.ndarray) else views
    if arr.shape[0] != NUM_VIEWS:
        raise ValueError(f"tile expects {NUM_VIEWS} views, got {arr.shape[0]}")
    _, h, w = arr.shape[:3]
    rest = arr.shape[3:]
    x = arr.reshape(GRID_ROWS, GRID_COLS, h, w, *rest).swapaxes(1, 2)
    return x.reshape(GRID_ROWS * h, GRID_COLS * w, *rest)


def untile(grid):
    """Inverse of :func:`tile`.

    numpy: ``[3H, 2W, C]`` -> ``[6, H, W, C]``; torch: ``[..., C, 3H, 2W]`` -> ``[..., 6, C, H, W]``.
    """
    if _is_torch(grid):
        *lead, c, gh, gw = grid.shape
        if gh % GRID_ROWS or gw % GRID_COLS:
            raise ValueError(f"grid of size {gh}x{gw} is not divisible into {GRID_ROWS}x{GRID_COLS} views")
        h, w = gh // GRID_ROWS, gw // GRID_COLS
        x = grid.reshape(*lead, c, GRID_ROWS, h, GRID_COLS, w)
        x = x.movedim(-2, -3)  # [..., C, R, Cols, H, W]
        x = x.movedim(-5, -3)  # [..., R, Cols, C, H, W]
        return x.reshape(*lead, NUM_VIEWS, c, h, w)
    arr = np.asarray(grid)
    gh, gw = arr.shape[:2]
    if gh % GRID_ROWS or gw % GRID_COLS:
        raise ValueError(f"grid of size {gh}x{gw} is not divisible into {GRID_ROWS}x{GRID_COLS} views")
    h, w = gh // GRID_ROWS, gw // GRID_COLS
    rest = arr.shape[2:]
    x = arr.reshape(GRID_ROWS, h, GRID_COLS, w, *rest).swapaxes(1, 2)
    return x.reshape(NUM_VIEWS, h, w, *rest)
