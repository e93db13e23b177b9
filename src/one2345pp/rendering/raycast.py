"""CPU renderer on open3d's ``RaycastingScene`` with adaptive supersampling.

One ray per pixel centre gives face ids, depth, normals and a first colour. Pixels with a different face id in
their 3x3 neighbourhood are re-cast with ``s x s`` sub-samples on a regular sub-pixel grid (one per stratum) and
their premultiplied colour and coverage averaged: always at hit/miss boundaries, and at triangle edges inside the
object when the premultiplied colour across the edge differs by more than ``edge_contrast`` (a triangle edge
between similarly coloured pixels looks the same after averaging, so it is not worth the rays;
``edge_contrast=0`` supersamples every triangle edge). For odd ``s`` the centre ray is reused as the middle
sub-sample.

Materials (:class:`~one2345pp.geometry.mesh.Material`): ``albedo * shading + emission``, or ``albedo + emission``
for unlit materials. Where the surface hit is not opaque (alpha below 1 after the material's alpha mode: a MASK
texel under the cutoff, a BLEND surface, or the back of a single-sided face with ``render.cull_back_faces``), the
ray goes on from just behind the hit, up to :data:`MAX_LAYERS` surfaces, and the layers are composited front to
back; depth, normal and face id are those of the first surface with alpha above 0. Meshes whose surfaces are all
opaque cast each ray once.

Only the pixels inside the projected bounding box of the mesh (plus one pixel) are cast. Ray directions are
scaled so that their camera-space z component is 1, so open3d's hit distance *is* the camera z-depth. The open3d
scene and the normals are built once per mesh (keyed on the mesh object) and reused for every view of it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from ..cameras import Camera
from ..geometry.mesh import Mesh
from ..geometry.raycasting import build_scene
from ..utils.optional import require
from .base import Light, RenderConfig, Renderer, RenderOutput, background_color, light_from_config

__all__ = ["RaycastRenderer", "edge_pixels"]

SMOOTH_NORMAL_AGREEMENT = 0.8  # the interpolated vertex normal is used where its dot with the face normal exceeds this
COPLANAR_TOLERANCE = 1e-5  # faces whose unit normals have a dot product above 1 - this are coplanar
PAIR_STRIDE = 1 << 31  # key of an unordered face pair: min(f, g) * PAIR_STRIDE + max(f, g)
MAX_LAYERS = 8  # surfaces a ray passes through (transparent / masked / culled hits) before it stops
STEP_PAST_HIT = 1e-5  # relative to the bounding-box diagonal: where a ray resumes behind a non-opaque hit


@dataclass
class _MeshCache:
    """Per-mesh data shared by all views: the scene, the bounding box, face normals and corner vertex normals."""

    mesh_ref: weakref.ref
    vertices: np.ndarray
    faces: np.ndarray
    scene: object
    corners: np.ndarray  # float64 [8, 3] bounding-box corners
    face_normals: np.ndarray  # float32 [F, 3] unit
    corner_normals: np.ndarray  # float32 [F, 9] unit vertex normals of the three corners
    smooth_pairs: np.ndarray  # int64 sorted pair keys of faces joined by a seamless edge
    single_sided: np.ndarray | None  # bool [F]: faces whose backs are culled (render.cull_back_faces), or None
    step: float  # how far past a non-opaque hit a ray resumes

    def matches(self, mesh: Mesh) -> bool:
        return self.mesh_ref() is mesh and mesh.vertices is self.vertices and mesh.faces is self.faces


def smooth_face_pairs(mesh: Mesh, face_normals: np.ndarray, vertex_normals: np.ndarray) -> np.ndarray:
    """Sorted keys ``min(f, g) * PAIR_STRIDE + max(f, g)`` of faces that share vertices at all of which the rendered
    surface is continuous: same material, equal corner UVs and corner colours, and the same shading normal on both
    sides (the vertex normal agrees with both face normals, or the faces are coplanar). For faces sharing an edge this
    makes the edge seamless; for faces sharing one vertex it is the test at that vertex."""
    faces = mesh.faces
    n_faces = len(faces)
    corner_vertex = faces.reshape(-1)
    order = np.argsort(corner_vertex, kind="stable")  # face corners grouped by vertex
    vert = corner_vertex[order]
    face, corner = np.divmod(order, 3)
    coplanar_dot = 1.0 - COPLANAR_TOLERANCE
    keys, good = [], []
    first = np.arange(len(vert) - 1)
    step = 1
    while len(first):  # pair every corner with the corners `step` places later at the same vertex
        first = first[first + step < len(vert)]
        first = first[vert[first] == vert[first + step]]
        if not len(first):
            break
        second = first + step
        f, g, v = face[first], face[second], vert[first]
        ok = (f != g) & (mesh.face_material[f] == mesh.face_material[g])
        for attr, tol in ((mesh.face_uvs, 1e-5), (mesh.corner_colors, 1e-3)):
            if attr is not None:
                ok &= (np.abs(attr[f, corner[first]] - attr[g, corner[second]]) <= tol).all(axis=1)
        vn = vertex_normals[v]
        smooth = np.einsum("nc,nc->n", vn, face_normals[f]) > SMOOTH_NORMAL_AGREEMENT
        smooth &= np.einsum("nc,nc->n", vn, face_normals[g]) > SMOOTH_NORMAL_AGREEMENT
        ok &= smooth | (np.einsum("nc,nc->n", face_normals[f], face_normals[g]) > coplanar_dot)
        keys.append(np.minimum(f, g) * PAIR_STRIDE + np.maximum(f, g))
        good.append(ok)
        step += 1
    if not keys or n_faces < 2:
        return np.zeros(0, dtype=np.int64)
    keys, good = np.concatenate(keys), np.concatenate(good)
    seamless, broken = _sorted_unique(keys[good]), _sorted_unique(keys[~good])
    # a pair is seamless only if it is continuous at every shared vertex
    pos = np.minimum(np.searchsorted(broken, seamless), max(len(broken) - 1, 0))
    return seamless if not len(broken) else seamless[broken[pos] != seamless]


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _pairs(h: int, w: int):
    """The four 8-connectivity neighbour directions as pairs of slices (pixel a, its neighbour b)."""
    full = slice(None)
    return [
        ((full, slice(0, w - 1)), (full, slice(1, w))),
        ((slice(0, h - 1), full), (slice(1, h), full)),
        ((slice(0, h - 1), slice(0, w - 1)), (slice(1, h), slice(1, w))),
        ((slice(0, h - 1), slice(1, w)), (slice(1, h), slice(0, w - 1))),
    ]


def _max_abs_diff(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.abs(x - y)
    out = d[..., 0]
    for c in range(1, d.shape[-1]):
        out = np.maximum(out, d[..., c])
    return out


def edge_pixels(
    face_ids: np.ndarray,
    premult: np.ndarray,
    contrast: float,
    smooth_pairs: np.ndarray | None = None,
    back: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels to supersample, bool [H, W]: pixels with a 3x3 neighbour of a different face id, where one of the two
    is empty (-1), or (with ``contrast`` > 0) where their premultiplied RGBA (``premult`` [H, W, 4]) differs by more
    than ``contrast`` in some channel and the two faces are not a seamless pair of ``smooth_pairs`` (keys of
    :func:`smooth_face_pairs`) seen from the same side (``back`` bool [H, W]: the back of the face was hit).
    ``contrast=0`` marks every pixel next to a different face id."""
    h, w = face_ids.shape
    mark = np.zeros((h, w), dtype=bool)
    seams = contrast > 0 and smooth_pairs is not None and len(smooth_pairs) > 0
    for a, b in _pairs(h, w):
        fa, fb = face_ids[a], face_ids[b]
        pair = fa != fb
        if contrast > 0:
            boundary = (fa < 0) | (fb < 0)
            inner = pair & ~boundary & (_max_abs_diff(premult[a], premult[b]) > contrast)
            if seams and inner.any():
                ka, kb = fa[inner], fb[inner]
                key = np.minimum(ka, kb) * PAIR_STRIDE + np.maximum(ka, kb)
                pos = np.minimum(np.searchsorted(smooth_pairs, key), len(smooth_pairs) - 1)
                seamless = smooth_pairs[pos] == key
                if back is not None:
                    seamless &= back[a][inner] == back[b][inner]
                inner[inner] = ~seamless
            pair = (pair & boundary) | inner
        mark[a] |= pair
        mark[b] |= pair
    return mark


class RaycastRenderer(Renderer):
    """Lambert + ambient shading of textured meshes by ray casting, with adaptive anti-aliasing."""

    def __init__(self, cfg: RenderConfig | None = None, edge_contrast: float = 1.0 / 64.0):
        self.cfg = cfg if cfg is not None else RenderConfig()
        if not isinstance(self.cfg.background, str):
            raise ValueError(f"render background must be 'gray' or 'white', got {self.cfg.background!r}")
        self.background = background_color(self.cfg.background)
        self.supersample = int(self.cfg.supersample)
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.cfg.supersample}")
        if edge_contrast < 0:
            raise ValueError(f"edge_contrast must be >= 0, got {edge_contrast}")
        self.edge_contrast = float(edge_contrast)
        self.threads = int(self.cfg.threads)
        self.cull_back_faces = bool(getattr(self.cfg, "cull_back_faces", False))
        self._o3d = require("open3d")
        self._cache: _MeshCache | None = None

    # --- per-mesh data ----------------------------------------------------------------------------------------
    def _mesh_data(self, mesh: Mesh) -> _MeshCache:
        if self._cache is not None and self._cache.matches(mesh):
            return self._cache
        self._cache = None  # release the previous scene before building the next one
        lo, hi = mesh.bounds
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        vn = mesh.vertex_normals().astype(np.float32)
        fn = mesh.face_normals().astype(np.float32)
        adaptive = self.supersample > 1 and self.edge_contrast > 0
        single = None
        if self.cull_back_faces and not all(m.double_sided for m in mesh.materials):
            single = ~np.array([m.double_sided for m in mesh.materials])[mesh.face_material]
        self._cache = _MeshCache(
            mesh_ref=weakref.ref(mesh),
            vertices=mesh.vertices,
            faces=mesh.faces,
            scene=build_scene(mesh),
            corners=corners,
            face_normals=fn,
            corner_normals=np.ascontiguousarray(vn[mesh.faces].reshape(-1, 9)),
            smooth_pairs=smooth_face_pairs(mesh, fn, vn) if adaptive else np.zeros(0, np.int64),
            single_sided=single,
            step=STEP_PAST_HIT * max(float(np.linalg.norm(hi - lo)), 1e-12),
        )
        return self._cache

    # --- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def _roi(camera: Camera, corners: np.ndarray) -> tuple[int, int, int, int]:
        """Pixel rectangle (row0, row1, col0, col1) that holds every pixel the mesh can touch, plus a 1-pixel rim."""
        h, w = camera.height, camera.width
        uv, z = camera.project(corners)
        if not (z > 1e-9).all():  # the box reaches behind the camera: no finite bound
            return 0, h, 0, w
        c0 = max(0, math.floor(uv[:, 0].min()) - 1)
        c1 = min(w, math.ceil(uv[:, 0].max()) + 1)
        r0 = max(0, math.floor(uv[:, 1].min()) - 1)
        r1 = min(h, math.ceil(uv[:, 1].max()) + 1)
        return r0, max(r0, r1), c0, max(c0, c1)

    def _cast(self, scene, origin: np.ndarray, dirs: np.ndarray):
        """(hit bool [N], depth float32 [N], face int64 [N] (-1 = miss), bary float32 [N, 2]) of rays ``dirs``."""
        rays = np.empty((len(dirs), 6), dtype=np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = dirs
        res = scene.cast_rays(self._o3d.core.Tensor(rays), nthreads=self.threads)
        t = res["t_hit"].numpy()
        hit = np.isfinite(t)
        face = res["primitive_ids"].numpy().astype(np.int64)
        face[~hit] = -1
        return hit, t, face, res["primitive_uvs"].numpy()

    def _shade(
        self, mesh: Mesh, data: _MeshCache, light: Light, face: np.ndarray, bary: np.ndarray, dirs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Straight RGBA float32 [N, 4], unit shading normals facing the rays [N, 3] and whether the back side of the
        face was hit (bool [N]), at hit points."""
        fn = data.face_normals.take(face, axis=0)
        cn = data.corner_normals.take(face, axis=0)
        b1, b2 = bary[:, 0:1], bary[:, 1:2]
        vn = cn[:, 0:3] * (1.0 - b1 - b2) + cn[:, 3:6] * b1 + cn[:, 6:9] * b2
        vn *= (1.0 / np.sqrt(np.maximum(np.einsum("nc,nc->n", vn, vn), 1e-24)))[:, None]
        smooth = np.einsum("nc,nc->n", vn, fn) > SMOOTH_NORMAL_AGREEMENT
        n = np.where(smooth[:, None], vn, fn)
        back = np.einsum("nc,nc->n", fn, dirs) > 0.0
        n *= np.where(back, np.float32(-1.0), np.float32(1.0))[:, None]  # two-sided: turn towards the camera
        ndotl = n @ light.direction.astype(np.float32)
        lambert = np.float32(light.ambient) + np.float32(light.diffuse) * np.maximum(ndotl, 0.0)
        rgba, emission, unlit = mesh.surface_appearance(face, bary)
        if unlit is not None:
            lambert[unlit] = 1.0
        rgba[:, :3] *= lambert[:, None]
        if emission is not None:
            rgba[:, :3] += emission
        if data.single_sided is not None:
            rgba[back & data.single_sided.take(face), 3] = 0.0
        np.clip(rgba, 0.0, 1.0, out=rgba)
        return rgba, n, back

    def _trace(self, mesh: Mesh, data: _MeshCache, light: Light, origin: np.ndarray, dirs: np.ndarray):
        """Cast and shade rays ``dirs`` [N, 3] from ``origin``, passing through non-opaque surfaces (module doc).

        Returns (hit, depth, face, bary, straight RGBA [N, 4], normals [N, 3], back [N]) of the first surface with
        alpha above 0; RGBA is the front-to-back composite of the layers the ray went through."""
        n = len(dirs)
        hit, depth, face, bary = self._cast(data.scene, origin, dirs)
        idx = np.flatnonzero(hit)
        rgba_h, normals_h, back_h = self._shade(mesh, data, light, face[idx], bary[idx], dirs[idx])
        rgba = np.zeros((n, 4), dtype=np.float32)
        normals = np.zeros((n, 3), dtype=np.float32)
        back = np.zeros(n, dtype=bool)
        rgba[idx], normals[idx], back[idx] = rgba_h, normals_h, back_h
        rows = idx[rgba_h[:, 3] < 1.0]
        if not len(rows):
            return hit, depth, face, bary, rgba, normals, back
        premult = rgba.copy()
        premult[:, :3] *= rgba[:, 3:4]
        unseen = rows[rgba[rows, 3] <= 0.0]  # first hit invisible: report the next visible surface instead
        hit[unseen], face[unseen] = False, -1
        travelled = depth[rows].astype(np.float64)
        for _ in range(MAX_LAYERS - 1):
            start = origin + dirs[rows] * (travelled + data.step)[:, None].astype(np.float32)
            h2, t2, f2, b2 = self._cast(data.scene, start, dirs[rows])
            keep = h2
            rows, travelled = rows[keep], travelled[keep] + data.step + t2[keep]
            f2, b2 = f2[keep], b2[keep]
            if not len(rows):
                break
            c2, n2, back2 = self._shade(mesh, data, light, f2, b2, dirs[rows])
            a_acc = premult[rows, 3]
            w = (1.0 - a_acc) * c2[:, 3]
            premult[rows, :3] += w[:, None] * c2[:, :3]
            premult[rows, 3] = a_acc + w
            first = ~hit[rows] & (c2[:, 3] > 0.0)
            sel = rows[first]
            hit[sel], depth[sel], face[sel], bary[sel] = True, travelled[first], f2[first], b2[first]
            normals[sel], back[sel] = n2[first], back2[first]
            still = premult[rows, 3] < 1.0 - 1e-6
            rows, travelled = rows[still], travelled[still]
            if not len(rows):
                break
        alpha = premult[:, 3:4]
        rgba[:, :3] = np.divide(premult[:, :3], alpha, out=np.zeros_like(premult[:, :3]), where=alpha > 0)
        rgba[:, 3] = premult[:, 3]
        np.clip(rgba, 0.0, 1.0, out=rgba)
        return hit, depth, face, bary, rgba, normals, back

    @staticmethod
    def _directions(camera: Camera, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """World ray directions float32 [N, 3] (camera-space z = 1) through pixel coordinates ``u``, ``v`` [N]."""
        K, rot = camera.K, camera.c2w[:3, :3].astype(np.float32)
        x = ((u - K[0, 2]) / K[0, 0]).astype(np.float32)
        y = ((v - K[1, 2]) / K[1, 1]).astype(np.float32)
        return x[:, None] * rot[:, 0] + y[:, None] * rot[:, 1] + rot[:, 2]

    def _empty(self, h: int, w: int) -> RenderOutput:
        rgba = np.zeros((h, w, 4), dtype=np.float32)
        rgba[..., :3] = self.background
        return RenderOutput(
            rgba,
            np.zeros((h, w), np.float32),
            np.zeros((h, w, 3), np.float32),
            np.full((h, w), -1, np.int64),
            self.background.copy(),
        )

    # --- rendering ----------------------------------------------------------------------------------------------
    def render(self, mesh: Mesh, camera: Camera, light: Light | None = None) -> RenderOutput:
        if light is None:
            if self.cfg.random_lighting:
                raise ValueError("random_lighting is drawn per object: pass light=light_from_config(cfg, rng)")
            light = light_from_config(self.cfg)
        out = self._empty(camera.height, camera.width)
        if mesh.num_faces == 0:
            return out
        data = self._mesh_data(mesh)
        r0, r1, c0, c1 = self._roi(camera, data.corners)
        h, w = r1 - r0, c1 - c0
        if h == 0 or w == 0:
            return out
        origin = camera.position.astype(np.float32)

        # One ray through every pixel centre of the region of interest.
        vv, uu = np.mgrid[r0:r1, c0:c1]
        dirs = self._directions(camera, uu.ravel() + 0.5, vv.ravel() + 0.5)
        hit, depth, face, _, rgba, normals, back = self._trace(mesh, data, light, origin, dirs)

        s = self.supersample
        if s > 1:
            premult = rgba.copy()
            premult[:, :3] *= rgba[:, 3:4]
            edge = edge_pixels(
                face.reshape(h, w), premult.reshape(h, w, 4), self.edge_contrast, data.smooth_pairs, back.reshape(h, w)
            )
            edge = np.flatnonzero(edge)
            if len(edge):
                row, col = np.divmod(edge, w)
                rgba[edge] = self._supersample(
                    mesh, data, light, camera, origin, col + c0 + 0.5, row + r0 + 0.5, premult[edge], s
                )
        rgba[rgba[:, 3] <= 0.0, :3] = self.background

        depth[~hit] = 0.0
        out.rgba[r0:r1, c0:c1] = rgba.reshape(h, w, 4)
        out.depth[r0:r1, c0:c1] = depth.reshape(h, w)
        out.normals[r0:r1, c0:c1] = normals.reshape(h, w, 3)
        out.face_ids[r0:r1, c0:c1] = face.reshape(h, w)
        return out

    def _supersample(
        self,
        mesh: Mesh,
        data: _MeshCache,
        light: Light,
        camera: Camera,
        origin: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        centre_premult: np.ndarray,
        s: int,
    ) -> np.ndarray:
        """Straight RGBA [P, 4] of the pixels with centres ``u``, ``v`` [P] averaged over s x s sub-samples.

        For odd ``s`` the middle sub-sample is the pixel centre, whose premultiplied colour is ``centre_premult``."""
        offsets = (np.arange(s, dtype=np.float64) + 0.5) / s - 0.5
        ox, oy = (o.reshape(-1) for o in np.meshgrid(offsets, offsets))
        reuse = s % 2 == 1
        if reuse:
            keep = (ox != 0.0) | (oy != 0.0)
            ox, oy = ox[keep], oy[keep]
        k = len(ox)
        su = (u[:, None] + ox[None, :]).reshape(-1)
        sv = (v[:, None] + oy[None, :]).reshape(-1)
        dirs = self._directions(camera, su, sv)
        rgba = self._trace(mesh, data, light, origin, dirs)[4]
        premult = rgba.copy()
        premult[:, :3] *= rgba[:, 3:4]
        total = premult.reshape(len(u), k, 4).sum(axis=1)
        if reuse:
            total += centre_premult
        mean = total / np.float32(s * s)
        cov = mean[:, 3:4]
        mean[:, :3] = np.divide(mean[:, :3], cov, out=np.zeros_like(mean[:, :3]), where=cov > 0)
        np.clip(mean, 0.0, 1.0, out=mean)
        return mean
