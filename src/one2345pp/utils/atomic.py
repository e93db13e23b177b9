"""Writing files and folders so that readers never see half of one: a temporary name beside the target, then a
rename. Every writer of the package goes through these helpers, so that a failed or killed write leaves the old
file (or folder) and no temporary one behind.

Temporary names start with ``.tmp-`` (hidden, and easy to spot in a folder a crash left behind).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block finishes it is renamed over ``path``, when it raises
    it is removed. The parent folder is created. The temporary name ends in ``.tmp``, so that a reader looking for
    ``*.png`` or ``*.json`` never takes it for a finished file (writers that pick a format by the name's suffix are
    given the format, or an open file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8; ``newline`` as for :func:`open`) to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, doc, default=None, allow_nan: bool = True) -> Path:
    """:func:`write_text` of ``doc`` as indented JSON with a final newline (``default`` and ``allow_nan`` as for
    :func:`json.dumps`)."""
    return write_text(path, json.dumps(doc, indent=2, default=default, allow_nan=allow_nan) + "\n")


def write_png(path: str | os.PathLike, image) -> Path:
    """Write an image (a PIL image, or an HW / HWC uint8 array) to ``path`` as PNG, atomically."""
    from PIL import Image  # PIL is imported by the callers that write images only

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def _new_folder(prefix: Path) -> Path:
    """A new folder ``PREFIX-<pid>-<random>``, made with the usual permissions (``tempfile.mkdtemp`` would make it
    private to the user, and the folder it becomes is meant to be shared like any other output)."""
    tmp = prefix.with_name(f"{prefix.name}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; when the block finishes it takes ``folder``'s place (an
    existing ``folder`` is moved aside first and removed after), when it raises it is removed and ``folder`` is
    left as it was. The parent folder is created."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(folder.parent / f".tmp-{folder.name}")
    old = folder.parent / f".old-{folder.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_files(folder: str | os.PathLike, last: str) -> Iterator[Path]:
    """Yield an empty temporary folder inside ``folder`` for a file with sidecars (an OBJ with its MTL and
    textures); when the block finishes every file written there is moved into ``folder``, ``last`` after the
    others (so a reader that finds ``last`` finds its sidecars too); when it raises nothing is moved."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(folder / ".tmp")
    try:
        yield tmp
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
