"""Sparse voxel tensors and the layers of a sparse 3D UNet, with two interchangeable backends.

* :mod:`.tensor`: :class:`SparseTensor` (coordinates ``(batch, x, y, z)`` int32 [N, 4], features [N, C], stride) and
  :func:`cat` for skip connections;
* :mod:`.layers`: :class:`SubmanifoldConv3d`, :class:`StridedConv3d`, :class:`TransposedConv3d`,
  :class:`SparseGroupNorm`, :class:`Activation`, :class:`SparseLinear`;
* :mod:`.kernel_map`: the pure-PyTorch kernel maps (sorted int64 keys + ``searchsorted``), cached per stride;
* :mod:`.backends`: the ``torch`` / ``torchsparse`` switch (config value or ``ONE2345PP_SPARSE_BACKEND``).
"""

from .backends import BACKENDS, ENV_VAR, available_backends, resolve_backend
from .layers import (
    Activation,
    SparseGroupNorm,
    SparseLinear,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
)
from .tensor import SparseCache, SparseTensor, cat

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Activation",
    "SparseCache",
    "SparseGroupNorm",
    "SparseLinear",
    "SparseTensor",
    "StridedConv3d",
    "SubmanifoldConv3d",
    "TransposedConv3d",
    "available_backends",
    "cat",
    "resolve_backend",
]
