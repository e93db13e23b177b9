"""Raw WebDataset samples (bytes per field) -> tensors for the multi-view and 3D stages.

A shard sample holds, for one object and K condition views:

* ``cond{k}.png``: RGBA condition view (straight alpha);
* ``mv{k}.png``: RGBA grid of the six target views of condition k, 3 rows x 2 columns (:func:`cameras.tile`);
* ``cams.json``: ``{"fov_deg", "resolution", "layout", "samples": [{"cond": CAM, "views": [6 x CAM]}, ...]}``;
* ``occ.npz`` (``occ`` uint8 [R, R, R], indexed [x, y, z]);
* ``fine.npz`` (``coords`` int16 [M, 3], ``sdf`` float32 [M], ``rgb`` uint8 [M, 3]);
* ``meta.json``.

Images come out as float32 in [0, 1], composited on a background (``"gray"`` 0.5, ``"white"`` 1.0, ``"random"``: one
gray level per sample drawn from the given generator, or a number), with their alpha kept beside them. Anything that
does not follow the format raises :class:`CorruptSample`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from one2345pp.cameras import GRID_COLS, GRID_ROWS, NUM_VIEWS, intrinsics, tile, untile

from .framing import ALPHA_THRESHOLD, frame_object

__all__ = [
    "CorruptSample",
    "background_level",
    "composite",
    "condition_count",
    "decode_cameras",
    "decode_views",
    "decode_volumes",
    "pick_condition",
    "read_json",
    "read_npz",
    "read_rgba",
]

BACKGROUND_LEVELS = {"gray": 0.5, "grey": 0.5, "white": 1.0}


class CorruptSample(Exception):
    """A shard sample that does not follow the format (missing field, undecodable data, wrong shape)."""

    def __init__(self, key: str | None, url: str | None, reason: str):
        self.key, self.url, self.reason = key, url, reason
        super().__init__(f"corrupt sample {key!r} in {url or '<unknown shard>'}: {reason}")

    def __reduce__(self):  # keep (key, url, reason) when the exception crosses a process boundary
        return (CorruptSample, (self.key, self.url, self.reason))


def _corrupt(sample: Mapping, reason: str) -> CorruptSample:
    return CorruptSample(sample.get("__key__"), sample.get("__url__"), reason)


def _field(sample: Mapping, name: str) -> bytes:
    if name not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise _corrupt(sample, f"missing field {name!r} (present: {', '.join(present) or 'none'})")
    value = sample[name]
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _corrupt(
            sample, f"field {name!r} is {type(value).__name__}, expected raw bytes (read shards without decoders)"
        )
    return bytes(value)


def read_rgba(sample: Mapping, name: str) -> np.ndarray:
    """Decode a PNG field to a uint8 [H, W, 4] array; the PNG must be RGBA."""
    try:
        with Image.open(io.BytesIO(_field(sample, name))) as img:
            img.load()
            if img.mode != "RGBA":
                raise _corrupt(sample, f"{name} has mode {img.mode}, expected RGBA")
            return np.array(img, dtype=np.uint8)  # a writable copy
    except CorruptSample:
        raise
    except Exception as exn:  # PIL raises several types for bad data
        raise _corrupt(sample, f"cannot decode {name} as PNG: {exn}") from exn


def read_json(sample: Mapping, name: str) -> dict:
    try:
        value = json.loads(_field(sample, name).decode("utf-8"))
    except CorruptSample:
        raise
    except Exception as exn:
        raise _corrupt(sample, f"cannot decode {name} as JSON: {exn}") from exn
    if not isinstance(value, dict):
        raise _corrupt(sample, f"{name} holds a {type(value).__name__}, expected an object")
    return value


def read_npz(sample: Mapping, name: str, arrays: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(_field(sample, name)), allow_pickle=False) as npz:
            missing = [a for a in arrays if a not in npz.files]
            if missing:
                raise _corrupt(sample, f"{name} lacks arrays {missing} (has {npz.files})")
            return {a: npz[a] for a in arrays}
    except CorruptSample:
        raise
    except Exception as exn:
        raise _corrupt(sample, f"cannot decode {name} as npz: {exn}") from exn


def condition_count(sample: Mapping) -> int:
    """Number K of condition views: ``cond0.png`` ... ``cond{K-1}.png`` must all be present."""
    k = 0
    while f"cond{k}.png" in sample:
        k += 1
    if k == 0:
        raise _corrupt(sample, "no condition views (missing field 'cond0.png')")
    return k


def pick_condition(sample: Mapping, generator: torch.Generator | None) -> int:
    """Condition index: uniform over the K conditions with ``generator``, 0 when ``generator`` is None (validation)."""
    n = condition_count(sample)
    if generator is None:
        return 0
    return int(torch.randint(n, (), generator=generator))


def background_level(background: str | float, generator: torch.Generator | None = None) -> float:
    """Background gray level: "gray" 0.5, "white" 1.0, "random" uniform in [0, 1] from ``generator``, or a number."""
    if isinstance(background, (int, float)):
        return float(background)
    if background == "random":
        return float(torch.rand((), generator=generator))
    try:
        return BACKGROUND_LEVELS[background]
    except KeyError:
        raise ValueError(f"unknown background {background!r}; use 'gray', 'white', 'random' or a number") from None


def composite(rgba: np.ndarray | torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGBA [..., H, W, 4] (straight alpha) -> RGB on a gray ``level`` [..., 3, H, W] and alpha [..., 1, H, W]."""
    x = torch.as_tensor(np.asarray(rgba)).to(torch.float32).div_(255.0).movedim(-1, -3)
    rgb, alpha = x[..., :3, :, :], x[..., 3:, :, :]
    return (rgb * alpha + level * (1.0 - alpha)).contiguous(), alpha.contiguous()


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize [..., C, H, W] to size x size (antialiased bilinear); composited images resize like premultiplied ones."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="bilinear", antialias=True)
    return y.reshape(*lead, *y.shape[-3:]).clamp_(0.0, 1.0)


def _c2w(sample: Mapping, cam: object, where: str) -> np.ndarray:
    try:
        m = np.asarray(cam["c2w"], dtype=np.float64)  # type: ignore[index]
    except Exception as exn:
        raise _corrupt(sample, f"cams.json {where}: no readable c2w ({exn})") from exn
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise _corrupt(sample, f"cams.json {where}: c2w has shape {m.shape} or non-finite values, expected 4x4")
    return m


def _angles(sample: Mapping, cam: object, where: str) -> tuple[float, float]:
    try:
        return float(cam["azimuth_deg"]), float(cam["elevation_deg"])  # type: ignore[index]
    except Exception as exn:
        raise _corrupt(sample, f"cams.json {where}: missing azimuth/elevation ({exn})") from exn


def decode_cameras(
    sample: Mapping, k: int, cond_size: tuple[int, int], view_size: tuple[int, int], prefix: str = "target"
) -> dict[str, torch.Tensor]:
    """Cameras of condition ``k`` from ``cams.json``; intrinsics for the given (width, height) of the decoded images."""
    cams = read_json(sample, "cams.json")
    try:
        fov = float(cams["fov_deg"])
        entry = cams["samples"][k]
        cond, views = entry["cond"], list(entry["views"])
    except Exception as exn:
        raise _corrupt(sample, f"cams.json has no fov_deg / samples[{k}] with cond and views ({exn!r})") from exn
    if len(views) != NUM_VIEWS:
        raise _corrupt(sample, f"cams.json samples[{k}] has {len(views)} views, expected {NUM_VIEWS}")
    if not 0.0 < fov < 180.0:
        raise _corrupt(sample, f"cams.json fov_deg={fov} is outside (0, 180)")
    cond_az, cond_el = _angles(sample, cond, f"samples[{k}].cond")
    view_angles = np.array([_angles(sample, v, f"samples[{k}].views[{i}]") for i, v in enumerate(views)])
    view_c2w = np.stack([_c2w(sample, v, f"samples[{k}].views[{i}]") for i, v in enumerate(views)])

    def t(x) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=torch.float32)

    return {
        "cond_c2w": t(_c2w(sample, cond, f"samples[{k}].cond")),
        "cond_K": t(intrinsics(fov, *cond_size)),
        "cond_azimuth": t(cond_az),
        "cond_elevation": t(cond_el),
        f"{prefix}_c2w": t(view_c2w),
        f"{prefix}_K": t(intrinsics(fov, *view_size)),
        f"{prefix}_azimuth": t(view_angles[:, 0]),
        f"{prefix}_elevation": t(view_angles[:, 1]),
        "fov_deg": t(fov),
    }


def _check_condition(sample: Mapping, k: int) -> None:
    n = condition_count(sample)
    if not 0 <= k < n:
        raise _corrupt(sample, f"condition {k} requested but the sample has {n} condition views")


def _read_grid(sample: Mapping, k: int) -> np.ndarray:
    grid = read_rgba(sample, f"mv{k}.png")
    gh, gw = grid.shape[:2]
    if gh % GRID_ROWS or gw % GRID_COLS or gh // GRID_ROWS != gw // GRID_COLS:
        raise _corrupt(sample, f"mv{k}.png is {gw}x{gh}; expected {GRID_COLS}r wide x {GRID_ROWS}r high")
    cams = read_json(sample, "cams.json")
    res = cams.get("resolution")
    if isinstance(res, int) and gh != GRID_ROWS * res:
        raise _corrupt(sample, f"mv{k}.png is {gw}x{gh} but cams.json says views of {res} px")
    return grid


def _framed_condition(sample: Mapping, k: int, fill: float) -> np.ndarray:
    """Condition ``k`` framed as the product frames its input images (``data.framing.frame_object``), uint8 RGBA."""
    rgba = read_rgba(sample, f"cond{k}.png").astype(np.float32) / 255.0
    on = rgba[..., 3] > ALPHA_THRESHOLD / 255.0
    if not on.any():
        raise _corrupt(sample, f"cond{k}.png has no object pixel to frame (data.cond_fill={fill})")
    framed = frame_object(rgba, on, rgba.shape[0], fill)
    return np.uint8(np.round(framed * 255.0))


def _common(
    sample: Mapping,
    k: int,
    background: str | float,
    generator: torch.Generator | None,
    cond_resolution: int | None,
    cond_fill: float | None = None,
) -> tuple[dict, float, np.ndarray]:
    _check_condition(sample, k)
    level = background_level(background, generator)
    cond = read_rgba(sample, f"cond{k}.png") if cond_fill is None else _framed_condition(sample, k, cond_fill)
    cond_rgb, cond_alpha = composite(cond, level)
    out = {
        "__key__": sample.get("__key__"),
        "__url__": sample.get("__url__"),
        "cond_index": torch.tensor(k, dtype=torch.int64),
        "background": torch.tensor(level, dtype=torch.float32),
        "cond": _resize(cond_rgb, cond_resolution),
        "cond_alpha": _resize(cond_alpha, cond_resolution),
    }
    return out, level, _read_grid(sample, k)


def decode_views(
    sample: Mapping,
    k: int,
    background: str | float = "gray",
    generator: torch.Generator | None = None,
    view_resolution: int | None = None,
    cond_resolution: int | None = None,
    cond_fill: float | None = None,
) -> dict:
    """Condition ``k`` of a raw sample for the multi-view stage.

    Returns ``cond`` [3, Hc, Wc] and ``cond_alpha`` [1, Hc, Wc], ``target`` [3, 3H, 2W] and ``target_alpha``
    [1, 3H, 2W] (the tiled six views), the cameras of :func:`decode_cameras` (``cond_*``, ``target_*``), the
    background level and ``cond_index``. ``view_resolution`` / ``cond_resolution`` resize on load (None: as stored);
    ``cond_fill`` frames the condition view as the product frames its input (None: as rendered).
    """
    out, level, grid = _common(sample, k, background, generator, cond_resolution, cond_fill)
    views_rgb, views_alpha = composite(untile(grid), level)  # [6, 3, H, W], [6, 1, H, W]
    views_rgb, views_alpha = _resize(views_rgb, view_resolution), _resize(views_alpha, view_resolution)
    out["target"], out["target_alpha"] = tile(views_rgb), tile(views_alpha)
    out.update(_cameras_for(sample, k, out["cond"], views_rgb, "target"))
    return out


def _cameras_for(sample: Mapping, k: int, cond: torch.Tensor, views: torch.Tensor, prefix: str) -> dict:
    return decode_cameras(sample, k, (cond.shape[-1], cond.shape[-2]), (views.shape[-1], views.shape[-2]), prefix)


def decode_volumes(
    sample: Mapping,
    k: int = 0,
    background: str | float = "gray",
    generator: torch.Generator | None = None,
    view_resolution: int | None = None,
    cond_resolution: int | None = None,
    cond_fill: float | None = None,
) -> dict:
    """Ground-truth volumes of a raw sample plus the six views of condition ``k`` that condition the 3D stages.

    Returns ``occ`` float32 [1, R, R, R] in {-1, +1}, ``fine_coords`` int32 [M, 3], ``fine_sdf`` float32 [M],
    ``fine_rgb`` float32 [M, 3] in [-1, 1], ``meta`` (dict), ``views`` [6, 3, H, W] / ``views_alpha`` [6, 1, H, W],
    ``cond`` / ``cond_alpha`` (framed when ``cond_fill`` is given, as in :func:`decode_views`) and the cameras
    (``cond_*``, ``views_*``).
    """
    out, level, grid = _common(sample, k, background, generator, cond_resolution, cond_fill)
    views_rgb, views_alpha = composite(untile(grid), level)
    out["views"], out["views_alpha"] = _resize(views_rgb, view_resolution), _resize(views_alpha, view_resolution)
    out.update(_cameras_for(sample, k, out["cond"], out["views"], "views"))

    occ = read_npz(sample, "occ.npz", ("occ",))["occ"]
    if occ.ndim != 3 or len(set(occ.shape)) != 1 or occ.shape[0] == 0:
        raise _corrupt(sample, f"occ.npz occ has shape {occ.shape}, expected a cube [R, R, R]")
    if occ.dtype.kind not in "biu" or occ.min() < 0 or occ.max() > 1:
        raise _corrupt(sample, f"occ.npz occ must hold 0/1 integers (dtype {occ.dtype})")
    out["occ"] = torch.from_numpy(occ.astype(np.float32) * 2.0 - 1.0)[None]

    fine = read_npz(sample, "fine.npz", ("coords", "sdf", "rgb"))
    coords, sdf, rgb = fine["coords"], fine["sdf"], fine["rgb"]
    m = coords.shape[0] if coords.ndim == 2 else -1
    if coords.shape != (m, 3) or sdf.shape != (m,) or rgb.shape != (m, 3):
        raise _corrupt(sample, f"fine.npz shapes coords {coords.shape}, sdf {sdf.shape}, rgb {rgb.shape} disagree")
    if coords.dtype.kind not in "iu" or rgb.dtype != np.uint8:
        raise _corrupt(sample, f"fine.npz dtypes coords {coords.dtype}, rgb {rgb.dtype}; expected integer, uint8")
    meta = read_json(sample, "meta.json")
    fine_res = meta.get("fine_resolution")
    if m and (coords.min() < 0 or (isinstance(fine_res, int) and coords.max() >= fine_res)):
        raise _corrupt(sample, f"fine.npz coordinates outside [0, {fine_res}) (meta fine_resolution)")
    if not np.isfinite(sdf).all():
        raise _corrupt(sample, "fine.npz has non-finite SDF values")
    out["fine_coords"] = torch.from_numpy(coords.astype(np.int32))
    out["fine_sdf"] = torch.from_numpy(sdf.astype(np.float32))
    out["fine_rgb"] = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0)
    out["meta"] = meta
    return out
