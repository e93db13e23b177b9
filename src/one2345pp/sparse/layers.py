"""Layers of a sparse UNet: submanifold 3x3x3 convolution, stride-2 convolution (kernel 2), its transposed
convolution back to the finer coordinates, per-sample GroupNorm, activations and a pointwise linear layer.

Every layer takes and returns a :class:`~one2345pp.sparse.tensor.SparseTensor`, so ``nn.Sequential`` chains them.
Convolution weights are ``[K, C_in, C_out]`` (kernel offsets in :mod:`~one2345pp.sparse.kernel_map` order) and biases
``[C_out]``, under the keys ``weight`` / ``bias`` whichever backend runs them (:mod:`~one2345pp.sparse.backends`).

The pure-PyTorch convolutions are gather - matmul - scatter over all kernel offsets at once. A kernel map gives, for
each output row, the input row under each of the ``K`` offsets (or a zero padding row); the ``K`` gathered rows are
laid side by side and one matrix product with the weights reshaped to ``[K * C_in, C_out]`` yields the output (the
implicit-GEMM formulation: one large GEMM instead of ``K`` small ones followed by scattered adds). Rows are processed
in chunks so the gathered block stays small; on CPUs the chunks go to worker threads (see :mod:`.workers`).
The backward passes use the same tables and need no scatter either:

* submanifold: the input gradient is the same gather-GEMM on the output gradient with the kernel mirrored and
  transposed (the neighbour relation is symmetric);
* stride 2 (kernel 2): every fine row has exactly one parent, so the input gradient is ``g @ W^T`` read back at
  ``parent * 8 + child``;
* transposed: the forward pass is that read-back, the backward passes the gather-GEMMs of the children.

All of it is deterministic (no atomic adds). Under autocast the products run in the autocast dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .backends import resolve_backend, torchsparse_conv
from .kernel_map import down_map, submanifold_map, up_map
from .tensor import SparseTensor, cat
from .workers import WORKERS, single_threaded, use_workers

__all__ = [
    "SubmanifoldConv3d",
    "StridedConv3d",
    "TransposedConv3d",
    "SparseGroupNorm",
    "Activation",
    "SparseLinear",
    "cat",
]

# gathered elements per chunk of rows: small blocks on CPUs (cache-sized), large ones on GPUs (few, big GEMMs)
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


# --- compute helpers ----------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4 takes no device type (CUDA only)
        enabled = dev == "cuda" and torch.is_autocast_enabled()
    if enabled and x.dtype.is_floating_point:
        try:
            return torch.get_autocast_dtype(dev)
        except AttributeError:  # torch < 2.4
            return torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()
    return x.dtype


def _padded(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)


def _chunk_rows(x: torch.Tensor, k: int) -> int:
    budget = CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(1, k * x.shape[1]))


def gather_gemm(x: torch.Tensor, w2: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """``out[o] = concat_k x[nbr[o, k]] @ w2`` with ``nbr == len(x)`` meaning zero; ``w2`` is [K * C, C_out]."""
    n_out, k = nbr.shape
    xp = _padded(x)
    out = x.new_empty(n_out, w2.shape[1])
    step = _chunk_rows(x, k)

    def chunk(s: int) -> None:
        idx = nbr[s : s + step]
        torch.mm(xp.index_select(0, idx.reshape(-1)).view(idx.shape[0], -1), w2, out=out[s : s + step])

    starts = list(range(0, n_out, step))
    if use_workers(x.device, len(starts)):
        WORKERS.map(chunk, starts)
    else:
        for s in starts:
            chunk(s)
    return out


def gather_weight_grad(x: torch.Tensor, g: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """``sum_o concat_k x[nbr[o, k]]^T g[o]`` -> [K * C, C_out]: the weight gradient of :func:`gather_gemm`,
    accumulated over chunks in at least float32. With worker threads the rows are cut into a fixed number of
    segments, each summed in order and the segment sums added in order, so the result does not depend on which thread
    took which segment."""
    n_out, k = nbr.shape
    xp = _padded(x)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    step = _chunk_rows(x, k)

    def segment(bounds: tuple[int, int]) -> torch.Tensor:
        acc = torch.zeros(k * x.shape[1], g.shape[1], device=x.device, dtype=acc_dtype)
        for s in range(bounds[0], bounds[1], step):
            e = min(s + step, bounds[1])
            block = xp.index_select(0, nbr[s:e].reshape(-1)).view(e - s, -1).t()
            if acc_dtype == x.dtype:
                acc.addmm_(block, g[s:e])
            else:
                acc += torch.mm(block, g[s:e])
        return acc

    chunks = max(1, math.ceil(n_out / step))
    if not use_workers(x.device, chunks):
        return segment((0, n_out))
    per = math.ceil(chunks / min(chunks, 4 * torch.get_num_threads())) * step
    parts = WORKERS.map(segment, [(s, min(s + per, n_out)) for s in range(0, n_out, per)])
    acc = parts[0]
    for p in parts[1:]:
        acc += p
    return acc


def _read_back(x: torch.Tensor, w: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """Row ``j`` = ``x[rev[j] // K] @ w[rev[j] % K]`` for ``w`` [C_in, K, C_out] (every fine row has one parent)."""
    cin, k, cout = w.shape
    return (x @ w.reshape(cin, k * cout)).view(-1, cout).index_select(0, rev)


class _ConvFn(Function):
    """Sparse convolution on features; ``mode`` is ``subm`` (map: neighbour table), ``down`` or ``up`` (a DownMap)."""

    @staticmethod
    def forward(ctx, x, weight, kmap, mode):
        dt = _compute_dtype(x)
        k, cin, cout = weight.shape
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dt).contiguous(), weight.to(dt)
            if mode in ("subm", "down"):
                out = gather_gemm(xc, wc.reshape(k * cin, cout), kmap.nbr)
            else:  # up: out[j] = x[parent j] @ W[child j]
                out = single_threaded(x.device, lambda: _read_back(xc, wc.permute(1, 0, 2), kmap.rev))
        ctx.save_for_backward(x, weight)
        ctx.kmap, ctx.mode, ctx.dt = kmap, mode, dt
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        kmap, mode, dt = ctx.kmap, ctx.mode, ctx.dt
        k, cin, cout = weight.shape
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            g = g.to(dt).contiguous()
            xc, wc = x.to(dt).contiguous(), weight.to(dt)
            if mode == "subm":
                if ctx.needs_input_grad[0]:
                    grad_x = gather_gemm(g, wc.flip(0).transpose(1, 2).reshape(k * cout, cin), kmap.nbr)
                if ctx.needs_input_grad[1]:
                    grad_w = gather_weight_grad(xc, g, kmap.nbr).view(k, cin, cout)
            elif mode == "down":  # fine row j: g[parent j] @ W[child j]^T
                if ctx.needs_input_grad[0]:
                    grad_x = single_threaded(x.device, lambda: _read_back(g, wc.permute(2, 0, 1), kmap.rev))
                if ctx.needs_input_grad[1]:
                    grad_w = gather_weight_grad(xc, g, kmap.nbr).view(k, cin, cout)
            else:  # up: parent p gathers the gradients of its children
                if ctx.needs_input_grad[0]:
                    grad_x = gather_gemm(g, wc.transpose(1, 2).reshape(k * cout, cin), kmap.nbr)
                if ctx.needs_input_grad[1]:
                    grad_w = gather_weight_grad(g, xc, kmap.nbr).view(k, cout, cin).transpose(1, 2)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype).contiguous()
        return grad_x, grad_w, None, None


# --- convolution modules ------------------------------------------------------------------------------------------
class _SparseConv(nn.Module):
    kernel_volume = 27
    taps_per_output = 27  # kernel taps reaching one output site (sets the initial weight scale)

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, backend: str = "auto"):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.backend = int(in_channels), int(out_channels), backend
        self.weight = nn.Parameter(torch.empty(self.kernel_volume, self.in_channels, self.out_channels))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.taps_per_output)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}, backend={self.backend!r}"

    def _check(self, x: SparseTensor) -> str:
        if x.num_channels != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {x.num_channels}")
        return resolve_backend(self.backend, x.device)

    def _bias(self, feats: torch.Tensor) -> torch.Tensor:
        return feats if self.bias is None else feats + self.bias.to(feats.dtype)


class SubmanifoldConv3d(_SparseConv):
    """3x3x3 convolution evaluated at the active sites only (output coordinates = input coordinates)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self._check(x) == "torchsparse":
            return torchsparse_conv(x, self.weight, self.bias, 3, 1, False, self.training)
        feats = _ConvFn.apply(x.feats, self.weight, submanifold_map(x), "subm")
        return x.replace(self._bias(feats))


class StridedConv3d(_SparseConv):
    """Kernel 2, stride 2: one output per occupied parent cell ``floor(p / 2)``; stride doubles."""

    kernel_volume = 8
    taps_per_output = 8

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self._check(x) == "torchsparse":
            return torchsparse_conv(x, self.weight, self.bias, 2, 2, False, self.training)
        kmap = down_map(x)
        feats = _ConvFn.apply(x.feats, self.weight, kmap, "down")
        return SparseTensor(kmap.coords, self._bias(feats), x.stride * 2, x._batch_size, x.cache)


class TransposedConv3d(_SparseConv):
    """Transposed kernel-2 stride-2 convolution back to the finer coordinates a :class:`StridedConv3d` came from
    (or those of ``like``): fine site ``p`` gets ``x[floor(p / 2)] @ W[p mod 2]``; stride halves."""

    kernel_volume = 8
    taps_per_output = 1

    def forward(self, x: SparseTensor, like: SparseTensor | None = None) -> SparseTensor:
        if self._check(x) == "torchsparse":
            if like is not None and like.cache is not x.cache:
                raise ValueError(
                    "TransposedConv3d(like=...) with the torchsparse backend needs `like` derived from "
                    "the same input as `x` (torchsparse returns to the coordinates it recorded)"
                )
            out = torchsparse_conv(x, self.weight, self.bias, 2, 2, True, self.training)
            if like is not None and not torch.equal(out.coords, like.coords):
                raise ValueError("torchsparse returned to coordinates other than those of `like`")
            return out
        kmap, fine_coords = up_map(x, like)
        feats = _ConvFn.apply(x.feats, self.weight, kmap, "up")
        return SparseTensor(fine_coords, self._bias(feats), x.stride // 2, x._batch_size, x.cache)


# --- pointwise modules --------------------------------------------------------------------------------------------
class SparseGroupNorm(nn.Module):
    """GroupNorm over the active sites of each sample separately (statistics in at least float32); parameters as
    ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be a positive multiple of num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.num_channels:
            raise ValueError(f"SparseGroupNorm expects {self.num_channels} channels, got {x.num_channels}")
        n, g = x.num_points, self.num_groups
        b, nb = x.batch_indices, x.batch_size
        f = x.feats.to(torch.promote_types(x.dtype, torch.float32)).view(n, g, -1)
        per_group = f.shape[2]
        counts = f.new_zeros(nb).index_add_(0, b, f.new_ones(n))
        counts = (counts * per_group).clamp_(min=1.0)[:, None]
        mean = f.new_zeros(nb, g).index_add(0, b, f.sum(-1)) / counts
        centered = f - mean[b][:, :, None]
        var = f.new_zeros(nb, g).index_add(0, b, centered.square().sum(-1)) / counts
        out = (centered * torch.rsqrt(var + self.eps)[b][:, :, None]).view(n, -1)
        if self.weight is not None:
            out = out * self.weight + self.bias
        return x.replace(out.to(x.dtype))


_ACTIVATIONS = {
    "silu": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "leaky_relu": lambda t: nn.functional.leaky_relu(t, 0.2),
}


class Activation(nn.Module):
    """Element-wise activation on the features: ``silu``, ``relu``, ``gelu`` or ``leaky_relu`` (slope 0.2)."""

    def __init__(self, kind: str = "silu"):
        super().__init__()
        if kind not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {kind!r}")
        self.kind = kind

    def extra_repr(self) -> str:
        return self.kind

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(_ACTIVATIONS[self.kind](x.feats))


class SparseLinear(nn.Linear):
    """``nn.Linear`` on the features (a 1x1x1 convolution); same parameters and keys as ``nn.Linear``."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))
