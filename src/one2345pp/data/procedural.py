"""Procedural objects: the embedded default dataset (no downloads needed).

Object ``index`` of a seed is a pure function of ``(seed, index)``: every random draw comes from
``np.random.default_rng([seed, index])``, so objects can be generated in any order, by any worker, bit-identically.

An object is one part (box, sphere, cylinder, cone, torus, capsule, extrusion) or a ``union`` of 2..max_parts
overlapping parts (plain concatenation; internal faces are left to the SDF code). Each part is a parametric surface
built here from (u, v) grids with its own natural UVs: seams are split so UVs are continuous within every face, and
closed surfaces are watertight in geometry (caps closed, poles collapsed to one position; vertices are duplicated
along seams). Faces wind counter-clockwise seen from outside. Each part gets a random non-uniform scale and rotation,
the whole object another (uniformly random, or about +Z only with ``procedural.orientation=upright``), and one of
three colour modes: a flat base colour, smooth vertex colours, or a procedural texture (checker, stripes, fbm value
noise, random colour cells). A union never mixes vertex colours with textures (an OBJ file cannot hold both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry.mesh import Material, Mesh, concatenate
from .config import ProceduralConfig

FAMILIES = ("box", "sphere", "cylinder", "cone", "torus", "capsule", "extrusion", "union")
PRIMITIVE_FAMILIES = tuple(f for f in FAMILIES if f != "union")
COLOR_MODES = ("flat", "vertex", "texture")
TEXTURE_PATTERNS = ("checker", "stripes", "fbm", "cells")

N_AROUND = 48  # segments around every surface of revolution
ROW_SPACING = 0.06  # target length of the rows along straight sides (so vertex colours vary smoothly)
_UV_PAD = 0.02  # margin around each atlas region so bilinear lookups do not bleed between regions
# "any": uniformly random rotations (no object has an up); "upright": rotations about +Z only (every part stands on its
# own axis: cylinders and cones upright, tori flat, boxes level)
ORIENTATIONS = ("any", "upright")
# independent scale factors per axis: of each part (before its rotation) and of the whole object (after it)
PART_AXIS_SCALE = (0.7, 1.3)
OBJECT_AXIS_SCALE = (0.85, 1.15)


def _rows(length: float, lo: int = 2, hi: int = 16) -> int:
    return int(np.clip(np.ceil(length / ROW_SPACING), lo, hi))


def object_uid(seed: int, index: int) -> str:
    """The uid of object ``index`` of ``seed``: no dots, sorts by index."""
    return f"proc-{seed:04d}-{index:06d}"


@dataclass
class ProceduralObject:
    uid: str
    mesh: Mesh
    family: str
    description: dict[str, Any]  # JSON-serialisable: parameters of every part, transforms, colours


@dataclass
class Surface:
    """A tessellated parametric surface: vertices [V, 3], faces [F, 3] (CCW from outside), per-vertex uvs [V, 2]."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray


# --- surface builders ---------------------------------------------------------------------------------------------


def _grid_faces(rows: int, cols: int, pole_first: bool = False, pole_last: bool = False) -> np.ndarray:
    """Two triangles per quad of a row-major vertex grid (u along columns, v along rows), CCW in the (u, v) plane.

    A collapsed first/last row (a pole) keeps only the non-degenerate triangle of each of its quads.
    """
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = r * cols + c
    t1 = np.stack([a, a + 1, a + cols + 1], axis=-1)  # (u, v) -> (u+, v) -> (u+, v+)
    t2 = np.stack([a, a + cols + 1, a + cols], axis=-1)  # (u, v) -> (u+, v+) -> (u, v+)
    keep1 = np.ones(t1.shape[:2], bool)
    keep2 = np.ones(t2.shape[:2], bool)
    if pole_first:
        keep1[0] = False
    if pole_last:
        keep2[-1] = False
    return np.concatenate([t1[keep1], t2[keep2]]).astype(np.int64)


def _compact(surface: Surface) -> Surface:
    used, inverse = np.unique(surface.faces, return_inverse=True)
    return Surface(surface.vertices[used], inverse.reshape(-1, 3), surface.uvs[used])


def _merge(surfaces: list[Surface]) -> Surface:
    offsets = np.cumsum([0] + [len(s.vertices) for s in surfaces[:-1]])
    return Surface(
        np.concatenate([s.vertices for s in surfaces]),
        np.concatenate([s.faces + o for s, o in zip(surfaces, offsets)]),
        np.concatenate([s.uvs for s in surfaces]),
    )


def _to_rect(uv: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
    """Map uvs in [0, 1]^2 into the atlas rectangle (u0, v0, u1, v1), keeping a small margin."""
    u0, v0, u1, v1 = rect
    uv = _UV_PAD + (1 - 2 * _UV_PAD) * uv
    return np.stack([u0 + (u1 - u0) * uv[:, 0], v0 + (v1 - v0) * uv[:, 1]], axis=-1)


def _planar_uv(vertices: np.ndarray, radius: float, rect: tuple, mirror: bool) -> np.ndarray:
    """Top-view projection of a cap (x right, y up; mirrored for caps seen from below) into an atlas rectangle."""
    y = -vertices[:, 1] if mirror else vertices[:, 1]
    return _to_rect(0.5 + 0.5 * np.stack([vertices[:, 0], y], axis=-1) / radius, rect)


def _revolve(rho: np.ndarray, z: np.ndarray, n_u: int = N_AROUND) -> Surface:
    """Sweep the profile (rho_k, z_k) around +z; u = angle / 2pi (seam column duplicated), v = profile arc length.

    The profile must run counter-clockwise in the (rho, z) half-plane (e.g. bottom to top on the outside) for
    outward normals. ``rho == 0`` at an end makes a pole: its quads keep one triangle each and each pole copy gets
    u at the middle of its triangle's column. A closed profile repeats its first point last.
    """
    rho = np.asarray(rho, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    theta = 2 * np.pi * np.arange(n_u + 1) / n_u
    cos, sin = np.cos(theta), np.sin(theta)
    cos[-1], sin[-1] = cos[0], sin[0]
    k = len(rho)
    verts = np.stack([rho[:, None] * cos, rho[:, None] * sin, np.broadcast_to(z[:, None], (k, n_u + 1))], axis=-1)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(rho), np.diff(z)))])
    u = np.arange(n_u + 1) / n_u
    uv = np.stack(np.broadcast_arrays(u[None, :], (arc / arc[-1])[:, None]), axis=-1).copy()
    pole_first, pole_last = rho[0] == 0, rho[-1] == 0
    if pole_first:
        uv[0, :, 0] = u + 0.5 / n_u
    if pole_last:
        uv[-1, :, 0] = u - 0.5 / n_u
    faces = _grid_faces(k, n_u + 1, pole_first, pole_last)
    return _compact(Surface(verts.reshape(-1, 3), faces, uv.reshape(-1, 2)))


def _disk(radius: float, z: float, top: bool, rect: tuple, rings: int = 3) -> Surface:
    """A flat cap at height z (rings of quads around a centre pole), facing +z when ``top`` else -z."""
    rho = np.linspace(0.0, radius, rings + 1)
    disk = _revolve(rho[::-1] if top else rho, np.full(rings + 1, z))
    disk.uvs = _planar_uv(disk.vertices, radius, rect, mirror=not top)
    return disk


def box_surface(half_extents, n: int = 8) -> Surface:
    """An axis-aligned box centred at the origin, n x n quads per face; faces laid out on a 3 x 2 UV atlas."""
    half = np.asarray(half_extents, dtype=np.float64)
    # (normal axis, sign, u axis, v axis) with u x v = sign * normal axis
    sides = [(0, 1, 1, 2), (0, -1, 2, 1), (1, 1, 2, 0), (1, -1, 0, 2), (2, 1, 0, 1), (2, -1, 1, 0)]
    t = np.linspace(-1.0, 1.0, n + 1)
    s_grid, t_grid = np.meshgrid(t, t, indexing="xy")
    parts = []
    for idx, (axis, sign, ua, va) in enumerate(sides):
        p = np.zeros((n + 1, n + 1, 3))
        p[..., axis], p[..., ua], p[..., va] = sign, s_grid, t_grid
        uv = np.stack([(s_grid + 1) / 2, (t_grid + 1) / 2], axis=-1).reshape(-1, 2)
        col, row = idx % 3, idx // 3
        rect = (col / 3, row / 2, (col + 1) / 3, (row + 1) / 2)
        parts.append(Surface((p * half).reshape(-1, 3), _grid_faces(n + 1, n + 1), _to_rect(uv, rect)))
    return _merge(parts)


def sphere_surface(radius: float, n_v: int = 24) -> Surface:
    """A UV sphere (latitude rows from pole to pole)."""
    phi = np.linspace(-np.pi / 2, np.pi / 2, n_v + 1)
    rho, z = radius * np.cos(phi), radius * np.sin(phi)
    rho[[0, -1]], z[0], z[-1] = 0.0, -radius, radius
    return _revolve(rho, z)


def cylinder_surface(radius: float, height: float, n_v: int | None = None) -> Surface:
    """A capped cylinder along z: side on the top half of the atlas, caps below it."""
    n_v = n_v or _rows(height)
    side = _revolve(np.full(n_v + 1, radius), np.linspace(-height / 2, height / 2, n_v + 1))
    side.uvs = _to_rect(side.uvs, (0.0, 0.5, 1.0, 1.0))
    bottom = _disk(radius, -height / 2, False, (0.0, 0.0, 0.5, 0.5))
    top = _disk(radius, height / 2, True, (0.5, 0.0, 1.0, 0.5))
    return _merge([bottom, side, top])


def cone_surface(radius: float, height: float, top_ratio: float = 0.0, n_v: int | None = None) -> Surface:
    """A cone along z with its apex up (``top_ratio == 0``) or a frustum with a top cap of radius top_ratio*radius."""
    n_v = n_v or _rows(float(np.hypot(height, radius * (1 - top_ratio))))
    rho = np.linspace(radius, top_ratio * radius, n_v + 1)
    side = _revolve(rho, np.linspace(-height / 2, height / 2, n_v + 1))
    side.uvs = _to_rect(side.uvs, (0.0, 0.5, 1.0, 1.0))
    parts = [_disk(radius, -height / 2, False, (0.0, 0.0, 0.5, 0.5)), side]
    if top_ratio > 0:
        parts.append(_disk(top_ratio * radius, height / 2, True, (0.5, 0.0, 1.0, 0.5), rings=2))
    return _merge(parts)


def torus_surface(major_radius: float, minor_radius: float, n_v: int = 24) -> Surface:
    """A torus around z; u runs around the axis, v around the tube."""
    phi = 2 * np.pi * np.arange(n_v + 1) / n_v
    rho, z = major_radius + minor_radius * np.cos(phi), minor_radius * np.sin(phi)
    rho[-1], z[-1] = rho[0], z[0]
    return _revolve(rho, z)


def capsule_surface(radius: float, length: float, n_cap: int = 8, n_side: int | None = None) -> Surface:
    """A cylinder of the given length along z closed by two hemispheres (total height length + 2 radius)."""
    n_side = n_side or _rows(length)
    half = length / 2
    phi = np.linspace(0.0, np.pi / 2, n_cap + 1)
    cap_rho, cap_z = radius * np.cos(phi), radius * np.sin(phi)
    cap_rho[-1], cap_z[-1] = 0.0, radius
    side_z = np.linspace(-half, half, n_side + 1)[1:-1]
    rho = np.concatenate([cap_rho[::-1], np.full(len(side_z), radius), cap_rho])
    z = np.concatenate([-half - cap_z[::-1], side_z, half + cap_z])
    return _revolve(rho, z)


def polygon_outline(kind: str, points: int, outer: float, inner: float, phase: float) -> np.ndarray:
    """Corners [M, 2] of a regular polygon or a star (alternating outer/inner radii), counter-clockwise."""
    if kind == "star":
        m = 2 * points
        radii = np.where(np.arange(m) % 2 == 0, outer, inner)
    else:
        m = points
        radii = np.full(m, outer)
    ang = phase + 2 * np.pi * np.arange(m) / m
    return np.stack([radii * np.cos(ang), radii * np.sin(ang)], axis=-1)


def polygon_area(corners: np.ndarray) -> float:
    """Shoelace area of a counter-clockwise polygon."""
    x, y = corners[:, 0], corners[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def extrusion_surface(
    corners: np.ndarray, height: float, twist: float = 0.0, taper: float = 1.0, n_outline: int = 24, n_v: int = 8
) -> Surface:
    """A prism over a polygon star-shaped about the origin, optionally twisted (radians, bottom to top) and
    tapered (top scale); caps are fans around the centre; u runs along the outline, v up the side.

    Each edge is split so the outline has at least ``n_outline`` points.
    """
    corners = np.asarray(corners, dtype=np.float64)
    n_edge = max(1, -(-n_outline // len(corners)))
    nxt = np.roll(corners, -1, axis=0)
    s = (np.arange(n_edge) / n_edge)[None, :, None]
    outline = (corners[:, None] * (1 - s) + nxt[:, None] * s).reshape(-1, 2)
    outline = np.concatenate([outline, outline[:1]])  # duplicated seam point
    m = len(outline)
    t = np.linspace(0.0, 1.0, n_v + 1)
    ang, scale = twist * t, 1.0 + (taper - 1.0) * t
    cos, sin = np.cos(ang) * scale, np.sin(ang) * scale
    x = cos[:, None] * outline[:, 0] - sin[:, None] * outline[:, 1]
    y = sin[:, None] * outline[:, 0] + cos[:, None] * outline[:, 1]
    z = np.broadcast_to((height * (t - 0.5))[:, None], x.shape)
    side_v = np.stack([x, y, z], axis=-1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(outline, axis=0), axis=1))])
    side_uv = np.stack(np.broadcast_arrays((arc / arc[-1])[None, :], t[:, None]), axis=-1).reshape(-1, 2)
    side = Surface(side_v.reshape(-1, 3), _grid_faces(n_v + 1, m), _to_rect(side_uv, (0.0, 0.5, 1.0, 1.0)))
    radius = float(np.linalg.norm(corners, axis=1).max())
    caps = []
    for row, top in ((0, False), (n_v, True)):
        ring = side_v[row, :-1]
        centre = np.array([[0.0, 0.0, ring[0, 2]]])
        j = np.arange(1, m)
        k = np.where(j + 1 < m, j + 1, 1)
        faces = np.stack([np.zeros_like(j), j, k] if top else [np.zeros_like(j), k, j], axis=-1)
        flat = np.concatenate([[[0.0, 0.0]], outline[:-1]])  # the cap's own (untwisted, untapered) plane coords
        rect = (0.5, 0.0, 1.0, 0.5) if top else (0.0, 0.0, 0.5, 0.5)
        uv = _planar_uv(np.concatenate([flat, np.zeros((m, 1))], axis=1), radius, rect, mirror=not top)
        caps.append(Surface(np.concatenate([centre, ring]), faces, uv))
    return _merge([caps[0], side, caps[1]])


def build_surface(family: str, params: dict[str, Any]) -> Surface:
    """The untransformed surface of a primitive family from its parameters (as in a part's description)."""
    p = params
    if family == "box":
        return box_surface(p["half_extents"])
    if family == "sphere":
        return sphere_surface(p["radius"])
    if family == "cylinder":
        return cylinder_surface(p["radius"], p["height"])
    if family == "cone":
        return cone_surface(p["radius"], p["height"], p["top_ratio"])
    if family == "torus":
        return torus_surface(p["major_radius"], p["minor_radius"])
    if family == "capsule":
        return capsule_surface(p["radius"], p["length"])
    if family == "extrusion":
        corners = polygon_outline(p["kind"], p["points"], p["outer_radius"], p["inner_radius"], p["phase"])
        return extrusion_surface(corners, p["height"], p["twist"], p["taper"])
    raise ValueError(f"unknown primitive family {family!r}; expected one of {PRIMITIVE_FAMILIES}")


def analytic_volume(family: str, params: dict[str, Any]) -> float:
    """Volume of the exact (untessellated, unscaled) shape; extrusions are exact polygons (twist keeps the volume)."""
    p = params
    if family == "box":
        return float(8 * np.prod(p["half_extents"]))
    if family == "sphere":
        return 4 / 3 * np.pi * p["radius"] ** 3
    if family == "cylinder":
        return np.pi * p["radius"] ** 2 * p["height"]
    if family == "cone":
        t = p["top_ratio"]
        return np.pi * p["radius"] ** 2 * p["height"] * (1 + t + t * t) / 3
    if family == "torus":
        return 2 * np.pi**2 * p["major_radius"] * p["minor_radius"] ** 2
    if family == "capsule":
        return np.pi * p["radius"] ** 2 * p["length"] + 4 / 3 * np.pi * p["radius"] ** 3
    if family == "extrusion":
        corners = polygon_outline(p["kind"], p["points"], p["outer_radius"], p["inner_radius"], p["phase"])
        t = p["taper"]
        return polygon_area(corners) * p["height"] * (1 + t + t * t) / 3
    raise ValueError(f"unknown primitive family {family!r}; expected one of {PRIMITIVE_FAMILIES}")


# --- random parameters ----------------------------------------------------------------------------------------------


def _sample_params(family: str, rng: np.random.Generator) -> dict[str, Any]:
    u = rng.uniform
    if family == "box":
        return {"half_extents": [float(x) for x in u(0.2, 0.45, 3)]}
    if family == "sphere":
        return {"radius": float(u(0.3, 0.45))}
    if family == "cylinder":
        return {"radius": float(u(0.2, 0.4)), "height": float(u(0.4, 0.9))}
    if family == "cone":
        top = 0.0 if rng.random() < 0.6 else float(u(0.2, 0.6))
        return {"radius": float(u(0.25, 0.45)), "height": float(u(0.5, 0.9)), "top_ratio": top}
    if family == "torus":
        major = float(u(0.28, 0.4))
        return {"major_radius": major, "minor_radius": major * float(u(0.2, 0.45))}
    if family == "capsule":
        return {"radius": float(u(0.15, 0.3)), "length": float(u(0.2, 0.6))}
    if family == "extrusion":
        star = rng.random() < 0.6
        outer = float(u(0.3, 0.45))
        return {
            "kind": "star" if star else "polygon",
            "points": int(rng.integers(5, 9) if star else rng.integers(3, 9)),
            "outer_radius": outer,
            "inner_radius": outer * float(u(0.4, 0.7)) if star else outer,
            "phase": float(u(0, 2 * np.pi)),
            "height": float(u(0.15, 0.6)),
            "twist": 0.0 if rng.random() < 0.5 else float(u(-np.pi / 2, np.pi / 2)),
            "taper": 1.0 if rng.random() < 0.5 else float(u(0.4, 0.9)),
        }
    raise ValueError(f"unknown primitive family {family!r}; expected one of {PRIMITIVE_FAMILIES}")


def _yaw_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation about +Z by a uniformly random angle."""
    a = rng.uniform(0.0, 2.0 * np.pi)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _turn(rng: np.random.Generator, cfg: ProceduralConfig) -> np.ndarray:
    """The rotation of a part or of the whole object under ``cfg.orientation``."""
    if cfg.orientation not in ORIENTATIONS:
        raise ValueError(f"procedural.orientation={cfg.orientation!r}; expected one of {ORIENTATIONS}")
    return _random_rotation(rng) if cfg.orientation == "any" else _yaw_rotation(rng)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (from a normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


# --- appearance -----------------------------------------------------------------------------------------------------


def random_color(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in [0, 1], never near black nor near white: HSV value in [0.5, 0.92], saturation in [0.35, 0.9].

    Any mix of two such colours keeps its largest channel >= 0.25 and its smallest <= 0.82 (its mean is at most
    0.92 * (1 - 0.35 / 3)), so gradients and ramps stay visible on gray and white backgrounds too.
    """
    h, s, v = rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.5, 0.92)
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h * 6, 6)
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _palette(rng: np.random.Generator, n: int, contrast: float = 0.3) -> np.ndarray:
    """n random colours, each at least ``contrast`` (RGB distance) from the one before it, so patterns show."""
    colors = [random_color(rng)]
    while len(colors) < n:
        for _ in range(32):
            c = random_color(rng)
            if np.linalg.norm(c - colors[-1]) >= contrast:
                break
        colors.append(c)
    return np.stack(colors)


def _ramp(t: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Piecewise-linear colour ramp: t in [0, 1] [...] -> RGB [..., 3]."""
    x = np.clip(t, 0, 1) * (len(colors) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(colors) - 2)
    f = (x - i)[..., None]
    return colors[i] * (1 - f) + colors[i + 1] * f


def _normalise(t: np.ndarray) -> np.ndarray:
    return (t - t.min()) / max(float(np.ptp(t)), 1e-12)


def _periodic_fbm(rng: np.random.Generator, res: int, base: int, octaves: int = 4) -> np.ndarray:
    """Tileable value-noise fBm on a res x res image, normalised to [0, 1]."""
    coords = (np.arange(res) + 0.5) / res
    total = np.zeros((res, res))
    for o in range(octaves):
        g = base * 2**o
        lattice = rng.random((g, g))
        x = coords * g
        i0 = np.floor(x).astype(np.int64)
        f = x - i0
        f = f * f * (3 - 2 * f)  # smoothstep
        i0, i1 = i0 % g, (i0 + 1) % g
        rows = lattice[i0] * (1 - f)[:, None] + lattice[i1] * f[:, None]
        total += 0.5**o * (rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :])
    return _normalise(total)


def make_texture(rng: np.random.Generator, res: int, pattern: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A tileable uint8 RGB texture [res, res, 3] with the given pattern, and its description."""
    coords = (np.arange(res) + 0.5) / res
    u, v = np.meshgrid(coords, coords[::-1], indexing="xy")  # image row 0 is v = 1 (OBJ convention)
    if pattern == "checker":
        k = int(rng.integers(2, 13))
        colors = _palette(rng, 2)
        img = colors[(np.floor(u * k) + np.floor(v * k)).astype(np.int64) % 2]
        desc = {"cells": k}
    elif pattern == "stripes":
        k, n = int(rng.integers(3, 16)), int(rng.integers(2, 4))
        a, b = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(4))]
        colors = _palette(rng, n)
        img = colors[np.floor(np.mod(k * (a * u + b * v), 1.0) * n).astype(np.int64) % n]
        desc = {"frequency": k, "direction": [a, b]}
    elif pattern == "fbm":
        base = int(rng.choice([2, 4, 8]))
        colors = _palette(rng, int(rng.integers(2, 4)))
        img = _ramp(_periodic_fbm(rng, res, base), colors)
        desc = {"base_frequency": base}
    elif pattern == "cells":
        k = int(rng.integers(3, 9))
        colors = _palette(rng, k * k)
        img = colors[(np.floor(v * k) * k + np.floor(u * k)).astype(np.int64)]
        desc = {"cells": k}
    else:
        raise ValueError(f"unknown texture pattern {pattern!r}; expected one of {TEXTURE_PATTERNS}")
    texture = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return texture, {"pattern": pattern, "colors": colors.round(4).tolist(), **desc}


def _vertex_colors(rng: np.random.Generator, points: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Smoothly varying RGB per vertex: a gradient along a random direction or a sum of random sinusoids."""
    if rng.random() < 0.5:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        colors = _palette(rng, 2)
        t = _normalise(points @ direction)
        desc = {"style": "gradient", "direction": direction.round(4).tolist()}
    else:
        waves = rng.normal(size=(3, 3))
        waves *= rng.uniform(3.0, 7.0, (3, 1)) / np.linalg.norm(waves, axis=1, keepdims=True)  # rad per unit
        phases = rng.uniform(0, 2 * np.pi, 3)
        colors = _palette(rng, int(rng.integers(2, 4)))
        t = _normalise(np.sin(points @ waves.T + phases).sum(axis=1))
        desc = {"style": "noise"}
    return _ramp(t, colors), {**desc, "colors": colors.round(4).tolist()}


def _appearance(rng: np.random.Generator, surface: Surface, res: int, name: str, modes: tuple[str, ...]):
    """(Material, corner colours [F, 3, 4] or None, description) for one part, colour mode drawn from ``modes``."""
    mode = modes[int(rng.integers(len(modes)))]
    white = np.ones(4, np.float32)
    if mode == "flat":
        color = random_color(rng)
        return Material(name, np.append(color, 1.0)), None, {"mode": mode, "color": color.round(4).tolist()}
    if mode == "vertex":
        rgb, desc = _vertex_colors(rng, surface.vertices)
        rgba = np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1).astype(np.float32)
        return Material(name, white), rgba[surface.faces], {"mode": mode, **desc}
    pattern = TEXTURE_PATTERNS[int(rng.integers(len(TEXTURE_PATTERNS)))]
    texture, desc = make_texture(rng, res, pattern)
    return Material(name, white, texture), None, {"mode": mode, **desc}


# --- objects --------------------------------------------------------------------------------------------------------


def _part(
    rng: np.random.Generator, family: str, cfg: ProceduralConfig, k: int, modes: tuple[str, ...], size: float = 1.0
) -> tuple[Mesh, dict[str, Any]]:
    """One primitive with a random scale (non-uniform, times ``size``) and rotation, centred at the origin."""
    params = _sample_params(family, rng)
    surface = build_surface(family, params)
    linear = _turn(rng, cfg) @ np.diag(size * rng.uniform(*PART_AXIS_SCALE, 3))
    material, corner_colors, color_desc = _appearance(rng, surface, cfg.texture_resolution, f"part{k}", modes)
    mesh = Mesh(
        surface.vertices @ linear.T,
        surface.faces,
        face_uvs=surface.uvs[surface.faces],
        corner_colors=corner_colors,
        materials=[material],
    )
    desc = {"family": family, "params": params, "linear": linear.tolist(), "offset": [0.0, 0.0, 0.0]}
    return mesh, {**desc, "color": color_desc}


def _allowed_families(cfg: ProceduralConfig) -> tuple[str, ...]:
    families = tuple(cfg.families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown procedural families {unknown}; expected a subset of {FAMILIES}")
    if max(cfg.max_parts, cfg.min_parts) < 2 and len(families) > 1:
        families = tuple(f for f in families if f != "union")  # a union needs two parts
    return families


def generate_object(index: int, cfg: ProceduralConfig, family: str | None = None) -> ProceduralObject:
    """Object ``index`` of ``cfg.seed``: a deterministic function of (cfg.seed, index) (and ``family`` if forced).

    The family is drawn uniformly from ``cfg.families`` (all of :data:`FAMILIES` when None);
    ``family=`` forces one. A union has ``max(2, min_parts)..max(2, max_parts)`` parts drawn from the allowed
    primitive families (all primitives if none are allowed).
    """
    rng = np.random.default_rng([cfg.seed, index])
    families = _allowed_families(cfg)
    drawn = families[int(rng.integers(len(families)))]
    family = family or drawn
    if family not in FAMILIES:
        raise ValueError(f"unknown procedural family {family!r}; expected one of {FAMILIES}")
    uid = object_uid(cfg.seed, index)
    if family == "union":
        pool = tuple(f for f in families if f != "union") or PRIMITIVE_FAMILIES
        lo = max(2, cfg.min_parts)
        n_parts = int(rng.integers(lo, max(lo, cfg.max_parts) + 1))
        # vertex colours and textures are not mixed within one object: OBJ files cannot hold both
        modes = ("flat", "vertex") if rng.random() < 0.5 else ("flat", "texture")
        meshes, parts = [], []
        for k in range(n_parts):
            fam, size = pool[int(rng.integers(len(pool)))], float(rng.uniform(0.55, 0.85))
            mesh, desc = _part(rng, fam, cfg, k, modes, size=size)
            if meshes:  # centre the new part on a surface point of an earlier part, so the two overlap
                host = meshes[int(rng.integers(len(meshes)))]
                offset = host.vertices[int(rng.integers(host.num_vertices))]
                mesh.vertices = mesh.vertices + offset
                desc["offset"] = offset.tolist()
            meshes.append(mesh)
            parts.append(desc)
    else:
        mesh, desc = _part(rng, family, cfg, 0, COLOR_MODES)
        meshes, parts = [mesh], [desc]
    combined = concatenate(meshes, source=uid)
    centre = 0.5 * (combined.vertices.min(0) + combined.vertices.max(0))
    linear = np.diag(rng.uniform(*OBJECT_AXIS_SCALE, 3)) @ _turn(rng, cfg)
    combined.vertices = (combined.vertices - centre) @ linear.T
    description = {
        "uid": uid,
        "seed": int(cfg.seed),
        "index": int(index),
        "family": family,
        "object_linear": linear.tolist(),  # world = object_linear @ (part_linear @ p + part_offset - object_centre)
        "object_centre": centre.tolist(),
        "parts": parts,
        "num_faces": int(combined.num_faces),
    }
    return ProceduralObject(uid=uid, mesh=combined, family=family, description=description)
