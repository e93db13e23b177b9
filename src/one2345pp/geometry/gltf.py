"""glTF 2.0 (``.glb`` / ``.gltf``) read and written directly, so that an asset looks as a glTF viewer shows it.

Reading (:func:`read_gltf`) walks the default scene's node hierarchy (``matrix`` or translation / rotation / scale,
composed down the tree; a node whose world matrix mirrors gets its triangles' winding reversed) and reads every
triangle primitive (modes TRIANGLES, TRIANGLE_STRIP, TRIANGLE_FAN; points and lines are skipped) into one
:class:`~one2345pp.geometry.mesh.Mesh` in the file's own coordinates (glTF: +Y up, the asset's front towards +Z;
turning it +Z up is :func:`one2345pp.geometry.mesh_io.load_mesh`'s job). What is kept per primitive:

* ``COLOR_0`` (RGB or RGBA, float or normalised integers): corner colours, multiplied with the base colour;
* the material: ``baseColorFactor`` x ``baseColorTexture`` (its ``texCoord`` set and ``KHR_texture_transform``
  offset / rotation / scale applied to the UVs), ``emissiveFactor`` x ``emissiveTexture`` (x
  ``KHR_materials_emissive_strength``), ``KHR_materials_unlit``, ``alphaMode`` / ``alphaCutoff``,
  ``doubleSided``; ``KHR_materials_pbrSpecularGlossiness``' diffuse factor and texture stand in for the base colour
  when a material has only those. A primitive without a material gets Blender's default surface (linear 0.8 gray).
* images embedded in the binary chunk, as data URIs or as files beside the ``.gltf`` (PNG, JPEG, WebP).

glTF stores factors and ``COLOR_0`` as linear values and colour textures sRGB-encoded; the mesh holds display
values (what the texture bytes are), so linear values are sRGB-encoded on reading and decoded on writing.

Compressed geometry: ``KHR_draco_mesh_compression`` is decoded with DracoPy; ``EXT_meshopt_compression`` (and
``KHR_meshopt_compression``) cannot be read and raise :class:`~one2345pp.geometry.mesh.MeshError` naming the
compression, as does a file whose Draco data fails to decode. ``KHR_mesh_quantization`` (integer positions / UVs)
and sparse accessors are read.

Writing (:func:`gltf_bytes`) takes a mesh in the project's +Z-up frame and writes it in glTF's own convention
(+Y up: ``(x, y, z) -> (x, z, -y)``, the inverse of the reading rule), one primitive per material, with float
POSITION / TEXCOORD_0 / COLOR_0 (linear), PNG textures and the material fields above.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from .mesh import Material, Mesh, MeshError, concatenate

__all__ = ["GlbBuffer", "Y_UP_TO_Z_UP", "Z_UP_TO_Y_UP", "gltf_bytes", "linear_to_srgb", "read_gltf", "srgb_to_linear"]

# glTF (+Y up, front +Z) -> the project's frame (+Z up), as Blender's importer turns it: (x, y, z) -> (x, -z, y)
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# its inverse, for every GLB writer: the project's frame -> glTF's (x, y, z) -> (x, z, -y); a proper rotation, so
# triangle windings and outward normals stay as they are
Z_UP_TO_Y_UP = Y_UP_TO_Z_UP.T

_GLB_MAGIC, _CHUNK_JSON, _CHUNK_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
_DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NCOMP = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
_MESHOPT = ("EXT_meshopt_compression", "KHR_meshopt_compression")
_DRACO = "KHR_draco_mesh_compression"
BLENDER_DEFAULT_LINEAR = 0.8  # Blender's surface for objects without a material


def srgb_to_linear(c) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(c) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1.0 / 2.4) - 0.055).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- reading
class _Document:
    """The JSON of a glTF file with lazy access to its buffers, accessors and images."""

    def __init__(self, path: Path):
        self.path = path
        data = path.read_bytes()
        self.bin: bytes | None = None
        if data[:4] == b"glTF":
            self.json = self._parse_glb(data)
        else:
            try:
                self.json = json.loads(data.decode("utf-8-sig"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise MeshError(path, f"unreadable: not a GLB and not glTF JSON ({exc})") from exc
        if not isinstance(self.json, dict):
            raise MeshError(path, "unreadable: the glTF JSON is not an object")
        version = str(self.json.get("asset", {}).get("version", "2.0"))
        if not version.startswith("2"):
            raise MeshError(path, f"glTF version {version} is not supported (only 2.x)")
        self._buffers: dict[int, bytes] = {}
        self._images: dict[int, np.ndarray | None] = {}

    def _parse_glb(self, data: bytes) -> dict:
        if len(data) < 20:
            raise MeshError(self.path, "unreadable: truncated GLB header")
        magic, version, length = struct.unpack_from("<III", data, 0)
        if magic != _GLB_MAGIC or version != 2:
            raise MeshError(self.path, f"unreadable: GLB version {version} (only 2 is supported)")
        pos, doc = 12, None
        while pos + 8 <= min(length, len(data)):
            size, kind = struct.unpack_from("<II", data, pos)
            chunk = data[pos + 8 : pos + 8 + size]
            if len(chunk) < size:
                raise MeshError(self.path, "unreadable: truncated GLB chunk")
            if kind == _CHUNK_JSON and doc is None:
                try:
                    doc = json.loads(chunk.decode("utf-8"))
                except ValueError as exc:
                    raise MeshError(self.path, f"unreadable: bad GLB JSON chunk ({exc})") from exc
            elif kind == _CHUNK_BIN and self.bin is None:
                self.bin = chunk
            pos += 8 + size + (-size % 4)
        if doc is None:
            raise MeshError(self.path, "unreadable: GLB without a JSON chunk")
        return doc

    def list(self, key: str) -> list:
        return self.json.get(key) or []

    def _uri_bytes(self, uri: str) -> bytes:
        if uri.startswith("data:"):
            return base64.b64decode(uri.split(",", 1)[1])
        file = self.path.parent / unquote(uri)
        if not file.is_file():
            raise MeshError(self.path, f"missing resource {uri!r} (looked for {file})")
        return file.read_bytes()

    def buffer(self, i: int) -> bytes:
        if i not in self._buffers:
            buf = self.list("buffers")[i]
            if "uri" in buf:
                self._buffers[i] = self._uri_bytes(buf["uri"])
            elif i == 0 and self.bin is not None:
                self._buffers[i] = self.bin
            else:
                raise MeshError(self.path, f"buffer {i} has no data")
        return self._buffers[i]

    def view_bytes(self, i: int) -> bytes:
        view = self.list("bufferViews")[i]
        ext = view.get("extensions", {})
        for name in _MESHOPT:
            if name in ext:
                raise MeshError(self.path, f"meshopt-compressed ({name}): no meshopt decoder is installed")
        start = view.get("byteOffset", 0)
        return self.buffer(view["buffer"])[start : start + view["byteLength"]]

    def accessor(self, i: int) -> np.ndarray:
        """Accessor ``i`` as an array [count, components] (normalised integers as floats in [0, 1] / [-1, 1])."""
        acc = self.list("accessors")[i]
        dtype = np.dtype(_DTYPES[acc["componentType"]]).newbyteorder("<")
        ncomp = _NCOMP[acc["type"]]
        count = int(acc["count"])
        if "bufferView" in acc:
            data = self.view_bytes(acc["bufferView"])
            stride = self.list("bufferViews")[acc["bufferView"]].get("byteStride") or dtype.itemsize * ncomp
            offset = acc.get("byteOffset", 0)
            need = offset + (count - 1) * stride + dtype.itemsize * ncomp if count else 0
            if need > len(data):
                raise MeshError(self.path, f"accessor {i} reaches past the end of its buffer view")
            arr = np.ndarray((count, ncomp), dtype, data, offset, (stride, dtype.itemsize)).copy()
        else:
            arr = np.zeros((count, ncomp), dtype)
        sparse = acc.get("sparse")
        if sparse:
            idx_info, val_info = sparse["indices"], sparse["values"]
            idx_dtype = np.dtype(_DTYPES[idx_info["componentType"]]).newbyteorder("<")
            n = int(sparse["count"])
            idx = np.frombuffer(self.view_bytes(idx_info["bufferView"]), idx_dtype, n, idx_info.get("byteOffset", 0))
            vals = np.frombuffer(
                self.view_bytes(val_info["bufferView"]), dtype, n * ncomp, val_info.get("byteOffset", 0)
            )
            arr[idx.astype(np.int64)] = vals.reshape(n, ncomp)
        if acc.get("normalized") and dtype.kind in "iu":
            info = np.iinfo(dtype)
            arr = np.maximum(arr.astype(np.float32) / info.max, -1.0)
        return arr

    def image(self, texture_index: int | None) -> np.ndarray | None:
        """uint8 [H, W, 3|4] of texture ``texture_index`` (None when absent or undecodable)."""
        if texture_index is None:
            return None
        textures = self.list("textures")
        if not 0 <= texture_index < len(textures):
            return None
        tex = textures[texture_index]
        source = tex.get("source")
        for ext in ("EXT_texture_webp", "MSFT_texture_dds", "KHR_texture_basisu"):
            source = tex.get("extensions", {}).get(ext, {}).get("source", source)
        if source is None:
            return None
        if source not in self._images:
            self._images[source] = self._decode_image(source)
        return self._images[source]

    def _decode_image(self, i: int) -> np.ndarray | None:
        from PIL import Image

        img = self.list("images")[i]
        try:
            data = self.view_bytes(img["bufferView"]) if "bufferView" in img else self._uri_bytes(img["uri"])
            with Image.open(io.BytesIO(data)) as im:
                mode = "RGBA" if ("A" in im.mode or "transparency" in im.info) else "RGB"
                return np.asarray(im.convert(mode), dtype=np.uint8)
        except MeshError:
            raise
        except Exception:  # an image PIL cannot decode (KTX2, DDS, ...): the part keeps its factors
            return None


def _quat_matrix(q) -> np.ndarray:
    x, y, z, w = (float(c) for c in q)
    n = x * x + y * y + z * z + w * w
    s = 2.0 / n if n > 0 else 0.0
    return np.array(
        [
            [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
            [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
            [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
        ]
    )


def _local_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        return np.asarray(node["matrix"], dtype=np.float64).reshape(4, 4).T  # column-major in the file
    m = np.eye(4)
    m[:3, :3] = _quat_matrix(node.get("rotation", (0, 0, 0, 1))) * np.asarray(node.get("scale", (1, 1, 1)), float)
    m[:3, 3] = node.get("translation", (0, 0, 0))
    return m


def _texture_uv_transform(info: dict) -> np.ndarray | None:
    """3x3 affine of ``KHR_texture_transform`` on glTF UVs (origin top-left): T(offset) R(rotation) S(scale)."""
    ext = (info.get("extensions") or {}).get("KHR_texture_transform")
    if not ext:
        return None
    ox, oy = ext.get("offset", (0.0, 0.0))
    sx, sy = ext.get("scale", (1.0, 1.0))
    r = float(ext.get("rotation", 0.0))
    c, s = np.cos(r), np.sin(r)
    translation = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], dtype=np.float64)
    rotation = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float64)
    scale = np.diag([sx, sy, 1.0])
    return translation @ rotation @ scale


def _tex_coord_set(info: dict) -> int:
    ext = (info.get("extensions") or {}).get("KHR_texture_transform") or {}
    return int(ext.get("texCoord", info.get("texCoord", 0)))


class _MaterialReader:
    def __init__(self, doc: _Document):
        self.doc = doc

    def __call__(self, index: int | None) -> tuple[Material, dict | None]:
        """(material, info of the texture its UVs belong to or None)."""
        if index is None:
            gray = float(linear_to_srgb(BLENDER_DEFAULT_LINEAR))
            return Material("default", [gray, gray, gray, 1.0], alpha_mode="OPAQUE", double_sided=False), None
        m = self.doc.list("materials")[index]
        pbr = m.get("pbrMetallicRoughness") or {}
        ext = m.get("extensions") or {}
        factor = pbr.get("baseColorFactor")
        tex_info = pbr.get("baseColorTexture")
        spec_gloss = ext.get("KHR_materials_pbrSpecularGlossiness")
        if spec_gloss and factor is None and tex_info is None:
            factor, tex_info = spec_gloss.get("diffuseFactor"), spec_gloss.get("diffuseTexture")
        factor = np.asarray(factor if factor is not None else (1.0, 1.0, 1.0, 1.0), dtype=np.float32)
        base = np.concatenate([linear_to_srgb(factor[:3]), np.clip(factor[3:4], 0.0, 1.0)])
        emissive = np.asarray(m.get("emissiveFactor", (0.0, 0.0, 0.0)), dtype=np.float32)
        emissive = emissive * float((ext.get("KHR_materials_emissive_strength") or {}).get("emissiveStrength", 1.0))
        em_info = m.get("emissiveTexture")
        texture = self.doc.image(tex_info["index"]) if tex_info else None
        em_texture = self.doc.image(em_info["index"]) if em_info and emissive.max() > 0 else None
        uv_info = tex_info if texture is not None else (em_info if em_texture is not None else None)
        mat = Material(
            str(m.get("name") or f"material{index}"),
            base,
            texture,
            emissive=linear_to_srgb(emissive),
            emissive_texture=em_texture,
            unlit="KHR_materials_unlit" in ext,
            alpha_mode=m.get("alphaMode") if m.get("alphaMode") in ("MASK", "BLEND") else "OPAQUE",
            alpha_cutoff=float(m.get("alphaCutoff", 0.5)),
            double_sided=bool(m.get("doubleSided", False)),
        )
        return mat, uv_info


def _triangles(mode: int, idx: np.ndarray) -> np.ndarray:
    if mode == 4:
        return idx[: len(idx) // 3 * 3].reshape(-1, 3)
    n = len(idx) - 2
    if n <= 0:
        return np.zeros((0, 3), np.int64)
    k = np.arange(n)
    if mode == 5:  # strip: every other triangle flips to keep the winding
        a, b = np.where(k % 2 == 0, k, k + 1), np.where(k % 2 == 0, k + 1, k)
        return np.stack([idx[a], idx[b], idx[k + 2]], axis=1)
    return np.stack([np.full(n, idx[0]), idx[k + 1], idx[k + 2]], axis=1)  # fan


def _draco_primitive(doc: _Document, prim: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    ext = prim["extensions"][_DRACO]
    try:
        import DracoPy
    except ImportError as exc:
        raise MeshError(doc.path, f"Draco-compressed ({_DRACO}): DracoPy is not installed") from exc
    try:
        decoded = DracoPy.decode(doc.view_bytes(ext["bufferView"]))
    except Exception as exc:
        raise MeshError(doc.path, f"Draco-compressed ({_DRACO}): decoding failed ({exc})") from exc
    faces = np.asarray(getattr(decoded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1)
    attrs = {}
    for name, uid in (ext.get("attributes") or {}).items():
        att = decoded.get_attribute_by_unique_id(uid)
        if att is None:
            continue
        data = np.asarray(att["data"])
        ncomp = (
            _NCOMP.get(doc.list("accessors")[prim["attributes"][name]]["type"], 1) if name in prim["attributes"] else 1
        )
        data = data.reshape(len(data), -1) if data.ndim > 1 else data.reshape(-1, ncomp)
        acc = doc.list("accessors")[prim["attributes"][name]] if name in prim["attributes"] else {}
        if acc.get("normalized") and data.dtype.kind in "iu":
            data = data.astype(np.float32) / np.iinfo(data.dtype).max
        attrs[name] = data
    if "POSITION" not in attrs:
        attrs["POSITION"] = np.asarray(decoded.points, dtype=np.float64).reshape(-1, 3)
    return attrs, faces


def read_gltf(path: str | Path) -> Mesh:
    """Read a ``.glb`` / ``.gltf`` file into one mesh in the file's coordinates (see the module docstring)."""
    path = Path(path)
    doc = _Document(path)
    required = set(doc.json.get("extensionsRequired") or [])
    for name in _MESHOPT:
        if name in required or name in (doc.json.get("extensionsUsed") or []):
            raise MeshError(path, f"meshopt-compressed ({name}): no meshopt decoder is installed")
    scenes = doc.list("scenes")
    nodes = doc.list("nodes")
    if scenes:
        roots = scenes[int(doc.json.get("scene", 0))].get("nodes", [])
    else:  # no scene: every node that is nobody's child
        children = {c for n in nodes for c in n.get("children", [])}
        roots = [i for i in range(len(nodes)) if i not in children]
    materials = _MaterialReader(doc)
    parts: list[Mesh] = []
    skipped: set[str] = set()
    stack = [(int(r), np.eye(4), 0) for r in reversed(roots)]  # depth first, in the file's order
    while stack:
        i, parent, depth = stack.pop()
        if depth > 256:
            raise MeshError(path, "node hierarchy deeper than 256 levels (a cycle?)")
        node = nodes[i]
        world = parent @ _local_matrix(node)
        if "mesh" in node:
            for prim in doc.list("meshes")[node["mesh"]].get("primitives", []):
                part = _read_primitive(doc, prim, world, materials)
                if isinstance(part, str):
                    skipped.add(part)
                elif part is not None:
                    parts.append(part)
        stack.extend((int(c), world, depth + 1) for c in reversed(node.get("children", [])))
    if not parts:
        what = ", ".join(sorted(skipped)) or "no mesh primitives"
        raise MeshError(path, f"not a triangle mesh (contains {what})")
    return concatenate(parts, source=str(path))


def _read_primitive(doc: _Document, prim: dict, world: np.ndarray, materials: _MaterialReader) -> Mesh | str | None:
    mode = int(prim.get("mode", 4))
    if mode not in (4, 5, 6):
        return {0: "points", 1: "lines", 2: "line loops", 3: "line strips"}.get(mode, f"mode {mode}")
    attributes = prim.get("attributes") or {}
    if _DRACO in (prim.get("extensions") or {}):
        attrs, idx = _draco_primitive(doc, prim)
    else:
        if "POSITION" not in attributes:
            return None
        attrs = {}
        idx = doc.accessor(prim["indices"]).reshape(-1).astype(np.int64) if "indices" in prim else None
    positions = np.asarray(attrs.get("POSITION", None) if "POSITION" in attrs else doc.accessor(attributes["POSITION"]))
    positions = positions.astype(np.float64)[:, :3]
    if idx is None or (len(idx) == 0 and _DRACO not in (prim.get("extensions") or {})):
        idx = np.arange(len(positions), dtype=np.int64)
    faces = _triangles(mode, idx)
    if len(faces) == 0:
        return None
    if faces.max() >= len(positions) or faces.min() < 0:
        raise MeshError(doc.path, "face indices outside the vertex range")

    def attribute(name: str) -> np.ndarray | None:
        if name in attrs:
            return attrs[name]
        return doc.accessor(attributes[name]) if name in attributes else None

    linear = world[:3, :3]
    vertices = positions @ linear.T + world[:3, 3]
    if np.linalg.det(linear) < 0:
        faces = faces[:, ::-1]
    material, uv_info = materials(prim.get("material"))
    face_uvs = None
    if uv_info is not None:
        uv = attribute(f"TEXCOORD_{_tex_coord_set(uv_info)}")
        if uv is not None:
            uv = uv[:, :2].astype(np.float64)
            transform = _texture_uv_transform(uv_info)
            if transform is not None:
                uv = uv @ transform[:2, :2].T + transform[:2, 2]
            uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)  # glTF origin top-left -> OBJ convention
            face_uvs = uv[faces].astype(np.float32)
    if face_uvs is None:
        material.texture = material.emissive_texture = None
    corner_colors = None
    color = attribute("COLOR_0")
    if color is not None:
        color = color.astype(np.float32)
        rgba = np.ones((len(color), 4), np.float32)
        rgba[:, :3] = linear_to_srgb(color[:, :3])
        if color.shape[1] == 4:
            rgba[:, 3] = np.clip(color[:, 3], 0.0, 1.0)
        corner_colors = rgba[faces]
    return Mesh(vertices, faces, face_uvs, corner_colors, None, [material], source=str(doc.path))


# ----------------------------------------------------------------------------------------------------- writing
class GlbBuffer:
    """The binary chunk of a GLB being written: blobs as 4-byte aligned buffer views of one buffer, with their
    accessors (shared by this module's writer and :mod:`one2345pp.texture.export`)."""

    def __init__(self):
        self.blob = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, data: bytes, target: int | None = None) -> int:
        self.blob += b"\x00" * (-len(self.blob) % 4)
        entry = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        self.blob += data
        self.views.append(entry)
        return len(self.views) - 1

    def accessor(self, arr: np.ndarray, ctype: int, kind: str, target: int, bounds: bool = False, **extra) -> int:
        arr = np.ascontiguousarray(arr)
        entry = {
            "bufferView": self.view(arr.tobytes(), target),
            "componentType": ctype,
            "count": int(arr.shape[0]),
            "type": kind,
            **extra,
        }
        if bounds:
            entry["min"] = [float(x) for x in arr.min(axis=0)]
            entry["max"] = [float(x) for x in arr.max(axis=0)]
        self.accessors.append(entry)
        return len(self.accessors) - 1


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _linear_rgba(c: np.ndarray) -> list[float]:
    c = np.asarray(c, dtype=np.float32)
    return [float(x) for x in np.concatenate([srgb_to_linear(c[:3]), c[3:]])]


def gltf_bytes(mesh: Mesh) -> bytes:
    """The GLB file of ``mesh`` (project frame, +Z up) in glTF's convention (+Y up); see the module docstring."""
    b = GlbBuffer()
    to_gltf = Z_UP_TO_Y_UP  # inverse of the reading rule: (x, y, z) -> (x, z, -y)
    doc: dict = {"asset": {"version": "2.0", "generator": "one2345pp"}}
    images, textures, gl_materials, primitives, used_ext = [], [], [], [], set()

    def texture_index(image: np.ndarray) -> int:
        images.append({"bufferView": b.view(_png(image)), "mimeType": "image/png"})
        textures.append({"source": len(images) - 1})
        return len(textures) - 1

    for m_id, mat in enumerate(mesh.materials):
        sel = np.nonzero(mesh.face_material == m_id)[0]
        if len(sel) == 0:
            continue
        uses_uv = mesh.face_uvs is not None and (mat.texture is not None or mat.emissive_texture is not None)
        pos = mesh.vertices[mesh.faces[sel]].reshape(-1, 3) @ to_gltf.T
        columns = [pos]
        if uses_uv:
            uv = mesh.face_uvs[sel].reshape(-1, 2).astype(np.float64)
            columns.append(np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1))
        if mesh.corner_colors is not None:
            cc = mesh.corner_colors[sel].reshape(-1, 4).astype(np.float64)
            columns.append(np.concatenate([srgb_to_linear(cc[:, :3]), cc[:, 3:]], axis=1))
        rows = np.concatenate(columns, axis=1)
        uniq, inverse = np.unique(rows.round(7), axis=0, return_inverse=True)
        attributes = {"POSITION": b.accessor(uniq[:, :3].astype(np.float32), 5126, "VEC3", 34962, bounds=True)}
        col = 3
        if uses_uv:
            attributes["TEXCOORD_0"] = b.accessor(uniq[:, col : col + 2].astype(np.float32), 5126, "VEC2", 34962)
            col += 2
        if mesh.corner_colors is not None:
            attributes["COLOR_0"] = b.accessor(uniq[:, col : col + 4].astype(np.float32), 5126, "VEC4", 34962)
        indices = b.accessor(inverse.reshape(-1).astype(np.uint32), 5125, "SCALAR", 34963)
        pbr: dict = {"baseColorFactor": _linear_rgba(mat.base_color), "metallicFactor": 0.0, "roughnessFactor": 1.0}
        gm: dict = {"name": mat.name, "pbrMetallicRoughness": pbr, "doubleSided": bool(mat.double_sided)}
        if uses_uv and mat.texture is not None:
            pbr["baseColorTexture"] = {"index": texture_index(mat.texture)}
        if mat.emits:
            gm["emissiveFactor"] = [float(x) for x in srgb_to_linear(mat.emissive)]
            if uses_uv and mat.emissive_texture is not None:
                gm["emissiveTexture"] = {"index": texture_index(mat.emissive_texture)}
        if mat.unlit:
            gm["extensions"] = {"KHR_materials_unlit": {}}
            used_ext.add("KHR_materials_unlit")
        if mat.alpha_mode != "OPAQUE" and (mat.base_color[3] < 1 or _has_alpha(mat.texture) or _alpha_below(mesh, sel)):
            gm["alphaMode"] = mat.alpha_mode
            if mat.alpha_mode == "MASK":
                gm["alphaCutoff"] = mat.alpha_cutoff
        gl_materials.append(gm)
        primitives.append({"attributes": attributes, "indices": indices, "material": len(gl_materials) - 1, "mode": 4})
    doc.update(
        scene=0,
        scenes=[{"nodes": [0]}],
        nodes=[{"mesh": 0, "name": "mesh"}],
        meshes=[{"primitives": primitives, "name": "mesh"}],
        materials=gl_materials,
        accessors=b.accessors,
        bufferViews=b.views,
        buffers=[{"byteLength": len(b.blob)}],
    )
    if images:
        doc.update(images=images, textures=textures)
    if used_ext:
        doc["extensionsUsed"] = sorted(used_ext)
    json_chunk = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    json_chunk += b" " * (-len(json_chunk) % 4)
    bin_chunk = bytes(b.blob) + b"\x00" * (-len(b.blob) % 4)
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join(
        [
            struct.pack("<III", _GLB_MAGIC, 2, total),
            struct.pack("<II", len(json_chunk), _CHUNK_JSON),
            json_chunk,
            struct.pack("<II", len(bin_chunk), _CHUNK_BIN),
            bin_chunk,
        ]
    )


def _has_alpha(texture: np.ndarray | None) -> bool:
    return texture is not None and texture.shape[2] == 4 and bool(texture[..., 3].min() < 255)


def _alpha_below(mesh: Mesh, sel: np.ndarray) -> bool:
    return mesh.corner_colors is not None and bool(mesh.corner_colors[sel, :, 3].min() < 1.0)
