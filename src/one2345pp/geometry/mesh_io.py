"""Reading and writing mesh files: GLB/glTF with :mod:`one2345pp.geometry.gltf`, OBJ+MTL+textures, PLY, OFF and
STL through trimesh.

Reading flattens scenes with their node transforms into one :class:`~one2345pp.geometry.mesh.Mesh` in the project's
frame, +Z up. glTF files are read as a glTF viewer shows them (vertex colours, texture transforms, unlit and
emissive materials, alpha modes: see :mod:`one2345pp.geometry.gltf`). Other formats keep per part OBJ ``map_Kd``
textures and vertex or face colours, taken as display (sRGB) values; for OBJ materials with a ``map_Kd`` texture
the diffuse factor ``Kd`` is ignored (exporters commonly write 0.8 beside a texture).

Up axis (``up_axis``, the build setting ``data.up_axis``): ``"auto"`` takes each format's convention, ``"y"`` or
``"z"`` overrides it for every file.

* glTF / GLB are +Y up with the asset's front towards +Z (the glTF 2.0 specification). They are turned +Z up as
  Blender's importer does (through which Objaverse renderings, Zero123++'s training data among them, go):
  ``(x, y, z) -> (x, -z, y)``. The asset's front then faces -Y: the camera at azimuth 270 (at -Y) sees the front,
  the camera at azimuth 0 (at +X) sees the asset's left side (the side on the viewer's right when facing its front).
* OBJ, PLY, OFF and STL are taken as +Z up and kept as they are: Google Scanned Objects are +Z up and Blender-based
  GSO loaders import them with up axis Z. The project's own OBJ files are written in its frame.

Writing: GLB in glTF's convention (:func:`one2345pp.geometry.gltf.gltf_bytes`: +Y up, linear factors and vertex
colours), so the project's GLB files read back upright through the same rule; OBJ (+Z up, as read) groups faces by
material: a textured material becomes an MTL + PNG, a material without texture its colour, corner colours vertex
colours; PLY holds vertex colours. Files are written to a temporary name (a temporary folder for OBJ with its
sidecar files) and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_files, write_bytes
from .gltf import Y_UP_TO_Z_UP, gltf_bytes, read_gltf
from .mesh import Material, Mesh, MeshError, concatenate

READ_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".off", ".stl")
WRITE_SUFFIXES = (".glb", ".obj", ".ply")
UP_AXES = ("auto", "y", "z")
GLTF_SUFFIXES = (".glb", ".gltf")


def resolve_up_axis(path: str | os.PathLike, up_axis: str = "auto") -> str:
    """The up axis (``"y"`` or ``"z"``) a file is read with: ``up_axis`` unless ``"auto"``, else the format's
    convention (glTF / GLB: ``"y"``; every other format: ``"z"``)."""
    if up_axis not in UP_AXES:
        raise ValueError(f"up_axis must be one of {', '.join(UP_AXES)}, got {up_axis!r}")
    if up_axis != "auto":
        return up_axis
    return "y" if Path(path).suffix.lower() in GLTF_SUFFIXES else "z"


def y_up_to_z_up(mesh: Mesh) -> Mesh:
    """``(x, y, z) -> (x, -z, y)``: a +Y-up mesh turned +Z up (a proper rotation; windings stay)."""
    return replace(mesh, vertices=mesh.vertices @ Y_UP_TO_Z_UP.T)


def _as_rgba_factor(value) -> np.ndarray:
    if value is None:
        return np.ones(4, np.float32)
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 3:
        arr = np.concatenate([arr, [255.0 if arr.max() > 1.0 else 1.0]])
    if np.asarray(value).dtype == np.uint8 or arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def _image_to_array(image) -> np.ndarray | None:
    if image is None:
        return None
    mode = "RGBA" if "A" in image.mode else "RGB"
    return np.asarray(image.convert(mode), dtype=np.uint8)


def _part_from_trimesh(geom, source: str, texture_fallback: Path | None) -> Mesh:
    faces = np.asarray(geom.faces, dtype=np.int64)
    vertices = np.asarray(geom.vertices, dtype=np.float64)
    visual = geom.visual
    kind = getattr(visual, "kind", None)
    material = Material()
    face_uvs = corner_colors = None
    if kind == "texture":
        mat = visual.material
        texture = None
        if hasattr(mat, "baseColorTexture"):  # PBRMaterial
            material.base_color = _as_rgba_factor(getattr(mat, "baseColorFactor", None))
            texture = _image_to_array(mat.baseColorTexture)
        else:  # SimpleMaterial (OBJ / MTL)
            texture = _image_to_array(getattr(mat, "image", None))
            if texture is None:
                material.base_color = _as_rgba_factor(getattr(mat, "diffuse", None))
            else:
                material.base_color = np.ones(4, np.float32)
        if texture is None and texture_fallback is not None and texture_fallback.is_file():
            from PIL import Image

            with Image.open(texture_fallback) as img:
                texture = _image_to_array(img)
            material.base_color = np.ones(4, np.float32)
        material.name = str(getattr(mat, "name", None) or "material")
        uv = getattr(visual, "uv", None)
        if texture is not None and uv is not None and len(uv) == len(vertices):
            material.texture = texture
            face_uvs = np.asarray(uv, dtype=np.float32)[faces]
        color_attr = getattr(visual, "vertex_attributes", {}).get("color")
        if color_attr is not None and len(color_attr) == len(vertices):
            corner_colors = _as_rgba_factor_rows(np.asarray(color_attr))[faces]
    elif kind == "vertex":
        material.base_color = np.ones(4, np.float32)
        corner_colors = _as_rgba_factor_rows(np.asarray(visual.vertex_colors))[faces]
    elif kind == "face":
        material.base_color = np.ones(4, np.float32)
        fc = _as_rgba_factor_rows(np.asarray(visual.face_colors))
        corner_colors = np.repeat(fc[:, None, :], 3, axis=1)
    return Mesh(vertices, faces, face_uvs, corner_colors, None, [material], source=source)


def _as_rgba_factor_rows(colors: np.ndarray) -> np.ndarray:
    c = colors.astype(np.float32)
    if colors.dtype == np.uint8 or c.max() > 1.0:
        c = c / 255.0
    if c.shape[1] == 3:
        c = np.concatenate([c, np.ones((len(c), 1), np.float32)], axis=1)
    return np.clip(c, 0.0, 1.0)


def load_mesh(
    path: str | os.PathLike, texture_fallback: str | os.PathLike | None = None, up_axis: str = "auto"
) -> Mesh:
    """Read a mesh file into one :class:`Mesh` in the project's +Z-up frame; raise :class:`MeshError` naming the
    file and the problem.

    ``texture_fallback``: an image used for textured parts whose material names no readable texture (the Google
    Scanned Objects layout keeps it at ``<name>/materials/textures/texture.png``). ``up_axis``: ``"auto"`` (the
    format's convention, see the module docstring), ``"y"`` or ``"z"``.
    """
    path = Path(path)
    axis = resolve_up_axis(path, up_axis)
    if not path.is_file():
        raise MeshError(path, "file not found")
    if path.suffix.lower() not in READ_SUFFIXES:
        raise MeshError(path, f"unsupported file type {path.suffix!r}; readable: {', '.join(READ_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MeshError(path, "empty file")
    if path.suffix.lower() in GLTF_SUFFIXES:
        try:
            mesh = read_gltf(path)
        except MeshError:
            raise
        except Exception as exc:  # a malformed file: missing keys, bad indices, ...
            raise MeshError(path, f"unreadable: {type(exc).__name__}: {exc}") from exc
    else:
        mesh = _load_with_trimesh(path, texture_fallback)
    if axis == "y":
        mesh = y_up_to_z_up(mesh)
    mesh.validate()
    return mesh


def _load_with_trimesh(path: Path, texture_fallback: str | os.PathLike | None) -> Mesh:
    import trimesh

    try:
        geom = trimesh.load(path, process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshError(path, f"unreadable: {type(exc).__name__}: {exc}") from exc
    geoms = geom.dump() if isinstance(geom, trimesh.Scene) else [geom]
    parts = [g for g in geoms if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if not parts:
        kinds = sorted({type(g).__name__ for g in geoms}) or ["nothing"]
        raise MeshError(path, f"not a triangle mesh (contains {', '.join(kinds)})")
    fallback = Path(texture_fallback) if texture_fallback is not None else None
    return concatenate([_part_from_trimesh(g, str(path), fallback) for g in parts], source=str(path))


def normalize(mesh: Mesh, extent: float = 0.9) -> tuple[Mesh, float, np.ndarray]:
    """Centre the bounding box at the origin and scale its longest side to ``extent``.

    Returns ``(normalised mesh, scale, offset)`` with ``v_normalised = v * scale + offset``.
    """
    if not 0.0 < extent <= 1.0:
        raise ValueError(f"normalize extent must lie in (0, 1] to stay inside the volume cube, got {extent}")
    used = mesh.vertices[np.unique(mesh.faces)]
    lo, hi = used.min(0), used.max(0)
    longest = float((hi - lo).max())
    if longest <= 0:
        raise MeshError(mesh.source or "<mesh>", "degenerate: zero bounding-box extent")
    scale = extent / longest
    offset = -(lo + hi) / 2.0 * scale
    return mesh.transformed(scale, offset), scale, offset


def to_trimesh_parts(mesh: Mesh) -> list:
    """One trimesh per material (vertices split per face corner, then merged where uv and colour agree)."""
    import trimesh
    from PIL import Image

    parts = []
    for m_id, mat in enumerate(mesh.materials):
        sel = np.nonzero(mesh.face_material == m_id)[0]
        if len(sel) == 0:
            continue
        verts = mesh.vertices[mesh.faces[sel]].reshape(-1, 3)
        faces = np.arange(len(verts)).reshape(-1, 3)
        textured = mat.texture is not None and mesh.face_uvs is not None
        if textured and mesh.corner_colors is not None and not np.allclose(mesh.corner_colors[sel], 1.0):
            raise ValueError(f"material {mat.name!r}: a texture together with vertex colours cannot be written")
        if textured:
            material = trimesh.visual.material.PBRMaterial(
                name=mat.name,
                baseColorFactor=(mat.base_color * 255).round().astype(np.uint8),
                baseColorTexture=Image.fromarray(mat.texture),
                metallicFactor=0.0,
                roughnessFactor=1.0,
            )
            visual = trimesh.visual.TextureVisuals(uv=mesh.face_uvs[sel].reshape(-1, 2), material=material)
        elif mesh.corner_colors is not None:
            cols = mesh.corner_colors[sel].reshape(-1, 4) * mat.base_color
            visual = trimesh.visual.ColorVisuals(vertex_colors=(cols * 255).round().astype(np.uint8))
        else:
            cols = np.broadcast_to(mat.base_color, (len(verts), 4))
            visual = trimesh.visual.ColorVisuals(vertex_colors=(cols * 255).round().astype(np.uint8))
        if textured:
            part = trimesh.Trimesh(verts, faces, visual=visual, process=False)
            part.merge_vertices(merge_tex=False, merge_norm=True)  # keeps corners whose uv differ (seams)
        else:  # merge corners only where position and colour agree
            colors = np.asarray(visual.vertex_colors)
            uniq, faces = _merge_corners(verts, colors.astype(np.float64))
            visual = trimesh.visual.ColorVisuals(vertex_colors=uniq[:, 3:].astype(np.uint8))
            part = trimesh.Trimesh(uniq[:, :3], faces, visual=visual, process=False)
        parts.append(part)
    return parts


def _merge_corners(positions: np.ndarray, attrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge face corners [3F, 3] whose position and attributes agree -> (unique rows [V, 3 + A], faces [F, 3])."""
    rows = np.concatenate([positions, attrs], axis=1)
    uniq, inverse = np.unique(rows.round(7), axis=0, return_inverse=True)
    return uniq, inverse.reshape(-1, 3)


def save_mesh(mesh: Mesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` to ``.glb``, ``.obj`` (+ .mtl and textures beside it) or ``.ply`` atomically."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write {path}: supported types are {', '.join(WRITE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".ply":
        parts = to_trimesh_parts(mesh)
        if any(mat.texture is not None for mat in mesh.materials):
            raise ValueError(f"cannot write {path}: PLY keeps vertex colours only; write .glb or .obj for textures")
        data = trimesh.util.concatenate(parts).export(file_type="ply")
        write_bytes(path, data)
    elif suffix == ".glb":
        write_bytes(path, gltf_bytes(mesh))
    else:  # OBJ with sidecar files, moved into place together
        with atomic_files(path.parent, last=path.name) as tmpdir:
            _write_obj(mesh, tmpdir, path.stem)
    return path


def _write_obj(mesh: Mesh, folder: Path, stem: str) -> None:
    """Write ``stem.obj`` (and ``stem.mtl`` + PNG textures) into ``folder``.

    OBJ holds either vertex colours (the ``v x y z r g b`` extension, read back as vertex colours) or materials: a
    mesh with corner colours is written with per-corner vertex colours (material colours multiplied in); a mesh
    with textures as MTL materials (``Kd`` for flat ones, ``map_Kd`` for textured ones). Both at once cannot be
    represented in a way readers agree on, and is refused.
    """
    from PIL import Image

    has_texture = mesh.face_uvs is not None and any(m.texture is not None for m in mesh.materials)
    if mesh.corner_colors is not None and has_texture:
        raise ValueError(f"cannot write {stem}.obj: OBJ cannot hold textures and vertex colours together; use .glb")
    lines = [f"# one2345pp {stem}"]
    if not has_texture:
        # per-corner colour = material base colour x corner colour; merge corners with equal position and colour
        base = np.stack([m.base_color for m in mesh.materials])[mesh.face_material]  # [F, 4]
        cols = np.broadcast_to(base[:, None, :], (mesh.num_faces, 3, 4))
        if mesh.corner_colors is not None:
            cols = cols * mesh.corner_colors
        uniq, faces = _merge_corners(mesh.vertices[mesh.faces].reshape(-1, 3), cols.reshape(-1, 4)[:, :3])
        lines += [f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}" for x, y, z, r, g, b in uniq]
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    else:
        mtl = []
        lines.insert(1, f"mtllib {stem}.mtl")
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
        lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.face_uvs.reshape(-1, 2)]
        for m_id, mat in enumerate(mesh.materials):
            sel = np.nonzero(mesh.face_material == m_id)[0]
            if len(sel) == 0:
                continue
            name = f"m{m_id}"
            r, g, b, a = mat.base_color
            if mat.texture is None:
                mtl += [f"newmtl {name}", f"Kd {r:.6f} {g:.6f} {b:.6f}", f"d {a:.6f}", "illum 1"]
            else:  # readers differ on Kd x map_Kd, so the colour factor is baked into the texture and Kd is 1
                tex_name = f"{stem}_{name}.png"
                tex = mat.texture.astype(np.float32)
                tex[..., :3] *= mat.base_color[:3]
                Image.fromarray(tex.round().astype(np.uint8)).save(folder / tex_name)
                mtl += [f"newmtl {name}", "Kd 1 1 1", f"d {a:.6f}", "illum 1", f"map_Kd {tex_name}"]
            lines.append(f"usemtl {name}")
            for f_id in sel:
                v = mesh.faces[f_id] + 1
                t = 3 * f_id + np.arange(3) + 1
                lines.append(f"f {v[0]}/{t[0]} {v[1]}/{t[1]} {v[2]}/{t[2]}")
        (folder / f"{stem}.mtl").write_text("\n".join(mtl) + "\n")
    (folder / f"{stem}.obj").write_text("\n".join(lines) + "\n")
