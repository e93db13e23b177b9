"""Geometry metrics of the evaluation protocol (METHOD.md): both meshes scaled into a unit bounding box, the
prediction aligned to the ground truth (rotation search, each candidate re-scaled into the unit box and refined by
rigid ICP, the best symmetric inlier ratio (F-Score) kept), 100,000 surface
points sampled on each, then F-Score at 0.05 and Chamfer distance.

Definitions used here (points P on the prediction, G on the ground truth, d(x, S) the distance to the nearest point
of S):

- precision = share of P with d(p, G) < tau, recall = share of G with d(g, P) < tau,
  F-Score = 2 precision recall / (precision + recall) (0 when both are 0);
- Chamfer = (mean_p d(p, G) + mean_g d(g, P)) / 2, in units of the unit bounding box (L2 distances, not squared).

Nearest-neighbour distances and ICP use open3d's point-cloud KD-tree and registration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..geometry.mesh import Mesh
from ..utils.optional import require


@dataclass
class AlignConfig:
    up_axes: int = 6  # candidate up directions of the prediction: 6 = +-x, +-y, +-z; 1 = keep +z
    azimuth_step_deg: float = 15.0  # rotation search about the up axis
    search_points: int = 2000  # points per cloud during the search
    search_iterations: int = 20  # ICP iterations per candidate
    refine_points: int = 20000
    refine_iterations: int = 50
    max_correspondence: float = 0.1  # ICP correspondence distance during the search (unit box)


@dataclass
class GeometryScores:
    fscore: float
    precision: float
    recall: float
    chamfer: float
    transform: list  # 4x4 applied to the prediction (after unit-box normalisation)

    def to_dict(self) -> dict:
        return asdict(self)


def unit_box(vertices: np.ndarray) -> np.ndarray:
    """Vertices moved so the bounding box is centred at the origin with its longest side 1."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be a non-empty [N, 3] array, got shape {v.shape}")
    lo, hi = v.min(0), v.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError(f"mesh has a degenerate bounding box (extent {extent})")
    return (v - (lo + hi) / 2) / extent


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points uniformly distributed over the surface area of a triangle mesh."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        raise ValueError("mesh has no faces to sample")
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("mesh has zero surface area")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(f), size=n, p=area / total)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    a, b, c = 1 - s, s * (1 - r2), s * r2
    t = tri[idx]
    return a[:, None] * t[:, 0] + b[:, None] * t[:, 1] + c[:, None] * t[:, 2]


def _cloud(points: np.ndarray):
    o3d = require("open3d")
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64))
    return pc


def nearest_distances(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each point of ``src`` the distance to the nearest point of ``dst``."""
    return np.asarray(_cloud(src).compute_point_cloud_distance(_cloud(dst)))


def fscore_chamfer(pred: np.ndarray, gt: np.ndarray, tau: float = 0.05) -> dict[str, float]:
    """F-Score at ``tau``, precision, recall and Chamfer distance between two point sets (see the module doc)."""
    d_pg = nearest_distances(pred, gt)
    d_gp = nearest_distances(gt, pred)
    precision = float((d_pg < tau).mean())
    recall = float((d_gp < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"fscore": f, "precision": precision, "recall": recall, "chamfer": float((d_pg.mean() + d_gp.mean()) / 2)}


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _up_to_z(axis: int) -> np.ndarray:
    """Proper rotation taking the candidate up direction ``axis`` (0..5 = +z, -z, +x, -x, +y, -y) to +z."""
    mats = [
        np.eye(3),
        np.diag([1.0, -1.0, -1.0]),
        np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=np.float64),
        np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=np.float64),
        np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64),
        np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64),
    ]
    return mats[axis]


def candidate_rotations(cfg: AlignConfig) -> list[np.ndarray]:
    if not 1 <= cfg.up_axes <= 6:
        raise ValueError(f"align.up_axes must lie in 1..6, got {cfg.up_axes}")
    if cfg.azimuth_step_deg <= 0:
        raise ValueError(f"align.azimuth_step_deg must be > 0, got {cfg.azimuth_step_deg}")
    steps = max(1, round(360.0 / cfg.azimuth_step_deg))
    return [_rot_z(k * 360.0 / steps) @ _up_to_z(a) for a in range(cfg.up_axes) for k in range(steps)]


def _icp(src, dst, dist: float, iterations: int) -> np.ndarray:
    reg = require("open3d").pipelines.registration
    est = reg.TransformationEstimationPointToPoint(with_scaling=False)
    crit = reg.ICPConvergenceCriteria(max_iteration=iterations)
    return np.asarray(reg.registration_icp(src, dst, dist, np.eye(4), est, crit).transformation)


def _fscore(src, dst, transform: np.ndarray, tau: float) -> float:
    """Symmetric F-Score of ``transform(src)`` against ``dst`` (a one-sided inlier ratio would reward shrinking)."""
    reg = require("open3d").pipelines.registration
    p = reg.evaluate_registration(src, dst, tau, transform).fitness
    r = reg.evaluate_registration(dst, src, tau, np.linalg.inv(transform)).fitness
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _boxed(points: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """4x4 similarity: rotate by ``rot``, then scale and centre the rotated points into the unit bounding box (the
    protocol's scale normalisation, done in the candidate orientation)."""
    q = points @ rot.T
    lo, hi = q.min(0), q.max(0)
    scale = 1.0 / float((hi - lo).max())
    t = np.eye(4)
    t[:3, :3] = scale * rot
    t[:3, 3] = -scale * (lo + hi) / 2
    return t


def align(pred_points: np.ndarray, gt_points: np.ndarray, cfg: AlignConfig | None = None, tau: float = 0.05):
    """4x4 similarity transform taking ``pred_points`` onto ``gt_points``. For every candidate rotation the prediction
    is rotated, re-scaled into the unit box and refined by a short rigid ICP; the candidate with the best symmetric
    F-Score at ``tau`` is refined again on more points. Returns (transform, F-Score of the subsets)."""
    cfg = cfg or AlignConfig()
    rng = np.random.default_rng(0)

    def subset(p: np.ndarray, n: int) -> np.ndarray:
        return p if len(p) <= n else p[rng.choice(len(p), n, replace=False)]

    p_small, g_small = subset(pred_points, cfg.search_points), subset(gt_points, cfg.search_points)
    dst = _cloud(g_small)
    best, best_score = np.eye(4), -1.0
    for rot in candidate_rotations(cfg):
        boxed = _boxed(pred_points, rot)
        src = _cloud(_apply(boxed, p_small))
        t = _icp(src, dst, cfg.max_correspondence, cfg.search_iterations) @ boxed
        score = _fscore(_cloud(p_small), dst, t, tau)
        if score > best_score:
            best, best_score = t, score
    p_big, g_big = subset(pred_points, cfg.refine_points), subset(gt_points, cfg.refine_points)
    src, dst = _cloud(_apply(best, p_big)), _cloud(g_big)
    refined = _icp(src, dst, tau, cfg.refine_iterations) @ best
    src = _cloud(p_big)
    scores = {"refined": _fscore(src, dst, refined, tau), "search": _fscore(src, dst, best, tau)}
    return (refined, scores["refined"]) if scores["refined"] >= scores["search"] else (best, scores["search"])


def _apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ transform[:3, :3].T + transform[:3, 3]


def evaluate_meshes(
    pred: Mesh,
    gt: Mesh,
    *,
    align_meshes: bool = True,
    num_points: int = 100_000,
    tau: float = 0.05,
    seed: int = 0,
    align_cfg: AlignConfig | None = None,
) -> GeometryScores:
    """The protocol on two meshes: unit boxes, optional alignment, ``num_points`` samples each, F-Score / Chamfer."""
    pv, gv = unit_box(pred.vertices), unit_box(gt.vertices)
    p_pts = sample_surface(pv, pred.faces, num_points, seed)
    g_pts = sample_surface(gv, gt.faces, num_points, seed + 1)
    transform = np.eye(4)
    if align_meshes:
        transform, _ = align(p_pts, g_pts, align_cfg, tau)
        # resample on the aligned prediction so the samples stay uniform over its (similarity-transformed) surface
        p_pts = sample_surface(_apply(transform, pv), pred.faces, num_points, seed)
    return GeometryScores(**fscore_chamfer(p_pts, g_pts, tau), transform=transform.tolist())
