"""The retrieval-ceiling benchmark: zoom 1 is plain compositing and zoom 2 doubles a centred object's extent, the
nearest silhouette of an exact copy is the copy, and a training set holding copies of the held-out pairs scores a
perfect 1-NN."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_retrieval_ceiling as bench  # noqa: E402

from one2345pp.models.multiview_pipeline import GRAY  # noqa: E402

V = 16


def square_grid(half: int, value: int = 200) -> np.ndarray:
    """RGBA uint8 grid of six V x V views, each with an opaque centred square of side 2 * half."""
    g = np.zeros((3 * V, 2 * V, 4), np.uint8)
    for r in range(3):
        for c in range(2):
            y, x = r * V + V // 2, c * V + V // 2
            g[y - half : y + half, x - half : x + half] = (value, 40, 90, 255)
    return g


def test_zoom_one_is_plain_compositing_and_zoom_two_doubles_the_extent():
    grid = square_grid(2)
    plain = bench.grids_on_gray(grid[None])
    assert plain.shape == (1, 3, 3 * V, 2 * V)
    torch.testing.assert_close(plain[0, :, V // 2, V // 2], torch.tensor([200, 40, 90]) / 255.0)
    torch.testing.assert_close(plain[0, :, 0, 0], torch.full((3,), GRAY))
    same = bench.grids_on_gray(grid[None], np.array([1.0]))
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    zoomed = bench.silhouette(bench.grids_on_gray(grid[None], np.array([2.0])))[0]
    doubled = bench.silhouette(bench.grids_on_gray(square_grid(4)[None]))[0]
    # bilinear resampling softens the edges: the doubled square, grown by at most one partly covered pixel a side
    assert bool((zoomed | ~doubled).all())
    grown = torch.nn.functional.max_pool2d(doubled[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
    assert bool((~zoomed | grown).all())


def test_the_nearest_silhouette_of_a_copy_is_the_copy():
    rng = np.random.default_rng(0)
    train = rng.random((10, 64)) > 0.5
    held = train[[7, 2]]
    assert bench.nearest(held, train, 3)[:, 0].tolist() == [7, 2]


def test_copies_of_the_held_out_pairs_score_a_perfect_nearest_neighbour():
    grids = np.stack([square_grid(h, v) for h, v in ((2, 200), (5, 30), (7, 120))])
    sil = np.stack([bench.silhouette(bench.grids_on_gray(g[None]))[0, :V, :V].flatten().numpy() for g in grids])
    held = {"sil": sil, "grids": grids, "shares": np.array([0.3, 0.6, 0.9])}
    noise = np.random.default_rng(1).random(sil.shape) > 0.5
    train = {
        "sil": np.concatenate([noise, sil]),
        "grids": np.concatenate([grids[::-1], grids]),
        "shares": np.array([0.9, 0.6, 0.3, 0.3, 0.6, 0.9]),
    }
    for scale_fill in (None, 0.6):
        r = bench.score_subset(held, train, np.arange(6), 1, scale_fill)
        assert r["nn1_mask_iou"] == pytest.approx(1.0)
        assert r["knn_mean_mask_iou"] == pytest.approx(1.0)
        assert r["nn1_psnr"] > 60
    other = bench.score_subset(held, train, np.arange(3), 1)  # only the noise silhouettes to pick from
    assert other["nn1_mask_iou"] < 1.0
