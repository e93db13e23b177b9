"""The view-ceiling benchmark: a stretched copy scales only the extent along its axis, the turned world seen from
another elevation is the same picture, alternatives equal to the object score exactly like it, and a stretch costs
silhouette IoU."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_view_ceiling as bench  # noqa: E402

from one2345pp.cameras import Camera, camera_position  # noqa: E402
from one2345pp.data.procedural import generate_object  # noqa: E402
from one2345pp.geometry.mesh import Mesh  # noqa: E402
from one2345pp.geometry.mesh_io import normalize  # noqa: E402
from one2345pp.models.multiview_pipeline import MultiViewDiffusionPipeline  # noqa: E402
from one2345pp.rendering.base import light_from_config  # noqa: E402
from one2345pp.rendering.raycast import RaycastRenderer  # noqa: E402

SHIPPED = ROOT / "checkpoints" / "tiny" / "multiview" / "export"


def box_corners(half: tuple[float, float, float]) -> Mesh:
    v = np.array([[sx * half[0], sy * half[1], sz * half[2]] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6]])
    return Mesh(v, faces)


def test_stretched_copy_scales_the_extent_along_the_axis_only():
    mesh = box_corners((0.2, 0.3, 0.1))
    copy = bench.stretched_copy(mesh, np.array([0.0, 0.0, 1.0]), 2.0, extent=0.9)
    size = copy.vertices.max(0) - copy.vertices.min(0)
    # z doubled (0.2 -> 0.4 of the longest side 0.6), then the longest side normalised to 0.9
    assert size == pytest.approx([0.6, 0.9, 0.6], abs=1e-9)
    same = bench.stretched_copy(mesh, np.array([0.0, 0.6, 0.8]), 1.0, extent=0.9)
    assert np.allclose(same.vertices.max(0) - same.vertices.min(0), [0.6, 0.9, 0.3])


def test_the_turned_world_seen_from_another_elevation_is_the_same_picture():
    cfg = bench.data_config(ROOT / "experiments" / "tiny" / "data.yaml", seed=3000)
    turn = bench.elevation_turn(130.0, 5.0, 35.0)
    assert turn @ camera_position(130.0, 5.0, 2.4) == pytest.approx(camera_position(130.0, 35.0, 2.4), abs=1e-12)
    mesh = normalize(generate_object(3, cfg.procedural).mesh, cfg.normalize_extent)[0]
    cond = Camera(130.0, 5.0, 2.4, 30.0, 64, 64)
    light = light_from_config(cfg.render)
    turned, turned_light, seen_from = bench.turned_world(mesh, light, cond, 35.0)
    renderer = RaycastRenderer(cfg.render)
    before = renderer.render_many(mesh, [cond], light)[0].rgba
    after = renderer.render_many(turned, [seen_from], turned_light)[0].rgba
    assert seen_from.elevation_deg == 35.0 and (before[..., 3] > 0.5).sum() > 100
    assert np.abs(after - before).max() < 1e-3


@pytest.fixture(scope="module")
def vae():
    return MultiViewDiffusionPipeline.from_pretrained(SHIPPED).vae


def test_alternatives_equal_to_the_object_score_one_and_a_stretch_costs_iou(monkeypatch, vae):
    # every condition at elevation 20 and no stretch: each alternative world is the object itself
    cfg = bench.data_config(ROOT / "experiments" / "tiny" / "data.yaml", seed=3000, orientation="any")
    cfg = replace(cfg, cond_elevation_min=20.0, cond_elevation_max=20.0)
    monkeypatch.setattr(bench, "prior_stretch", lambda rng: 1.0)
    same = bench.measure(cfg, objects=2, draws=1, vae=vae)
    for kind in bench.AMBIGUITIES:
        assert same[kind]["condition_mask_iou"] == 1.0 and same[kind]["sample"]["mask_iou"] == 1.0
        assert same[kind]["sample_vae"]["mask_iou"] == pytest.approx(same["truth_vae"]["mask_iou"])
    monkeypatch.setattr(bench, "prior_stretch", lambda rng: 1.5)
    stretched = bench.measure(cfg, objects=2, draws=1, vae=vae)["stretch"]
    upright = bench.measure(replace(cfg, procedural=replace(cfg.procedural, orientation="upright")), 1, 1, vae)
    assert "stretch" in upright and "elevation" not in upright  # upright objects show which way is up
    assert stretched["sample"]["mask_iou"] < 0.95
    assert stretched["condition_mask_iou"] > stretched["sample"]["mask_iou"]  # the input changes less than the views
