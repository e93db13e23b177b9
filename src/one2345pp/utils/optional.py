"""Lazy imports of heavy or optional libraries, with messages that say how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINTS = {
    "open3d": (
        "open3d is needed for ray casting (rendering, signed distances). "
        "Install it with `pip install -e .[cpu]` (CPU wheel) or `.[gpu]`; on Debian/Ubuntu it also needs "
        "the system library libusb-1.0 (`apt-get install libusb-1.0-0`, done by `make setup` when run as root)."
    ),
    "webdataset": "webdataset is needed to read and write shards: `pip install webdataset`.",
    "objaverse": "objaverse is optional; install it with `pip install -e .[objaverse]` to download objects.",
    "pymeshlab": "pymeshlab is needed for mesh cleanup: `pip install pymeshlab`.",
}


def require(name: str) -> ModuleType:
    """Import ``name`` or raise an ImportError that explains how to install it."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:  # open3d raises ImportError for a missing libusb
        hint = _HINTS.get(name, f"install it with `pip install {name}`")
        raise ImportError(f"{name} could not be imported ({exc}). {hint}") from exc
