"""Where meshes come from: the procedural default, a folder, Google Scanned Objects, Objaverse.

A source lists :class:`SourceItem` objects; ``item.load()`` returns a :class:`~one2345pp.geometry.mesh.Mesh` read from
a real mesh file through :func:`~one2345pp.geometry.mesh_io.load_mesh` (procedural objects are first written as
GLB/OBJ files, so they take exactly the path real data takes). Items are plain picklable records, so worker
processes can load them. The up axis of each file follows ``data.up_axis``
(:func:`~one2345pp.geometry.mesh_io.resolve_up_axis`).

Keys (WebDataset ``__key__``, the sample's uid): procedural objects ``proc-<seed>-<index>``; folder and GSO items
the relative path or folder name made dot-free with a short hash (:func:`make_uid`); Objaverse objects their
Objaverse uid, the GLB file stem (:func:`objaverse_items`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..geometry.mesh import Mesh, MeshError
from ..geometry.mesh_io import READ_SUFFIXES, load_mesh, save_mesh
from ..utils.optional import require
from .procedural import generate_object, object_uid

SOURCES = ("procedural", "folder", "gso", "objaverse")
_UID_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_uid(text: str, max_len: int = 80) -> str:
    """A dot-free WebDataset key from a name or relative path (a short hash keeps distinct inputs distinct)."""
    clean = _UID_BAD.sub("_", text).strip("_") or "object"
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{clean[: max_len - 9]}-{digest}"


@dataclass(frozen=True)
class SourceItem:
    uid: str
    path: str  # the mesh file (for procedural objects: where it is written)
    source: str
    texture_fallback: str | None = None
    procedural_index: int | None = None
    objaverse_uid: str | None = None  # downloaded with the objaverse package when loaded

    def load(self, procedural_cfg=None, up_axis: str = "auto") -> Mesh:
        """Read the mesh (procedural objects are generated and written first, Objaverse uids downloaded first) with
        the up axis ``up_axis`` (``auto``, ``y`` or ``z``); ``mesh.source`` is the file read."""
        if self.procedural_index is not None:
            path = materialise_procedural(self, procedural_cfg)
        elif self.objaverse_uid is not None:
            path = download_objaverse(self.objaverse_uid)
        else:
            path = self.path
        return load_mesh(path, texture_fallback=self.texture_fallback, up_axis=up_axis)


def download_objaverse(uid: str) -> str:
    """Fetch one Objaverse object with the optional ``objaverse`` package; returns the local GLB path."""
    objaverse = require("objaverse")
    found = objaverse.load_objects(uids=[uid])
    if uid not in found:
        raise MeshError(uid, "Objaverse download failed (uid unknown or not reachable)")
    return str(found[uid])


def materialise_procedural(item: SourceItem, cfg) -> str:
    """Write procedural object ``item.procedural_index`` to ``item.path`` and return the file written.

    GLB files are written in glTF's convention (+Y up) and OBJ files +Z up, so both read back upright with
    ``up_axis=auto``. An object that mixes UV textures and vertex colours cannot be written as OBJ; it is written
    as GLB beside it. A file already there (from an earlier run) is reused.
    """
    path = Path(item.path)
    glb = path.with_suffix(".glb")
    for existing in (path, glb):
        if existing.is_file():
            return str(existing)
    mesh = generate_object(item.procedural_index, cfg).mesh
    textured = mesh.face_uvs is not None and any(m.texture is not None for m in mesh.materials)
    target = glb if (path.suffix.lower() == ".obj" and textured and mesh.corner_colors is not None) else path
    save_mesh(mesh, target)
    return str(target)


def procedural_items(cfg, num_objects: int, mesh_dir: str | Path) -> list[SourceItem]:
    formats = list(cfg.file_formats) or ["glb"]
    items = []
    for i in range(num_objects):
        uid = object_uid(cfg.seed, i)
        fmt = formats[i % len(formats)].lower().lstrip(".")
        items.append(SourceItem(uid, str(Path(mesh_dir) / uid / f"model.{fmt}"), "procedural", None, i))
    return items


def folder_items(
    root: str | Path, source: str = "folder", suffixes: tuple[str, ...] = READ_SUFFIXES
) -> list[SourceItem]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no mesh files ({', '.join(suffixes)}) under {root}")
    return [SourceItem(make_uid(str(p.relative_to(root).with_suffix(""))), str(p), source) for p in files]


def gso_items(root: str | Path) -> list[SourceItem]:
    """Google Scanned Objects in its published layout: ``<name>/meshes/model.obj`` and
    ``<name>/materials/textures/texture.png``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Google Scanned Objects folder not found: {root}")
    items = []
    for obj_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        model = obj_dir / "meshes" / "model.obj"
        texture = obj_dir / "materials" / "textures" / "texture.png"
        # an object folder without model.obj is still listed, so the build records it as a failure with its reason
        items.append(SourceItem(make_uid(obj_dir.name), str(model), "gso", str(texture) if texture.is_file() else None))
    if not items:
        raise FileNotFoundError(f"no object folders (<name>/meshes/model.obj) under {root}")
    return items


def objaverse_key(stem: str) -> str:
    """The key of an Objaverse object: its uid (the GLB file stem, 32 hex digits in Objaverse) when it is a valid
    dot-free key, else :func:`make_uid` of it."""
    return stem if stem and not _UID_BAD.search(stem) and len(stem) <= 80 else make_uid(stem)


def _objaverse_keyed(entries: list[tuple[str, str, str | None]]) -> list[SourceItem]:
    """Items from ``(name as given, path, objaverse uid or None)``; keys are :func:`objaverse_key` of the file stem
    (or uid), and inputs sharing a stem all get ``-<first 8 hex digits of sha1(name as given)>`` appended."""
    stems = [uid if uid is not None else Path(name).stem for name, _, uid in entries]
    counts = Counter(stems)
    items = []
    for (name, path, uid), stem in zip(entries, stems):
        key = objaverse_key(stem)
        if counts[stem] > 1 and uid is None:
            key = f"{key}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        items.append(SourceItem(key, path, "objaverse", objaverse_uid=uid))
    return items


def objaverse_items(spec: str | Path) -> list[SourceItem]:
    """Objaverse as a folder of GLB files, or a text file listing GLB paths or Objaverse uids (one per line).

    Each object is keyed by its Objaverse uid: the GLB file's stem (``.../<uid>.glb``) or the uid listed. Two
    files with the same stem (in different folders) both get a stable suffix, ``-`` and the first 8 hex digits of
    the SHA-1 of the path as written in the list (relative to the folder for a folder input), so the key does not
    depend on the order of the inputs; the same uid listed twice is refused as a duplicate.

    Uids are downloaded with the optional ``objaverse`` package (clusters) by the worker that builds them, so each
    rank fetches only its own share and a failed download is recorded like any bad input; paths are used as they are.
    """
    spec = Path(spec)
    if spec.is_dir():
        files = sorted(p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() == ".glb")
        if not files:
            raise FileNotFoundError(f"no mesh files (.glb) under {spec}")
        return _objaverse_keyed([(p.relative_to(spec).as_posix(), str(p), None) for p in files])
    if not spec.is_file():
        raise FileNotFoundError(f"Objaverse input not found: {spec} (a folder of .glb files or a list file)")
    lines = [ln.strip() for ln in spec.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    entries = []
    for ln in lines:
        if "/" in ln or ln.lower().endswith((".glb", ".gltf")):
            path = Path(ln) if Path(ln).is_absolute() else spec.parent / ln
            entries.append((ln, str(path), None))
        else:
            entries.append((ln, f"objaverse:{ln}", ln))
    return _objaverse_keyed(entries)


def list_items(source: str, input_path: str | None, num_objects: int | None, procedural_cfg, out_dir: Path):
    """All items of a source (before rank splitting and before skipping finished ones)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known sources: {', '.join(SOURCES)}")
    if source == "procedural":
        if num_objects is None:
            raise ValueError("--num-objects is required for the procedural source")
        return procedural_items(procedural_cfg, num_objects, out_dir / "meshes")
    if input_path is None:
        raise ValueError(f"--input is required for the {source} source")
    items = {"folder": folder_items, "gso": gso_items, "objaverse": objaverse_items}[source](input_path)
    return items[:num_objects] if num_objects is not None else items
