"""open3d ``RaycastingScene`` construction shared by the renderer and the ground-truth volumes."""

from __future__ import annotations

import numpy as np

from ..utils.optional import require
from .mesh import Mesh


def build_scene(mesh: Mesh):
    """A RaycastingScene holding ``mesh`` as geometry 0 (primitive ids are the mesh's face indices)."""
    o3d = require("open3d")
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(mesh.faces, dtype=np.uint32)),
    )
    return scene


def to_o3d(array: np.ndarray):
    """A float32 open3d tensor from a numpy array."""
    o3d = require("open3d")
    return o3d.core.Tensor(np.ascontiguousarray(array, dtype=np.float32))
