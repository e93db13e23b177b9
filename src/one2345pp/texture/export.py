"""Textured meshes and their files: GLB (glTF 2.0, PBR base-colour texture or vertex colours), OBJ + MTL + PNG and
PLY (vertex colours).

A :class:`TexturedMesh` is what baking produces: indexed vertices that already carry one texture coordinate each
(the UV unwrap splits vertices along chart seams), unit vertex normals, and either a texture image or vertex
colours. Every writer keeps the vertex list as it is, so a reader that does not merge vertices gets back exactly
``num_vertices`` vertices.

Frames and colours. A :class:`TexturedMesh` is in the project's frame (+Z up) with display (sRGB) colours.

* GLB follows glTF 2.0 (as :func:`one2345pp.geometry.gltf.gltf_bytes` does): positions and normals are turned +Y up,
  ``(x, y, z) -> (x, z, -y)`` (:data:`~one2345pp.geometry.gltf.Z_UP_TO_Y_UP`, the inverse of the reader's turn; a
  proper rotation, so windings and outward normals stay), and ``COLOR_0`` holds linear values (sRGB decoded with
  :func:`~one2345pp.geometry.gltf.srgb_to_linear`, the inverse of what the reader applies). The base colour texture
  stays the sRGB-encoded PNG, as the specification wants. glTF viewers, Blender and
  :func:`one2345pp.geometry.mesh_io.load_mesh` (``up_axis="auto"``) therefore show the mesh upright in its colours.
* OBJ and PLY are written +Z up with sRGB colours, as they are, which is how the project's reader takes them.

* GLB: one mesh, one primitive (POSITION, NORMAL, TEXCOORD_0 or COLOR_0, uint32 indices), one material with
  ``metallicFactor`` 0, ``roughnessFactor`` 1 and the texture as ``baseColorTexture`` (PNG inside the binary chunk).
  glTF puts the UV origin at the top-left of the image, so ``t = 1 - v``. ``COLOR_0`` is float32 RGBA (linear 8-bit
  integers would lose dark shades: sRGB 30/255 would come back as 28/255).
* OBJ: ``v`` / ``vt`` / ``vn`` with the same index per corner, ``STEM.mtl`` with ``map_Kd STEM.png``; vertex colours
  as the ``v x y z r g b`` extension. +Z up.
* PLY: binary, vertices with normals and RGBA colours (a textured mesh is sampled at its vertices' UVs). +Z up.

Writes are atomic: a file is written under a temporary name in the target folder and renamed into place; the OBJ's
three files are written into a temporary folder first and moved, the ``.obj`` last.
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry.gltf import Z_UP_TO_Y_UP, GlbBuffer, srgb_to_linear
from ..geometry.mesh import Material, Mesh, sample_texture
from ..utils.atomic import atomic_files, write_bytes

__all__ = ["EXPORT_SUFFIXES", "TexturedMesh", "export_mesh", "save_glb", "save_obj", "save_ply"]

EXPORT_SUFFIXES = (".glb", ".obj", ".ply")

# glTF constants
_FLOAT, _UINT = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_TRIANGLES = 4


@dataclass
class TexturedMesh:
    vertices: np.ndarray  # float [V, 3]
    faces: np.ndarray  # int [F, 3]
    normals: np.ndarray | None = None  # float [V, 3], unit
    uvs: np.ndarray | None = None  # float [V, 2], OBJ convention (origin at the bottom-left of the image)
    texture: np.ndarray | None = None  # uint8 [H, W, 3 | 4], row 0 = top of the image
    vertex_colors: np.ndarray | None = None  # float [V, 3 | 4] in [0, 1]

    def __post_init__(self):
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.asarray(self.faces, dtype=np.int64).reshape(-1, 3)
        if self.normals is not None:
            self.normals = np.asarray(self.normals, dtype=np.float64).reshape(-1, 3)
        if self.uvs is not None:
            self.uvs = np.asarray(self.uvs, dtype=np.float64).reshape(-1, 2)
        if self.texture is not None:
            self.texture = np.ascontiguousarray(self.texture)
        if self.vertex_colors is not None:
            vc = np.asarray(self.vertex_colors, dtype=np.float64)
            self.vertex_colors = vc.reshape(len(vc), -1)
        self.validate()

    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    @property
    def textured(self) -> bool:
        return self.texture is not None

    def validate(self) -> None:
        v = self.num_vertices
        if v == 0 or self.num_faces == 0:
            raise ValueError(f"a textured mesh needs vertices and faces, got {v} vertices and {self.num_faces} faces")
        if self.faces.min() < 0 or self.faces.max() >= v:
            raise ValueError(f"face indices outside [0, {v})")
        if not np.isfinite(self.vertices).all():
            raise ValueError("vertices contain NaN or infinite values")
        for name in ("normals", "uvs", "vertex_colors"):
            arr = getattr(self, name)
            if arr is not None and (len(arr) != v or not np.isfinite(arr).all()):
                raise ValueError(f"{name} must hold one finite row per vertex ({v}), got shape {arr.shape}")
        if (self.texture is None) == (self.vertex_colors is None):
            raise ValueError("a textured mesh carries either a texture (with uvs) or vertex colours, exactly one")
        if self.texture is not None:
            tex = self.texture
            if tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[2] not in (3, 4) or min(tex.shape[:2]) < 1:
                raise ValueError(f"texture must be uint8 [H, W, 3|4], got {tex.dtype} {tex.shape}")
            if self.uvs is None:
                raise ValueError("a textured mesh needs per-vertex uvs")
        if self.vertex_colors is not None and self.vertex_colors.shape[1] not in (3, 4):
            raise ValueError(f"vertex colours must be RGB or RGBA, got {self.vertex_colors.shape[1]} channels")

    def vertex_rgba(self) -> np.ndarray:
        """RGBA float32 [V, 4] per vertex: the vertex colours, or the texture sampled (bilinear) at the vertex UVs."""
        if self.vertex_colors is not None:
            vc = self.vertex_colors.astype(np.float32)
            if vc.shape[1] == 3:
                vc = np.concatenate([vc, np.ones((len(vc), 1), np.float32)], axis=1)
            return np.clip(vc, 0.0, 1.0)
        return sample_texture(self.texture, self.uvs)

    def to_mesh(self) -> Mesh:
        """The package's :class:`Mesh` (per-corner UVs with one textured material, or corner colours)."""
        if self.texture is not None:
            mat = Material("baked", np.ones(4, np.float32), self.texture)
            return Mesh(self.vertices, self.faces, face_uvs=self.uvs[self.faces], materials=[mat])
        mat = Material("baked", np.ones(4, np.float32))
        return Mesh(self.vertices, self.faces, corner_colors=self.vertex_rgba()[self.faces], materials=[mat])


# ------------------------------------------------------------------------------------------------------- helpers
def _unit_normals(tm: TexturedMesh) -> np.ndarray:
    """float32 unit normals [V, 3]: the mesh's, else area-weighted ones; +Z where a vertex has none."""
    n = tm.normals
    if n is None:
        tri = tm.vertices[tm.faces]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n = np.zeros_like(tm.vertices)
        for k in range(3):
            np.add.at(n, tm.faces[:, k], fn)
    n = n.astype(np.float64)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    out = np.divide(n, norm, out=np.zeros_like(n), where=norm > 1e-12)
    out[norm[:, 0] <= 1e-12] = (0.0, 0.0, 1.0)
    out = out.astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)  # renormalise after the float32 cast


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _rgba8(colors: np.ndarray) -> np.ndarray:
    return np.clip(np.round(colors * 255.0), 0, 255).astype(np.uint8)


def _target(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"cannot write {path} as {suffix}: the file name must end in {suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------- GLB
def glb_bytes(tm: TexturedMesh) -> bytes:
    """The GLB file of ``tm`` in glTF's convention: +Y up, linear ``COLOR_0`` (see the module docstring)."""
    b = GlbBuffer()
    positions = (tm.vertices @ Z_UP_TO_Y_UP.T).astype(np.float32)  # +Z up -> glTF's +Y up
    normals = _unit_normals(tm) @ Z_UP_TO_Y_UP.T.astype(np.float32)  # a signed permutation: still unit length
    attributes = {
        "POSITION": b.accessor(positions, _FLOAT, "VEC3", _ARRAY_BUFFER, bounds=True),
        "NORMAL": b.accessor(normals, _FLOAT, "VEC3", _ARRAY_BUFFER),
    }
    material: dict = {"name": "baked", "doubleSided": True}
    pbr: dict = {"metallicFactor": 0.0, "roughnessFactor": 1.0}
    doc: dict = {"asset": {"version": "2.0", "generator": "one2345pp"}}
    if tm.texture is not None:
        st = np.stack([tm.uvs[:, 0], 1.0 - tm.uvs[:, 1]], axis=1).astype(np.float32)
        attributes["TEXCOORD_0"] = b.accessor(st, _FLOAT, "VEC2", _ARRAY_BUFFER)
        pbr["baseColorTexture"] = {"index": 0}
    else:
        rgba = tm.vertex_rgba()
        colors = np.concatenate([srgb_to_linear(rgba[:, :3]), rgba[:, 3:]], axis=1).astype(np.float32)  # linear
        attributes["COLOR_0"] = b.accessor(colors, _FLOAT, "VEC4", _ARRAY_BUFFER)
    indices = b.accessor(tm.faces.reshape(-1, 1).astype(np.uint32), _UINT, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    if tm.texture is not None:
        image_view = b.view(_png_bytes(tm.texture))
        doc["images"] = [{"bufferView": image_view, "mimeType": "image/png", "name": "baseColor"}]
        doc["samplers"] = [
            {"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}
        ]
        doc["textures"] = [{"sampler": 0, "source": 0}]
    material["pbrMetallicRoughness"] = pbr
    primitive = {"attributes": attributes, "indices": indices, "material": 0, "mode": _TRIANGLES}
    doc.update(
        scene=0,
        scenes=[{"nodes": [0]}],
        nodes=[{"mesh": 0, "name": "mesh"}],
        meshes=[{"primitives": [primitive], "name": "mesh"}],
        materials=[material],
        accessors=b.accessors,
        bufferViews=b.views,
        buffers=[{"byteLength": len(b.blob)}],
    )
    json_chunk = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    json_chunk += b" " * (-len(json_chunk) % 4)
    bin_chunk = bytes(b.blob) + b"\x00" * (-len(b.blob) % 4)
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join(
        [
            struct.pack("<III", 0x46546C67, 2, total),  # "glTF", version 2
            struct.pack("<II", len(json_chunk), 0x4E4F534A),  # "JSON"
            json_chunk,
            struct.pack("<II", len(bin_chunk), 0x004E4942),  # "BIN\0"
            bin_chunk,
        ]
    )


def save_glb(tm: TexturedMesh, path: str | os.PathLike) -> Path:
    path = _target(path, ".glb")
    write_bytes(path, glb_bytes(tm))
    return path


# ----------------------------------------------------------------------------------------------------------- OBJ
def _obj_text(tm: TexturedMesh, stem: str) -> tuple[str, str | None]:
    normals = _unit_normals(tm)
    lines = [f"# one2345pp textured mesh: {tm.num_vertices} vertices, {tm.num_faces} faces"]
    if tm.texture is not None:
        lines.append(f"mtllib {stem}.mtl")
        lines += [f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in tm.vertices]
        lines += [f"vt {u:.7g} {v:.7g}" for u, v in tm.uvs]
        lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in normals]
        lines.append("usemtl baked")
        lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in tm.faces + 1]
        mtl = "\n".join(
            ["newmtl baked", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1", f"map_Kd {stem}.png", ""]
        )
        return "\n".join(lines) + "\n", mtl
    rgb = tm.vertex_rgba()[:, :3]
    lines += [f"v {x:.7g} {y:.7g} {z:.7g} {r:.4f} {g:.4f} {b:.4f}" for (x, y, z), (r, g, b) in zip(tm.vertices, rgb)]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in normals]
    lines += [f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in tm.faces + 1]
    return "\n".join(lines) + "\n", None


def save_obj(tm: TexturedMesh, path: str | os.PathLike) -> Path:
    """``STEM.obj`` (+ ``STEM.mtl`` and ``STEM.png`` for a texture) beside each other."""
    path = _target(path, ".obj")
    stem = path.stem
    obj, mtl = _obj_text(tm, stem)
    with atomic_files(path.parent, last=path.name) as tmpdir:  # once the .obj exists, its sidecar files do too
        if mtl is not None:
            (tmpdir / f"{stem}.png").write_bytes(_png_bytes(tm.texture))
            (tmpdir / f"{stem}.mtl").write_text(mtl)
        (tmpdir / path.name).write_text(obj)
    return path


# ----------------------------------------------------------------------------------------------------------- PLY
def ply_bytes(tm: TexturedMesh) -> bytes:
    v = tm.num_vertices
    header = "\n".join(
        [
            "ply",
            "format binary_little_endian 1.0",
            "comment one2345pp textured mesh (vertex colours)",
            f"element vertex {v}",
            "property float x",
            "property float y",
            "property float z",
            "property float nx",
            "property float ny",
            "property float nz",
            "property uchar red",
            "property uchar green",
            "property uchar blue",
            "property uchar alpha",
            f"element face {tm.num_faces}",
            "property list uchar int vertex_indices",
            "end_header",
            "",
        ]
    ).encode("ascii")
    vert = np.zeros(v, dtype=[("p", "<f4", 3), ("n", "<f4", 3), ("c", "u1", 4)])
    vert["p"] = tm.vertices.astype(np.float32)
    vert["n"] = _unit_normals(tm)
    vert["c"] = _rgba8(tm.vertex_rgba())
    face = np.zeros(tm.num_faces, dtype=[("k", "u1"), ("i", "<i4", 3)])
    face["k"] = 3
    face["i"] = tm.faces.astype(np.int32)
    return header + vert.tobytes() + face.tobytes()


def save_ply(tm: TexturedMesh, path: str | os.PathLike) -> Path:
    """Binary PLY with vertex normals and colours (a texture is sampled at the vertex UVs)."""
    path = _target(path, ".ply")
    write_bytes(path, ply_bytes(tm))
    return path


def export_mesh(tm: TexturedMesh, path: str | os.PathLike) -> Path:
    """Write ``tm`` as GLB, OBJ (+ MTL + PNG) or PLY, chosen by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    writers = {".glb": save_glb, ".obj": save_obj, ".ply": save_ply}
    if suffix not in writers:
        raise ValueError(f"cannot export {path}: supported types are {', '.join(EXPORT_SUFFIXES)}")
    return writers[suffix](tm, path)
