"""The view-ceiling benchmark: a stretched copy scales only the extent along its axis, an unstretched copy scores
exactly like the object itself, and a stretch costs silhouette IoU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_view_ceiling as bench  # noqa: E402

from one2345pp.geometry.mesh import Mesh  # noqa: E402
from one2345pp.models.multiview_pipeline import MultiViewDiffusionPipeline  # noqa: E402

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


@pytest.fixture(scope="module")
def vae():
    return MultiViewDiffusionPipeline.from_pretrained(SHIPPED).vae


def test_an_unstretched_copy_is_the_object_and_a_stretch_costs_iou(monkeypatch, vae):
    cfg = bench.data_config(ROOT / "experiments" / "tiny" / "data.yaml", seed=3000)
    monkeypatch.setattr(bench, "prior_stretch", lambda rng: 1.0)
    same = bench.measure(cfg, objects=2, draws=1, vae=vae)
    assert same["condition_mask_iou"] == 1.0 and same["sample"]["mask_iou"] == 1.0
    assert same["sample_vae"]["mask_iou"] == pytest.approx(same["truth_vae"]["mask_iou"])
    monkeypatch.setattr(bench, "prior_stretch", lambda rng: 1.5)
    stretched = bench.measure(cfg, objects=2, draws=1, vae=vae)
    assert stretched["sample"]["mask_iou"] < 0.95
    assert stretched["condition_mask_iou"] > stretched["sample"]["mask_iou"]  # the input changes less than the views
