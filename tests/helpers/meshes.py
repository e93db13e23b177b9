"""Small meshes that several tests build."""

from __future__ import annotations

import numpy as np
import trimesh

from one2345pp.geometry.mesh import Material, Mesh


def icosphere(radius: float, subdivisions: int = 3, material: Material | None = None) -> Mesh:
    """trimesh's icosphere as a :class:`Mesh`, with one ``material`` (the Mesh default when None)."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    materials = [material] if material is not None else [Material()]
    return Mesh(np.asarray(sphere.vertices), np.asarray(sphere.faces), materials=materials)
