"""One object -> one WebDataset sample: condition views, tiled target views, cameras and ground-truth volumes.

Fields (the shard format every stage reads; keys of the returned dict are WebDataset field names):

* ``cond{k}.png``: RGBA condition view k (``data.cond_resolution`` square), k < ``data.cond_samples``, at a random
  azimuth in [0, 360) and elevation in [``cond_elevation_min``, ``cond_elevation_max``];
* ``mv{k}.png``: RGBA 2W x 3H, the six target views of condition k tiled 3 rows x 2 columns (``cameras.tile``);
* ``cams.json``: ``{"fov_deg", "resolution", "layout", "samples": [{"cond": CAM, "views": [6 x CAM]}, ...]}``;
* ``occ.npz``: ``occ`` uint8 [R, R, R] indexed [x, y, z] (coarse occupancy shell);
* ``fine.npz``: ``coords`` int16 [M, 3], ``sdf`` float32 [M] (normalised units), ``rgb`` uint8 [M, 3];
* ``meta.json``: uid, source, up axis (``up_axis``: the build's setting, ``up_axis_file``: the axis the file was
  read with), normalisation scale and offset, shell threshold, SDF truncation, package version.

Per-object randomness (condition poses, random lighting) comes from ``(data.seed, crc32(uid))``, so a sample is the
same whichever worker or rank builds it.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..cameras import Camera, framing_distance, get_layout, multiview_cameras, tile
from ..geometry.mesh import Mesh
from ..geometry.mesh_io import normalize, resolve_up_axis
from ..geometry.volumes import compute_volumes
from ..rendering.base import light_from_config
from .config import DataConfig


@dataclass
class SampleTimings:
    normalize: float = 0.0
    render: float = 0.0
    volumes: float = 0.0
    encode: float = 0.0


def object_rng(seed: int, uid: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(uid.encode())])


def camera_distance(cfg: DataConfig) -> float:
    if cfg.distance is not None:
        return float(cfg.distance)
    return framing_distance(get_layout(cfg.layout).fov_deg, cfg.normalize_extent)


def sample_cameras(cfg: DataConfig, rng: np.random.Generator) -> list[tuple[Camera, list[Camera]]]:
    """K (condition camera, six target cameras) pairs."""
    layout = get_layout(cfg.layout)
    dist = camera_distance(cfg)
    out = []
    for _ in range(cfg.cond_samples):
        az = float(rng.uniform(0.0, 360.0))
        el = float(rng.uniform(cfg.cond_elevation_min, cfg.cond_elevation_max))
        cond = Camera(az, el, dist, layout.fov_deg, cfg.cond_resolution, cfg.cond_resolution)
        out.append((cond, multiview_cameras(az, layout, dist, cfg.view_resolution)))
    return out


def encode_png(rgba: np.ndarray, compress_level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def build_sample(mesh: Mesh, uid: str, source: str, cfg: DataConfig, renderer, threads: int = 0):
    """Render and voxelise one mesh; returns (fields dict of bytes, SampleTimings)."""
    if "." in uid:
        raise ValueError(f"sample key {uid!r} contains a dot; WebDataset keys must be dot-free")
    t = SampleTimings()
    t0 = time.perf_counter()
    mesh_n, scale, offset = normalize(mesh, cfg.normalize_extent)
    rng = object_rng(cfg.seed, uid)
    light = light_from_config(cfg.render, rng)
    pairs = sample_cameras(cfg, rng)
    t1 = time.perf_counter()
    t.normalize = t1 - t0

    cams = [cam for cond, views in pairs for cam in [cond, *views]]
    renders = renderer.render_many(mesh_n, cams, light)
    t2 = time.perf_counter()
    t.render = t2 - t1

    vol = compute_volumes(mesh_n, cfg.volume, threads=threads)
    t3 = time.perf_counter()
    t.volumes = t3 - t2

    level = cfg.shards.png_compress_level
    fields: dict[str, bytes] = {}
    samples = []
    for k, (cond, views) in enumerate(pairs):
        block = renders[k * 7 : (k + 1) * 7]
        fields[f"cond{k}.png"] = encode_png(block[0].to_uint8_rgba(), level)
        fields[f"mv{k}.png"] = encode_png(tile(np.stack([r.to_uint8_rgba() for r in block[1:]])), level)
        samples.append({"cond": cond.to_dict(), "views": [v.to_dict() for v in views]})
    cams_json = {
        "fov_deg": get_layout(cfg.layout).fov_deg,
        "resolution": cfg.view_resolution,
        "cond_resolution": cfg.cond_resolution,
        "layout": cfg.layout,
        "samples": samples,
    }
    fields["cams.json"] = json.dumps(cams_json).encode()
    fields["occ.npz"] = encode_npz(occ=vol.occ)
    fields["fine.npz"] = encode_npz(coords=vol.coords, sdf=vol.sdf, rgb=vol.rgb)
    meta = {
        "uid": uid,
        "source": source,
        "up_axis": cfg.up_axis,
        "up_axis_file": resolve_up_axis(source, cfg.up_axis) if source else None,
        "normalize_scale": float(scale),
        "normalize_offset": [float(x) for x in offset],
        "normalize_extent": cfg.normalize_extent,
        "shell_threshold": float(vol.shell_threshold),
        "sdf_truncation": float(cfg.volume.sdf_truncation),
        "coarse_resolution": int(vol.coarse_resolution),
        "fine_resolution": int(vol.fine_resolution),
        "num_vertices": int(mesh.num_vertices),
        "num_faces": int(mesh.num_faces),
        "one2345pp_version": __version__,
    }
    fields["meta.json"] = json.dumps(meta).encode()
    t.encode = time.perf_counter() - t3
    return fields, t
