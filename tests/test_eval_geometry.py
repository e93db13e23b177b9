"""Geometry metrics against an independent computation (scipy cKDTree) and alignment of a known rotation."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from one2345pp.evaluation.geometry import (
    AlignConfig,
    align,
    evaluate_meshes,
    fscore_chamfer,
    sample_surface,
    unit_box,
)
from one2345pp.geometry.mesh import Mesh


def _reference(pred, gt, tau):
    d_pg, _ = cKDTree(gt).query(pred)
    d_gp, _ = cKDTree(pred).query(gt)
    p, r = (d_pg < tau).mean(), (d_gp < tau).mean()
    return 2 * p * r / (p + r), (d_pg.mean() + d_gp.mean()) / 2


def test_fscore_chamfer_match_ckdtree():
    rng = np.random.default_rng(3)
    gt = rng.random((3000, 3))
    pred = gt[:2500] + rng.normal(0, 0.03, (2500, 3))
    got = fscore_chamfer(pred, gt, 0.05)
    f, ch = _reference(pred, gt, 0.05)
    assert got["fscore"] == pytest.approx(f, abs=1e-9)
    assert got["chamfer"] == pytest.approx(ch, rel=1e-6)
    assert 0.0 < got["fscore"] < 1.0


def test_identical_surfaces_score_one_and_shifted_ones_less():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    a, b = sample_surface(v, f, 20000, 0), sample_surface(v, f, 20000, 1)
    assert fscore_chamfer(a, b)["fscore"] > 0.99
    assert fscore_chamfer(a + [0.2, 0, 0], b)["fscore"] < 0.8


def test_sample_surface_is_area_uniform():
    # two unit squares in z=0 and a 2x-larger square at z=1: the large one should get 4/5 of the samples
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [2, 0, 1], [2, 2, 1], [0, 2, 1]], float)
    f = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    pts = sample_surface(v, f, 50000, 0)
    assert (pts[:, 2] > 0.5).mean() == pytest.approx(0.8, abs=0.01)


def _rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = math.radians(deg)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def _asymmetric_mesh() -> Mesh:
    # an L of two boxes plus a small box on top: no rotational symmetry
    boxes = [((0, 0, 0), (0.8, 0.3, 0.2)), ((0, 0.3, 0), (0.2, 0.7, 0.2)), ((0.6, 0, 0.2), (0.8, 0.15, 0.5))]
    verts, faces = [], []
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    for lo, hi in boxes:
        base = len(verts)
        verts += [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        for a, b, c, d in quads:
            faces += [(base + a, base + b, base + c), (base + a, base + c, base + d)]
    return Mesh(vertices=np.array(verts, float), faces=np.array(faces))


def test_alignment_recovers_a_known_rotation():
    gt = _asymmetric_mesh()
    rot = _rotation([0.3, -0.2, 1.0], 70.0) @ _rotation([1, 0, 0], 90.0)
    pred = Mesh(vertices=gt.vertices @ rot.T * 1.7 + [0.4, -1.0, 2.0], faces=gt.faces)
    p_pts = sample_surface(unit_box(pred.vertices), pred.faces, 20000, 0)
    g_pts = sample_surface(unit_box(gt.vertices), gt.faces, 20000, 1)
    transform, inliers = align(p_pts, g_pts, AlignConfig(azimuth_step_deg=30.0))
    recovered = transform[:3, :3] / np.cbrt(np.linalg.det(transform[:3, :3]))
    angle = math.degrees(math.acos(np.clip((np.trace(recovered @ rot) - 1) / 2, -1, 1)))
    assert angle < 2.0, f"recovered rotation is {angle:.2f} deg off"
    assert inliers > 0.98


def test_evaluate_meshes_aligned_vs_unaligned():
    gt = _asymmetric_mesh()
    rot = _rotation([0, 0, 1], 120.0)
    pred = Mesh(vertices=gt.vertices @ rot.T, faces=gt.faces)
    cfg = AlignConfig(azimuth_step_deg=30.0)
    aligned = evaluate_meshes(pred, gt, num_points=20000, align_cfg=cfg)
    raw = evaluate_meshes(pred, gt, num_points=20000, align_meshes=False)
    assert aligned.fscore > 0.97
    assert aligned.fscore > raw.fscore
    assert aligned.chamfer < raw.chamfer


def test_degenerate_input_errors():
    with pytest.raises(ValueError, match="degenerate bounding box"):
        unit_box(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="no faces"):
        sample_surface(np.zeros((3, 3)), np.zeros((0, 3), int), 10)


@pytest.mark.slow
def test_eval_mesh_cli(tmp_path, capsys):
    import json

    from one2345pp.cli import main
    from one2345pp.geometry.mesh_io import save_mesh

    gt = _asymmetric_mesh()
    pred = Mesh(vertices=gt.vertices @ _rotation([0, 0, 1], 90.0).T * 2.0, faces=gt.faces)
    save_mesh(gt, tmp_path / "gt.ply")
    save_mesh(pred, tmp_path / "pred.obj")
    assert (
        main(["eval", "mesh", str(tmp_path / "pred.obj"), str(tmp_path / "gt.ply"), "--json", "--points", "20000"]) == 0
    )
    aligned = json.loads(capsys.readouterr().out)
    assert aligned["fscore"] > 0.97 and aligned["aligned"] is True
    assert (
        main(
            [
                "eval",
                "mesh",
                str(tmp_path / "pred.obj"),
                str(tmp_path / "gt.ply"),
                "--no-align",
                "--json",
                "--points",
                "20000",
            ]
        )
        == 0
    )
    raw = json.loads(capsys.readouterr().out)
    assert raw["fscore"] < aligned["fscore"]
    assert main(["eval", "mesh", str(tmp_path / "missing.glb"), str(tmp_path / "gt.ply")]) == 2
    assert "missing.glb" in capsys.readouterr().err


def test_eval_mesh_reads_the_pipelines_glb_upright(tmp_path, capsys):
    """``mesh.glb`` as ``infer`` writes it (texture/export.save_glb, glTF's +Y up) scored without alignment against
    the same mesh as PLY (+Z up): the reader turns it back, so the two coincide."""
    import json

    from one2345pp.cli import main
    from one2345pp.geometry.mesh_io import save_mesh
    from one2345pp.texture.export import TexturedMesh, save_glb

    gt = _asymmetric_mesh()
    save_mesh(gt, tmp_path / "gt.ply")
    colours = np.tile([[0.9, 0.2, 0.1]], (len(gt.vertices), 1))
    save_glb(TexturedMesh(gt.vertices, gt.faces, vertex_colors=colours), tmp_path / "mesh.glb")
    argv = ["eval", "mesh", str(tmp_path / "mesh.glb"), str(tmp_path / "gt.ply"), "--no-align", "--json"]
    assert main([*argv, "--points", "20000"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["fscore"] > 0.99 and raw["chamfer"] < 0.01, raw
