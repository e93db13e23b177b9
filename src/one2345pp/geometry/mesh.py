"""The in-memory mesh every part of the package works on.

A :class:`Mesh` is a triangle soup with indexed vertices plus everything needed to colour a surface point:

* ``face_uvs`` [F, 3, 2]: texture coordinates per face corner (OBJ convention: origin at the bottom-left of the
  image, v up), or ``None``;
* ``corner_colors`` [F, 3, 4]: RGBA per face corner in [0, 1] (vertex colours, or face colours repeated on the
  three corners), or ``None``;
* ``face_material`` [F] indexing ``materials``; a :class:`Material` has a base colour factor (RGBA in [0, 1]) and
  an optional base-colour texture (uint8 [H, W, 3|4]), an emissive colour (and texture), an ``unlit`` flag, an
  alpha mode and a double-sided flag (the glTF material model, see :class:`Material`).

All colours held here are display (sRGB-encoded) values in [0, 1], as the texture bytes are: readers of formats that
store linear values (glTF factors and COLOR_0) convert them when reading (:mod:`one2345pp.geometry.gltf`).

The albedo of a surface point is ``base_color * texture(uv) * corner_color`` (each factor present or 1), as in the
glTF metallic-roughness model's base colour; its emission is ``emissive * emissive_texture(uv)``. A renderer shows
``albedo * shading + emission`` (``albedo + emission`` for unlit materials); the colour of the surface itself (the
fine volume's colours) is ``albedo + emission``, clipped to [0, 1] (:meth:`Mesh.display_color`). Per-corner
attributes avoid vertex splitting at UV seams.

Barycentric coordinates follow open3d's ``primitive_uvs``: ``(b1, b2)`` with the point at
``(1 - b1 - b2) * v0 + b1 * v1 + b2 * v2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


class MeshError(ValueError):
    """A mesh file or mesh that cannot be used; the message names the file and what is wrong."""

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{source}: {reason}")


ALPHA_MODES = ("OPAQUE", "MASK", "BLEND")


def _as_texture(tex, what: str) -> np.ndarray | None:
    if tex is None:
        return None
    tex = np.asarray(tex)
    if tex.ndim == 2:
        tex = np.repeat(tex[..., None], 3, axis=-1)
    if tex.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8, got {tex.dtype}")
    return np.ascontiguousarray(tex)


@dataclass
class Material:
    """A surface material (glTF's model; every colour a display value in [0, 1]).

    * ``base_color`` RGBA factor times ``texture`` (sampled at the face UVs) times the corner colours: the albedo;
    * ``emissive`` RGB factor times ``emissive_texture`` (same UVs): light the surface gives off, added to the shaded
      albedo (a material with a black base colour and its colour in emission shows that colour);
    * ``unlit``: the albedo is shown as it is, without shading (glTF ``KHR_materials_unlit``);
    * ``alpha_mode``: ``OPAQUE`` (alpha ignored), ``MASK`` (alpha >= ``alpha_cutoff`` is opaque, below it
      invisible) or ``BLEND`` (alpha is coverage; surfaces behind show through). The default ``BLEND`` keeps the
      alpha of meshes made in code; the glTF reader uses the file's mode (``OPAQUE`` when absent);
    * ``double_sided``: both sides are meant to be seen. Renderers draw the back of single-sided faces too unless
      asked to cull them (``render.cull_back_faces``), as Blender's Cycles does.
    """

    name: str = "default"
    base_color: np.ndarray = field(default_factory=lambda: np.array([0.8, 0.8, 0.8, 1.0], dtype=np.float32))
    texture: np.ndarray | None = None  # uint8 [H, W, 3|4]
    emissive: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float32))
    emissive_texture: np.ndarray | None = None  # uint8 [H, W, 3|4], sampled at the face UVs
    unlit: bool = False
    alpha_mode: str = "BLEND"
    alpha_cutoff: float = 0.5
    double_sided: bool = True

    def __post_init__(self):
        self.base_color = np.asarray(self.base_color, dtype=np.float32).reshape(-1)
        if self.base_color.shape[0] == 3:
            self.base_color = np.concatenate([self.base_color, [1.0]]).astype(np.float32)
        self.emissive = np.asarray(self.emissive, dtype=np.float32).reshape(-1)[:3]
        self.texture = _as_texture(self.texture, f"material {self.name!r}: texture")
        self.emissive_texture = _as_texture(self.emissive_texture, f"material {self.name!r}: emissive texture")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(
                f"material {self.name!r}: alpha_mode must be one of {ALPHA_MODES}, got {self.alpha_mode!r}"
            )
        self.unlit, self.double_sided = bool(self.unlit), bool(self.double_sided)
        self.alpha_cutoff = float(self.alpha_cutoff)

    @property
    def emits(self) -> bool:
        return bool(self.emissive.max() > 0)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with repeat wrapping. ``uv`` [N, 2] in OBJ convention -> RGBA float32 [N, 4] in [0, 1].

    Only the four texels around each sample are converted to float, so large textures cost nothing extra.
    """
    h, w = texture.shape[:2]
    uv = np.asarray(uv, dtype=np.float32)
    x = (uv[:, 0] - np.floor(uv[:, 0])) * np.float32(w) - np.float32(0.5)
    y = (np.float32(1.0) - (uv[:, 1] - np.floor(uv[:, 1]))) * np.float32(h) - np.float32(0.5)
    x0f, y0f = np.floor(x), np.floor(y)
    fx, fy = (x - x0f)[:, None], (y - y0f)[:, None]
    x0, y0 = x0f.astype(np.int64) % w, y0f.astype(np.int64) % h
    x1, y1 = (x0 + 1) % w, (y0 + 1) % h
    flat = texture.reshape(h * w, -1)

    def texel(yy, xx):
        return flat.take(yy * w + xx, axis=0).astype(np.float32)

    top = texel(y0, x0) * (1 - fx) + texel(y0, x1) * fx
    bottom = texel(y1, x0) * (1 - fx) + texel(y1, x1) * fx
    rgba = (top * (1 - fy) + bottom * fy) * np.float32(1.0 / 255.0)
    if rgba.shape[1] == 3:
        rgba = np.concatenate([rgba, np.ones((len(rgba), 1), np.float32)], axis=1)
    return rgba


def _bary_weights(bary: np.ndarray) -> np.ndarray:
    bary = np.asarray(bary, dtype=np.float32)
    return np.stack([1.0 - bary[:, 0] - bary[:, 1], bary[:, 0], bary[:, 1]], axis=-1)


@dataclass
class Mesh:
    vertices: np.ndarray  # float64 [V, 3]
    faces: np.ndarray  # int64 [F, 3]
    face_uvs: np.ndarray | None = None  # float32 [F, 3, 2]
    corner_colors: np.ndarray | None = None  # float32 [F, 3, 4]
    face_material: np.ndarray | None = None  # int32 [F]
    materials: list[Material] = field(default_factory=lambda: [Material()])
    source: str = ""

    def __post_init__(self):
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.asarray(self.faces, dtype=np.int64).reshape(-1, 3)
        if self.face_material is None:
            self.face_material = np.zeros(len(self.faces), dtype=np.int32)
        self.face_material = np.asarray(self.face_material, dtype=np.int32)
        if self.face_uvs is not None:
            self.face_uvs = np.asarray(self.face_uvs, dtype=np.float32).reshape(-1, 3, 2)
        if self.corner_colors is not None:
            cc = np.asarray(self.corner_colors, dtype=np.float32).reshape(len(self.faces), 3, -1)
            if cc.shape[-1] == 3:
                cc = np.concatenate([cc, np.ones(cc.shape[:2] + (1,), np.float32)], axis=-1)
            self.corner_colors = cc
        if not self.materials:
            self.materials = [Material()]

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    @property
    def bounds(self) -> np.ndarray:
        return np.stack([self.vertices.min(0), self.vertices.max(0)])

    def face_normals(self) -> np.ndarray:
        """Unit face normals [F, 3] (zero for degenerate faces)."""
        tri = self.vertices[self.faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)

    def face_areas(self) -> np.ndarray:
        tri = self.vertices[self.faces]
        return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)

    def vertex_normals(self) -> np.ndarray:
        """Area-weighted unit vertex normals [V, 3]."""
        tri = self.vertices[self.faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
        vn = np.zeros_like(self.vertices)
        for k in range(3):
            np.add.at(vn, self.faces[:, k], n)
        norm = np.linalg.norm(vn, axis=1, keepdims=True)
        return np.divide(vn, norm, out=np.zeros_like(vn), where=norm > 0)

    def transformed(self, scale: float, offset: np.ndarray) -> Mesh:
        """A copy with vertices ``v * scale + offset`` (colours untouched)."""
        return replace(self, vertices=self.vertices * scale + np.asarray(offset, dtype=np.float64))

    # --- appearance -----------------------------------------------------------------------------------------
    def surface_color(self, face_ids: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """Albedo RGBA float32 [N, 4] in [0, 1] at the surface points given by face ids and barycentrics (b1, b2);
        alpha is the coverage after the material's alpha mode (1 for OPAQUE, 0 or 1 for MASK)."""
        return self.surface_appearance(face_ids, bary)[0]

    def surface_appearance(self, face_ids: np.ndarray, bary: np.ndarray):
        """``(albedo RGBA [N, 4], emission RGB [N, 3] or None, unlit bool [N] or None)`` at surface points (see
        :meth:`surface_color`); ``None`` where no material of the mesh emits / is unlit."""
        face_ids = np.asarray(face_ids, dtype=np.int64).reshape(-1)
        n = len(face_ids)
        out = np.ones((n, 4), dtype=np.float32)
        emits = any(m.emits for m in self.materials)
        emission = np.zeros((n, 3), dtype=np.float32) if emits else None
        unlit = np.zeros(n, dtype=bool) if any(m.unlit for m in self.materials) else None
        if n == 0:
            return out, emission, unlit
        w = _bary_weights(np.asarray(bary).reshape(-1, 2))
        if self.corner_colors is not None:
            out *= np.einsum("nk,nkc->nc", w, self.corner_colors[face_ids])
        mat_ids = self.face_material[face_ids]
        for m_id in np.unique(mat_ids):
            sel = np.nonzero(mat_ids == m_id)[0]
            mat = self.materials[int(m_id)]
            col = np.broadcast_to(mat.base_color, (len(sel), 4)).copy()
            uv = None
            if self.face_uvs is not None and (mat.texture is not None or mat.emissive_texture is not None):
                uv = np.einsum("nk,nkc->nc", w[sel], self.face_uvs[face_ids[sel]])
            if mat.texture is not None and uv is not None:
                col *= sample_texture(mat.texture, uv)
            col *= out[sel]
            if mat.alpha_mode == "OPAQUE":
                col[:, 3] = 1.0
            elif mat.alpha_mode == "MASK":
                col[:, 3] = (col[:, 3] >= mat.alpha_cutoff).astype(np.float32)
            out[sel] = col
            if emission is not None and mat.emits:
                em = np.broadcast_to(mat.emissive, (len(sel), 3)).copy()
                if mat.emissive_texture is not None and uv is not None:
                    em *= sample_texture(mat.emissive_texture, uv)[:, :3]
                emission[sel] = em
            if unlit is not None and mat.unlit:
                unlit[sel] = True
        return out, emission, unlit

    def display_color(self, face_ids: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """RGB float32 [N, 3]: the colour of the surface itself, ``albedo + emission`` clipped to [0, 1] (what the
        fine volume stores; independent of lighting)."""
        albedo, emission, _ = self.surface_appearance(face_ids, bary)
        rgb = albedo[:, :3]
        if emission is not None:
            rgb = np.clip(rgb + emission, 0.0, 1.0)
        return rgb

    # --- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`MeshError` naming ``self.source`` when the mesh cannot be used."""
        src = self.source or "<mesh>"
        if self.num_vertices == 0:
            raise MeshError(src, "empty mesh: no vertices")
        if self.num_faces == 0:
            raise MeshError(src, "no faces (a point cloud or an empty mesh)")
        if not np.isfinite(self.vertices).all():
            bad = int((~np.isfinite(self.vertices)).any(axis=1).sum())
            raise MeshError(src, f"{bad} vertices have NaN or infinite coordinates")
        if self.faces.min() < 0 or self.faces.max() >= self.num_vertices:
            raise MeshError(src, f"face indices outside [0, {self.num_vertices})")
        extent = np.ptp(self.vertices[np.unique(self.faces)], axis=0)
        if extent.max() <= 0:
            raise MeshError(src, "degenerate: all vertices coincide")
        if (self.face_areas() <= 1e-12 * extent.max() ** 2).all():
            raise MeshError(src, "degenerate: every face has zero area")
        if len(self.face_material) != self.num_faces or self.face_material.max() >= len(self.materials):
            raise MeshError(src, "face material ids do not match the materials list")


def concatenate(meshes: list[Mesh], source: str = "") -> Mesh:
    """One mesh holding all parts (materials are appended, per-corner attributes filled where a part lacks them)."""
    if not meshes:
        raise ValueError("concatenate needs at least one mesh")
    verts, faces, uvs, cols, mats, fmat = [], [], [], [], [], []
    any_uv = any(m.face_uvs is not None for m in meshes)
    any_col = any(m.corner_colors is not None for m in meshes)
    v_off = 0
    for m in meshes:
        verts.append(m.vertices)
        faces.append(m.faces + v_off)
        v_off += m.num_vertices
        fmat.append(m.face_material + len(mats))
        mats.extend(m.materials)
        if any_uv:
            uvs.append(m.face_uvs if m.face_uvs is not None else np.zeros((m.num_faces, 3, 2), np.float32))
        if any_col:
            cols.append(m.corner_colors if m.corner_colors is not None else np.ones((m.num_faces, 3, 4), np.float32))
    return Mesh(
        np.concatenate(verts),
        np.concatenate(faces),
        np.concatenate(uvs) if any_uv else None,
        np.concatenate(cols) if any_col else None,
        np.concatenate(fmat),
        mats,
        source=source or meshes[0].source,
    )
