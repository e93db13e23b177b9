"""Which implementation runs the sparse convolutions: ``torch`` (pure PyTorch, every device) or ``torchsparse``.

The choice comes from a config value (``auto``, ``torch`` or ``torchsparse``) and the environment variable
``ONE2345PP_SPARSE_BACKEND``; when the variable is set it wins over the config value, so a machine can be switched
without editing saved configs. ``auto`` picks torchsparse when it imports and the tensor lives on a CUDA device
(torchsparse 2.1 has no CPU convolution; older releases run on CPUs when asked for explicitly), else the pure-PyTorch
backend. Asking for ``torchsparse`` explicitly when it
does not import raises an ImportError that says how to get it. The first time a backend is chosen a one-line message
naming it (and why) goes to stderr.

Both backends run the same modules (:mod:`one2345pp.sparse.layers`) with the same parameters, so a state dict trained
with one loads into the other. torchsparse changed its coordinate layout between releases: up to 2.0 coordinates are
``(x, y, z, batch)`` with the voxel indices of a tensor at stride ``s`` kept as multiples of ``s`` at the finest
resolution; from 2.1 on they are ``(batch, x, y, z)`` in the grid units of the tensor's own stride, which is this
package's layout. :func:`to_torchsparse_coords` / :func:`from_torchsparse_coords` convert.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch

from .tensor import SparseTensor

ENV_VAR = "ONE2345PP_SPARSE_BACKEND"
BACKENDS = ("auto", "torch", "torchsparse")

_INSTALL_HINT = (
    "torchsparse is not on PyPI: build it from source (https://github.com/mit-han-lab/torchsparse; v2.1 needs CUDA "
    "and the libsparsehash headers), or use the pure-PyTorch backend with "
    f"{ENV_VAR}=torch (or the config value `torch`)."
)


@dataclass(frozen=True)
class TorchsparseInfo:
    """The imported torchsparse module, its version and coordinate layout."""

    module: ModuleType
    version: tuple[int, ...]

    @property
    def batch_first(self) -> bool:
        """True from 2.1 on: ``(batch, x, y, z)`` in grid units of the tensor's stride."""
        return self.version >= (2, 1)

    @property
    def runs_on_cpu(self) -> bool:
        """Releases before 2.1 ship CPU kernels; 2.1 convolves on CUDA only."""
        return self.version < (2, 1)

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and self.runs_on_cpu)


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.1.0+torch20cu118"`` -> ``(2, 1, 0)``; raise ValueError when no leading number can be read."""
    parts = re.findall(r"\d+", str(text).split("+")[0])
    if not parts:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(p) for p in parts[:3])


def _import_torchsparse() -> ModuleType:
    return importlib.import_module("torchsparse")


@lru_cache(maxsize=1)
def _load() -> tuple[TorchsparseInfo | None, str]:
    try:
        module = _import_torchsparse()
        version = parse_version(getattr(module, "__version__", "0"))
    except (ImportError, OSError, ValueError) as exc:  # a broken CUDA build raises OSError
        return None, f"{type(exc).__name__}: {exc}"
    return TorchsparseInfo(module, version), ""


def torchsparse_info() -> TorchsparseInfo | None:
    """The importable torchsparse, or None."""
    return _load()[0]


def torchsparse_load_error() -> str:
    """Why torchsparse does not import ("" when it does)."""
    return _load()[1]


def require_torchsparse() -> TorchsparseInfo:
    """The importable torchsparse, or an ImportError naming the problem and the way out."""
    info, reason = _load()
    if info is None:
        raise ImportError(
            f"the torchsparse sparse-convolution backend was requested but cannot be imported "
            f"({reason}). {_INSTALL_HINT}"
        )
    return info


def requested_backend(value: str | None = None) -> tuple[str, str]:
    """``(name, source)``: the environment variable when set, else ``value`` (default ``auto``); validated."""
    env = os.environ.get(ENV_VAR, "").strip()
    name, source = (env, f"environment variable {ENV_VAR}") if env else ((value or "auto"), "config")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"sparse backend must be one of {', '.join(BACKENDS)}; got {name!r} from the {source}")
    return name, source


_announced: set[tuple[str, str]] = set()


def _announce(backend: str, why: str) -> None:
    if (backend, why) not in _announced:
        _announced.add((backend, why))
        print(f"one2345pp.sparse: using the {backend} backend ({why})", file=sys.stderr)


def resolve_backend(value: str | None = None, device: torch.device | str | None = None) -> str:
    """The backend that runs on ``device``: ``"torch"`` or ``"torchsparse"`` (see the module docstring)."""
    name, source = requested_backend(value)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name == "torch":
        _announce("pure-PyTorch", f"requested by the {source}")
        return "torch"
    if name == "torchsparse":
        info = require_torchsparse()
        if not info.supports(device):
            raise ValueError(
                f"the torchsparse backend ({source}) cannot run on {device.type}: torchsparse "
                f"{info.version_text} convolves on CUDA devices only; move the tensors to a GPU or use "
                f"{ENV_VAR}=torch"
            )
        _announce(f"torchsparse {info.version_text}", f"requested by the {source}")
        return "torchsparse"
    info = torchsparse_info()
    if info is None:
        _announce("pure-PyTorch", f"auto: torchsparse not importable; {ENV_VAR}=torchsparse makes it an error")
        return "torch"
    if device.type != "cuda":
        _announce("pure-PyTorch", f"auto: tensors on {device.type}, torchsparse is used on CUDA only")
        return "torch"
    _announce(f"torchsparse {info.version_text}", "auto: importable and tensors on CUDA")
    return "torchsparse"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` here: ``torch`` always; ``torchsparse`` when it imports and supports the
    device (CUDA; also the CPU before 2.1)."""
    out = ["torch"]
    info = torchsparse_info()
    if info is not None and info.supports(torch.device(device)):
        out.append("torchsparse")
    return out


# --- coordinate conversion ----------------------------------------------------------------------------------------
def to_torchsparse_coords(coords: torch.Tensor, stride: int, batch_first: bool) -> torch.Tensor:
    """This package's ``(b, x, y, z)`` at grid units of ``stride`` -> the layout of a torchsparse release."""
    if batch_first:
        return coords.int()
    return torch.cat([coords[:, 1:] * stride, coords[:, :1]], dim=1).int()


def from_torchsparse_coords(coords: torch.Tensor, stride: int, batch_first: bool) -> torch.Tensor:
    """Inverse of :func:`to_torchsparse_coords`."""
    if batch_first:
        return coords.int()
    return torch.cat([coords[:, 3:4], torch.div(coords[:, :3], stride, rounding_mode="floor")], dim=1).int()


_CACHE_ATTRS = ("_caches", "cmaps", "kmaps", "hashmaps", "coord_maps", "kernel_maps")


def torchsparse_conv(
    x, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: int, stride: int, transposed: bool, training: bool
):
    """Run one torchsparse convolution on a :class:`~one2345pp.sparse.tensor.SparseTensor`.

    ``weight`` is ``[K, C_in, C_out]`` with the kernel offsets in the order of :mod:`one2345pp.sparse.kernel_map`
    (torchsparse's ``get_kernel_offsets`` order). torchsparse's kernel maps and coordinate maps live in the caches
    of its tensors; they are carried from call to call in ``x.cache.backend_state`` so a UNet builds each map once.
    """
    info = require_torchsparse()
    ts = info.module
    functional = importlib.import_module("torchsparse.nn.functional")
    state = x.cache.backend_state
    ts_in = ts.SparseTensor(
        feats=x.feats, coords=to_torchsparse_coords(x.coords, x.stride, info.batch_first), stride=x.stride
    )
    for attr, value in state.get("torchsparse_caches", {}).items():
        setattr(ts_in, attr, value)
    # register the input's coordinates for its stride, so a transposed convolution can return to them
    key = (x.stride,) * 3
    if hasattr(ts_in, "_caches"):  # 2.1
        ts_in._caches.cmaps.setdefault(key, (ts_in.coords, getattr(ts_in, "spatial_range", None)))
    elif isinstance(getattr(ts_in, "cmaps", None), dict):  # 2.0: tuple strides
        ts_in.cmaps.setdefault(key, ts_in.coords)
    elif isinstance(getattr(ts_in, "coord_maps", None), dict):  # 1.4: integer strides
        ts_in.coord_maps.setdefault(x.stride, ts_in.coords)
    params = inspect.signature(functional.conv3d).parameters
    kwargs = {"kernel_size": kernel_size, "bias": bias, "stride": stride}
    kwargs["transposed" if "transposed" in params else "transpose"] = transposed
    if "training" in params:
        kwargs["training"] = training
    ts_out = functional.conv3d(ts_in, weight, **kwargs)
    state["torchsparse_caches"] = {a: getattr(ts_out, a) for a in _CACHE_ATTRS if hasattr(ts_out, a)}
    out_stride = x.stride // stride if transposed else x.stride * stride
    coords = from_torchsparse_coords(ts_out.coords, out_stride, info.batch_first)
    coords = x.cache.canonical_coords(out_stride, coords)
    return SparseTensor(coords, ts_out.feats, stride=out_stride, batch_size=x._batch_size, cache=x.cache)
