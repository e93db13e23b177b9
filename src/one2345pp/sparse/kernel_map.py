"""Kernel maps of the pure-PyTorch backend, built from hashed or sorted coordinate keys and cached per stride.

Each coordinate ``(b, x, y, z)`` is encoded into one int64 key ``((b * S + x + 1) * S + y + 1) * S + z + 1`` with
``S = max(x, y, z) + 3``. The encoding is linear, so the key of a neighbour is ``key + delta(offset)``, and the margin
of one cell on each side keeps neighbours outside the grid from aliasing onto other rows. Neighbours are found either
in a dense lookup table indexed by the key (a collision-free hash over the ``B * S^3`` padded grid: one scatter and one
gather for all 27 offsets, used while the table stays under :data:`TABLE_LIMIT` entries) or with ``torch.searchsorted``
on the sorted keys (no extra memory; any grid size). Both are fully vectorised: no Python loop over offsets or rows.

Kernel offsets follow torchsparse's ``get_kernel_offsets`` order, so weights ``[K, C_in, C_out]`` mean the same in both
backends: for 3x3x3 kernels ``x`` varies fastest (index ``9 (dz+1) + 3 (dy+1) + (dx+1)``), for 2x2x2 kernels ``z``
varies fastest (index ``4 dx + 2 dy + dz``).

Maps are stored in the tensor's :class:`~one2345pp.sparse.tensor.SparseCache` under ``(kind, kernel, stride)`` together
with the coordinates they were built for; a map is reused only for those coordinates. Maps of CPU tensors are built
on one worker thread (:mod:`.workers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor import SparseTensor, encode
from .workers import single_threaded

OFFSETS_3 = torch.tensor([[dx, dy, dz] for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
OFFSETS_2 = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])
# largest dense lookup table (entries = batch * (max index + 3)^3) the ``table`` map builder may allocate: 32 Mi
# int32 entries = 128 MiB, enough for batch 8 at 128^3; larger grids use the sorted keys
TABLE_LIMIT = 1 << 25


def _grid_size(coords: torch.Tensor) -> int:
    if coords.shape[0] == 0:
        return 3
    lo = int(coords.min().item())
    if lo < 0:
        raise ValueError(f"sparse coordinates must be non-negative, found {lo}")
    return int(coords[:, 1:].max().item()) + 3


@dataclass
class SubmanifoldMap:
    """``nbr`` int64 [N, K]: the row at ``coords[o] + offset[k]`` for output row ``o``, or ``N`` where inactive."""

    nbr: torch.Tensor
    pairs: int  # active (input, output) pairs


@dataclass
class DownMap:
    """Stride-2 map from fine rows to their parents (kernel 2, stride 2).

    ``coords`` int32 [M, 4]: the parents (sorted by key); ``nbr`` int64 [M, 8]: the fine row of child ``k`` of each
    parent or ``N_fine``; ``rev`` int64 [N_fine]: ``parent * 8 + k`` of each fine row.
    """

    coords: torch.Tensor
    nbr: torch.Tensor
    rev: torch.Tensor


def _sorted_keys(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys, perm = torch.sort(encode(coords, size))
    if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
        dup = int(torch.nonzero(keys[1:] == keys[:-1])[0, 0])
        raise ValueError(f"sparse coordinates contain duplicates, e.g. {coords[perm[dup]].tolist()}")
    return keys, perm


def _check_unique_via_table(table: torch.Tensor, keys: torch.Tensor, coords: torch.Tensor) -> None:
    """``table[keys]`` holds each row's own index unless two rows share a key (the later write wins)."""
    rows = torch.arange(keys.shape[0], device=keys.device, dtype=table.dtype)
    lost = table[keys] != rows
    if bool(lost.any()):
        dup = int(torch.nonzero(lost)[0, 0])
        raise ValueError(f"sparse coordinates contain duplicates, e.g. {coords[dup].tolist()}")


def build_submanifold_map(coords: torch.Tensor, kernel_size: int = 3, method: str = "auto") -> SubmanifoldMap:
    """Neighbour table of a submanifold convolution (output sites = input sites).

    ``method``: ``table`` scatters the row indices into a dense lookup table over the (margin-padded) grid and reads
    the 27 neighbours of every row directly; ``sorted`` binary-searches the sorted keys (``torch.searchsorted``) and
    needs no memory beyond the map; ``auto`` uses the table when it has at most :data:`TABLE_LIMIT` entries.
    """
    if kernel_size != 3:
        raise ValueError(f"only 3x3x3 submanifold kernels are implemented, got {kernel_size}")
    if method not in ("auto", "table", "sorted"):
        raise ValueError(f"kernel map method must be auto, table or sorted, got {method!r}")
    n = coords.shape[0]
    size = _grid_size(coords)
    off = OFFSETS_3.to(coords.device)
    deltas = (off[:, 0] * size + off[:, 1]) * size + off[:, 2]  # [27]
    if n == 0:
        return SubmanifoldMap(torch.zeros(0, len(deltas), dtype=torch.long, device=coords.device), 0)
    batches = int(coords[:, 0].max().item()) + 1
    entries = batches * size**3
    if method == "table" or (method == "auto" and entries <= TABLE_LIMIT):
        keys = encode(coords, size)
        table = torch.full((entries,), n, dtype=torch.int32 if n < 2**31 - 1 else torch.long, device=coords.device)
        table[keys] = torch.arange(n, device=coords.device, dtype=table.dtype)
        _check_unique_via_table(table, keys, coords)
        nbr = table[keys[:, None] + deltas[None, :]].long()
    else:
        keys, perm = _sorted_keys(coords, size)
        query = (keys[:, None] + deltas[None, :]).reshape(-1)
        pos = torch.searchsorted(keys, query).clamp_(max=n - 1)
        nbr_sorted = torch.where(keys[pos] == query, perm[pos], n).view(n, len(deltas))
        nbr = torch.empty_like(nbr_sorted)
        nbr[perm] = nbr_sorted
    return SubmanifoldMap(nbr, int((nbr < n).sum().item()))


def build_down_map(coords: torch.Tensor) -> DownMap:
    """Parents (kernel 2, stride 2) of ``coords`` and the child table of each parent."""
    n = coords.shape[0]
    size = _grid_size(coords)
    _sorted_keys(coords, size)  # duplicate check
    c = coords.long()
    parent = torch.cat([c[:, :1], torch.div(c[:, 1:], 2, rounding_mode="floor")], dim=1)
    pkeys, inverse = torch.unique(encode(parent, size), sorted=True, return_inverse=True)
    m = pkeys.shape[0]
    out = torch.empty(m, 4, dtype=torch.int32, device=coords.device)
    out[inverse] = parent.to(torch.int32)
    parity = (c[:, 1] & 1) * 4 + (c[:, 2] & 1) * 2 + (c[:, 3] & 1)
    rev = inverse * 8 + parity
    nbr = torch.full((m * 8,), n, dtype=torch.long, device=coords.device)
    nbr[rev] = torch.arange(n, device=coords.device)
    return DownMap(out, nbr.view(m, 8), rev)


def submanifold_map(x: SparseTensor, kernel_size: int = 3) -> SubmanifoldMap:
    """The cached submanifold map of ``x`` (built on first use at this stride and coordinates)."""
    key = ("subm", kernel_size, x.stride)
    kmap = x.cache.get_map(key, x.coords)
    if kmap is None:
        kmap = single_threaded(x.device, lambda: build_submanifold_map(x.coords, kernel_size))
        x.cache.put_map(key, x.coords, kmap)
    x.cache.record_coords(x.stride, x.coords)
    return kmap


def down_map(x: SparseTensor) -> DownMap:
    """The cached stride-2 map of ``x``; records the coordinates of both strides for the way back up."""
    key = ("down", 2, x.stride)
    kmap = x.cache.get_map(key, x.coords)
    if kmap is None:
        kmap = single_threaded(x.device, lambda: build_down_map(x.coords))
        x.cache.put_map(key, x.coords, kmap)
    x.cache.record_coords(x.stride, x.coords)
    x.cache.record_coords(2 * x.stride, kmap.coords)
    return kmap


def up_map(x: SparseTensor, like: SparseTensor | None = None) -> tuple[DownMap, torch.Tensor]:
    """``(map, fine coords)`` for an upsampling convolution of ``x`` back to stride ``x.stride // 2``.

    The fine coordinates are those of ``like`` when given, else the ones recorded when the finer tensor was
    downsampled. ``x`` must sit at the parents of the fine coordinates, in the order the downsampling produced.
    """
    if x.stride % 2:
        raise ValueError(f"cannot upsample a sparse tensor at odd stride {x.stride}")
    fine_stride = x.stride // 2
    if like is not None:
        if like.stride != fine_stride:
            raise ValueError(f"upsampling target has stride {like.stride}, expected {fine_stride}")
        kmap = down_map(like)
    else:
        fine = x.cache.coords.get(fine_stride)
        if fine is None:
            raise ValueError(
                f"no coordinates known at stride {fine_stride}: upsample a tensor produced by a "
                f"strided convolution, or pass the finer tensor as `like`"
            )
        kmap = x.cache.get_map(("down", 2, fine_stride), fine)
        if kmap is None:
            kmap = single_threaded(x.device, lambda: build_down_map(fine))
            x.cache.put_map(("down", 2, fine_stride), fine, kmap)
    fine_coords = x.cache.coords[fine_stride] if like is None else like.coords
    if kmap.coords is not x.coords and (kmap.coords.shape != x.coords.shape or not torch.equal(kmap.coords, x.coords)):
        raise ValueError(
            f"upsampling input ({x.num_points} points at stride {x.stride}) is not at the parents of the "
            f"finer coordinates ({kmap.coords.shape[0]} parents) in their order"
        )
    return kmap, fine_coords
