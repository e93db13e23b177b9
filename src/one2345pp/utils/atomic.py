"""Writing a file so that readers never see half of it: a temporary name beside it, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8; ``newline`` as for :func:`open`) to a temporary file beside ``path``, then rename it
    over ``path``. The parent folder is created; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, doc, default=None) -> Path:
    """:func:`write_text` of ``doc`` as indented JSON with a final newline (``default`` as for :func:`json.dumps`)."""
    return write_text(path, json.dumps(doc, indent=2, default=default) + "\n")
