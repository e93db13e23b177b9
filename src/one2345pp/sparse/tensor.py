"""The sparse voxel tensor the sparse UNet works on.

A :class:`SparseTensor` holds ``coords`` int32 ``[N, 4]`` = ``(batch, x, y, z)`` (batch index FIRST) and ``feats``
``[N, C]``, one row per active voxel, plus its ``stride``: a tensor at stride ``s`` lives on the grid ``s`` times
coarser than the input grid and its ``x, y, z`` are indices of that coarser grid (cell ``i`` covers input cells
``s*i .. s*i + s - 1``). Rows may come in any order; coordinates must be unique and non-negative.

Tensors derived from one input (by the layers, :meth:`SparseTensor.replace` or :func:`cat`) share a
:class:`SparseCache` holding the kernel maps and the coordinates of every stride seen, so the convolutions of a UNet at
one stride reuse one map and an upsampling convolution finds the finer coordinates it returns to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode(coords: torch.Tensor, size: int) -> torch.Tensor:
    """int64 keys of ``coords`` [N, 4] for a grid of ``size`` (> largest spatial index + 2) cells per axis."""
    c = coords.long()
    return ((c[:, 0] * size + c[:, 1] + 1) * size + c[:, 2] + 1) * size + c[:, 3] + 1


class SparseCache:
    """Kernel maps, coordinates per stride and backend state shared by tensors derived from one input."""

    def __init__(self) -> None:
        self.maps: dict[tuple, tuple[torch.Tensor, object]] = {}  # key -> (coords the map was built for, map)
        self.coords: dict[int, torch.Tensor] = {}  # stride -> coordinates of the tensors at that stride
        self.backend_state: dict = {}  # torchsparse carries its own caches here
        self.builds = 0  # kernel maps built (reported by benchmarks and tests)

    def get_map(self, key: tuple, coords: torch.Tensor):
        """The map stored under ``key`` when it was built for these coordinates, else None."""
        entry = self.maps.get(key)
        if entry is None:
            return None
        built_for, kmap = entry
        if built_for is coords or (built_for.shape == coords.shape and torch.equal(built_for, coords)):
            return kmap
        return None

    def put_map(self, key: tuple, coords: torch.Tensor, kmap) -> None:
        self.maps[key] = (coords, kmap)
        self.builds += 1

    def record_coords(self, stride: int, coords: torch.Tensor) -> None:
        self.coords[int(stride)] = coords

    def canonical_coords(self, stride: int, coords: torch.Tensor) -> torch.Tensor:
        """The recorded coordinates of ``stride`` when equal to ``coords`` (so identity checks succeed), else
        ``coords``, which become the recorded ones."""
        known = self.coords.get(int(stride))
        if known is not None and known.shape == coords.shape and torch.equal(known, coords):
            return known
        self.coords[int(stride)] = coords
        return coords


def _check_coords(coords: torch.Tensor) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        coords = torch.as_tensor(coords)
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise TypeError(f"sparse coordinates must be integers, got dtype {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"sparse coordinates must be [N, 4] (batch, x, y, z), got shape {tuple(coords.shape)}")
    return coords.to(torch.int32).contiguous()


class SparseTensor:
    """Active voxels ``coords`` int32 [N, 4] (batch first) with features ``feats`` [N, C] at ``stride``."""

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        stride: int = 1,
        batch_size: int | None = None,
        cache: SparseCache | None = None,
    ):
        coords = _check_coords(coords)
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"sparse features must be [N, C] with N = {coords.shape[0]} coordinates, got shape {tuple(feats.shape)}"
            )
        if coords.device != feats.device:
            raise ValueError(f"coordinates on {coords.device} but features on {feats.device}")
        if int(stride) < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        self.coords = coords
        self.feats = feats
        self.stride = int(stride)
        self._batch_size = None if batch_size is None else int(batch_size)
        self.cache = cache if cache is not None else SparseCache()

    # --- properties --------------------------------------------------------------------------------------------
    @property
    def num_points(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_indices(self) -> torch.Tensor:
        """int64 [N]: the sample of each row."""
        return self.coords[:, 0].long()

    @property
    def batch_size(self) -> int:
        """Number of samples (given at construction, else 1 + the largest batch index)."""
        if self._batch_size is None:
            self._batch_size = int(self.coords[:, 0].max().item()) + 1 if self.num_points else 0
        return self._batch_size

    def __repr__(self) -> str:
        return (
            f"SparseTensor(points={self.num_points}, channels={self.num_channels}, stride={self.stride}, "
            f"batch_size={self._batch_size}, dtype={self.dtype}, device={self.device})"
        )

    # --- derived tensors -----------------------------------------------------------------------------------------
    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates, stride and cache with new features [N, C']."""
        return SparseTensor(self.coords, feats, self.stride, self._batch_size, self.cache)

    def apply(self, fn) -> SparseTensor:
        """``fn`` applied to the features (any row-wise function: activation, ``nn.Linear``, dropout)."""
        return self.replace(fn(self.feats))

    def broadcast(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Rows of ``per_sample`` [B, ...] gathered for every voxel -> [N, ...] (e.g. a time embedding)."""
        if per_sample.shape[0] < self.batch_size:
            raise ValueError(f"per-sample values have {per_sample.shape[0]} rows for batch size {self.batch_size}")
        return per_sample[self.batch_indices]

    def __add__(self, other: SparseTensor) -> SparseTensor:
        _require_same_coords(self, other, "add")
        return self.replace(self.feats + other.feats)

    def to(self, *args, **kwargs) -> SparseTensor:
        """Move or cast the features (and move the coordinates); a new cache when the device changes."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.feats.device:
            return self.replace(feats)
        return SparseTensor(self.coords.to(feats.device), feats, self.stride, self._batch_size)

    def detach(self) -> SparseTensor:
        return self.replace(self.feats.detach())

    def sorted(self) -> tuple[SparseTensor, torch.Tensor]:
        """Rows sorted by ``(batch, x, y, z)`` (new cache) and the permutation applied (int64 [N])."""
        perm = torch.argsort(encode(self.coords, int(self.coords[:, 1:].max().item()) + 3 if self.num_points else 3))
        return SparseTensor(self.coords[perm], self.feats[perm], self.stride, self._batch_size), perm

    # --- dense <-> sparse ----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None, stride: int = 1) -> SparseTensor:
        """Active sites of ``dense`` [B, C, X, Y, Z]: ``mask`` [B, X, Y, Z] (bool) or, without it, every site where
        some channel is non-zero. Rows come out sorted by ``(batch, x, y, z)``."""
        if dense.dim() != 5:
            raise ValueError(f"dense input must be [B, C, X, Y, Z], got shape {tuple(dense.shape)}")
        if mask is None:
            mask = (dense != 0).any(dim=1)
        if mask.shape != dense.shape[:1] + dense.shape[2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match dense shape {tuple(dense.shape)}")
        idx = torch.nonzero(mask.bool())
        feats = dense.permute(0, 2, 3, 4, 1)[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]]
        return cls(idx.to(torch.int32), feats, stride=stride, batch_size=dense.shape[0])

    def to_dense(
        self, shape: int | Sequence[int] | None = None, batch_size: int | None = None, fill: float = 0.0
    ) -> torch.Tensor:
        """[B, C, X, Y, Z] with the features at the active sites and ``fill`` elsewhere. ``shape`` is the spatial
        size (an int for a cube); default: the smallest that holds every coordinate."""
        if shape is None:
            shape = (self.coords[:, 1:].max(0).values + 1).tolist() if self.num_points else [1, 1, 1]
        elif isinstance(shape, int):
            shape = [shape] * 3
        shape = [int(s) for s in shape]
        if self.num_points and (self.coords[:, 1:].max(0).values >= torch.tensor(shape, device=self.device)).any():
            raise ValueError(f"coordinates up to {self.coords[:, 1:].max(0).values.tolist()} do not fit shape {shape}")
        b = self.batch_size if batch_size is None else int(batch_size)
        out = self.feats.new_full((b, shape[0], shape[1], shape[2], self.num_channels), fill)
        c = self.coords.long()
        out = out.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), self.feats)
        return out.permute(0, 4, 1, 2, 3).contiguous()

    # --- per-sample views ----------------------------------------------------------------------------------------
    @classmethod
    def from_samples(
        cls,
        coords: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor],
        stride: int = 1,
        device: torch.device | str | None = None,
    ) -> SparseTensor:
        """Batch samples given as ``coords[i]`` [N_i, 3] and ``feats[i]`` [N_i, C] (sample ``i`` gets batch index i)."""
        if len(coords) != len(feats) or not coords:
            raise ValueError(
                f"from_samples needs equally many (>= 1) coordinate and feature arrays, "
                f"got {len(coords)} and {len(feats)}"
            )
        rows, feat_rows = [], []
        for i, (c, f) in enumerate(zip(coords, feats, strict=True)):
            c = torch.as_tensor(c, device=device)
            if c.dim() != 2 or c.shape[1] != 3:
                raise ValueError(f"sample {i}: coordinates must be [N, 3], got shape {tuple(c.shape)}")
            rows.append(torch.cat([torch.full_like(c[:, :1], i), c], dim=1))
            feat_rows.append(torch.as_tensor(f, device=device))
        return cls(torch.cat(rows), torch.cat(feat_rows), stride=stride, batch_size=len(coords))

    def unbind(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample: ``(coords int32 [N_i, 3], feats [N_i, C])`` in row order."""
        b = self.batch_indices
        out = []
        for i in range(self.batch_size):
            sel = torch.nonzero(b == i).squeeze(1)
            out.append((self.coords[sel, 1:], self.feats[sel]))
        return out


def _require_same_coords(a: SparseTensor, b: SparseTensor, what: str) -> None:
    if a.stride != b.stride:
        raise ValueError(f"cannot {what} sparse tensors at strides {a.stride} and {b.stride}")
    if a.coords is b.coords:
        return
    if a.coords.shape != b.coords.shape or not torch.equal(a.coords, b.coords):
        raise ValueError(
            f"cannot {what} sparse tensors with different coordinates or row order "
            f"({a.num_points} and {b.num_points} points at stride {a.stride})"
        )


def cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Concatenate the features of tensors with the same coordinates (a UNet skip connection)."""
    if not tensors:
        raise ValueError("cat needs at least one sparse tensor")
    for t in tensors[1:]:
        _require_same_coords(tensors[0], t, "concatenate")
    return tensors[0].replace(torch.cat([t.feats for t in tensors], dim=1))
