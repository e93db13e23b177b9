"""Sparse tensors and layers against dense PyTorch references, for every backend that runs on this machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from one2345pp.sparse import (
    ENV_VAR,
    Activation,
    SparseGroupNorm,
    SparseLinear,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    available_backends,
    cat,
    resolve_backend,
)
from one2345pp.sparse import backends as backends_mod
from one2345pp.sparse.kernel_map import OFFSETS_2, OFFSETS_3, build_down_map, build_submanifold_map

# every backend that runs here: torch in float64 on the CPU; torchsparse wherever it imports (float32)
CASES = [(name, "cpu", torch.float64 if name == "torch" else torch.float32) for name in available_backends("cpu")]
if torch.cuda.is_available():
    CASES += [(name, "cuda", torch.float32) for name in available_backends("cuda")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def random_dense(batch, res, channels, occupancy, dtype, device, seed=0):
    """Random features at random active sites: (dense [B, C, R, R, R] zero elsewhere, mask [B, R, R, R])."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, res, res, res, generator=gen) < occupancy
    dense = torch.randn(batch, channels, res, res, res, generator=gen, dtype=torch.float64) * mask[:, None]
    return dense.to(device, dtype), mask.to(device)


def shuffled(x: SparseTensor, seed=1) -> SparseTensor:
    """The same tensor with its rows in a random order (layers must not rely on sorted rows)."""
    perm = torch.randperm(x.num_points, generator=torch.Generator().manual_seed(seed)).to(x.device)
    return SparseTensor(x.coords[perm], x.feats[perm].detach().clone(), x.stride, x.batch_size)


def read_at(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Rows of dense [B, C, X, Y, Z] at coords [N, 4] -> [N, C]."""
    c = coords.long()
    return dense.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def dense_weight_3(w: torch.Tensor) -> torch.Tensor:
    """[27, C_in, C_out] in kernel-map order (x fastest) -> conv3d weight [C_out, C_in, 3, 3, 3] ([dx, dy, dz])."""
    return w.view(3, 3, 3, w.shape[1], w.shape[2]).permute(4, 3, 2, 1, 0)


def dense_weight_2(w: torch.Tensor) -> torch.Tensor:
    """[8, C_in, C_out] (z fastest) -> [C_in, C_out, 2, 2, 2] indexed [dx, dy, dz]."""
    return w.view(2, 2, 2, w.shape[1], w.shape[2]).permute(3, 4, 0, 1, 2)


def test_kernel_offset_orders():
    assert OFFSETS_3[0].tolist() == [-1, -1, -1] and OFFSETS_3[1].tolist() == [0, -1, -1]  # x fastest
    assert OFFSETS_3[13].tolist() == [0, 0, 0] and (OFFSETS_3 + OFFSETS_3.flip(0) == 0).all()
    assert OFFSETS_2[1].tolist() == [0, 0, 1] and OFFSETS_2[4].tolist() == [1, 0, 0]  # z fastest


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_submanifold_conv_matches_dense(backend, device, dtype):
    dense, mask = random_dense(2, 9, 5, 0.35, dtype, device)
    x = shuffled(SparseTensor.from_dense(dense, mask))
    conv = SubmanifoldConv3d(5, 6, backend=backend).to(device, dtype)
    x.feats.requires_grad_(True)
    y = conv(x)
    assert y.stride == 1 and y.num_channels == 6
    dense_in = dense.clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    b_ref = conv.bias.detach().clone().requires_grad_(True)
    ref = F.conv3d(dense_in, dense_weight_3(w_ref), b_ref, padding=1)
    torch.testing.assert_close(y.feats, read_at(ref, y.coords), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(y.coords, x.coords)  # submanifold: same sites, same order
    # gradients of a random linear functional of the outputs at the active sites
    g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device, dtype)
    (y.feats * g).sum().backward()
    (read_at(ref, y.coords) * g).sum().backward()
    torch.testing.assert_close(x.feats.grad, read_at(dense_in.grad, x.coords), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(conv.bias.grad, b_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_strided_conv_matches_dense(backend, device, dtype):
    dense, mask = random_dense(2, 10, 4, 0.2, dtype, device, seed=3)
    x = shuffled(SparseTensor.from_dense(dense, mask))
    conv = StridedConv3d(4, 7, backend=backend).to(device, dtype)
    x.feats.requires_grad_(True)
    y = conv(x)
    assert y.stride == 2 and y.batch_size == 2
    # the outputs are exactly the occupied parent cells
    parents = torch.nonzero(F.max_pool3d(mask.float(), 2) > 0).int()
    assert sorted(map(tuple, y.coords.tolist())) == sorted(map(tuple, parents.tolist()))
    dense_in = dense.clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    ref = F.conv3d(dense_in, dense_weight_2(w_ref).transpose(0, 1), conv.bias.detach(), stride=2)
    torch.testing.assert_close(y.feats, read_at(ref, y.coords), atol=TOL[dtype], rtol=TOL[dtype])
    g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device, dtype)
    (y.feats * g).sum().backward()
    (read_at(ref, y.coords) * g).sum().backward()
    torch.testing.assert_close(x.feats.grad, read_at(dense_in.grad, x.coords), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_transposed_conv_matches_dense(backend, device, dtype):
    dense, mask = random_dense(2, 10, 3, 0.25, dtype, device, seed=4)
    fine = shuffled(SparseTensor.from_dense(dense, mask))
    coarse = StridedConv3d(3, 5, backend=backend).to(device, dtype)(fine)
    h = coarse.replace(torch.randn(coarse.feats.shape, dtype=torch.float64).to(device, dtype).requires_grad_(True))
    up = TransposedConv3d(5, 4, backend=backend).to(device, dtype)
    y = up(h)
    assert y.stride == 1 and torch.equal(y.coords, fine.coords)  # back at the finer coordinates, in their order
    h_dense = h.to_dense(5).detach().requires_grad_(True)
    w_ref = up.weight.detach().clone().requires_grad_(True)
    b_ref = up.bias.detach().clone().requires_grad_(True)
    ref = F.conv_transpose3d(h_dense, dense_weight_2(w_ref), b_ref, stride=2)
    torch.testing.assert_close(y.feats, read_at(ref, y.coords), atol=TOL[dtype], rtol=TOL[dtype])
    g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device, dtype)
    (y.feats * g).sum().backward()
    (read_at(ref, y.coords) * g).sum().backward()
    torch.testing.assert_close(h.feats.grad, read_at(h_dense.grad, h.coords), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(up.weight.grad, w_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(up.bias.grad, b_ref.grad, atol=TOL[dtype], rtol=TOL[dtype])


def test_transposed_conv_to_explicit_target_and_errors():
    dense, mask = random_dense(1, 8, 2, 0.3, torch.float64, "cpu", seed=8)
    fine = SparseTensor.from_dense(dense, mask)
    down, up = StridedConv3d(2, 3, backend="torch").double(), TransposedConv3d(3, 2, backend="torch").double()
    coarse = down(fine)
    fresh = SparseTensor(coarse.coords.clone(), coarse.feats.detach())  # no shared cache
    with pytest.raises(ValueError, match="no coordinates known at stride"):
        up(SparseTensor(fresh.coords, fresh.feats, stride=2))
    out = up(SparseTensor(fresh.coords, fresh.feats, stride=2), like=fine)
    torch.testing.assert_close(out.feats, up(coarse).feats)
    with pytest.raises(ValueError, match="not at the parents"):
        up(SparseTensor(fresh.coords[:-1], fresh.feats[:-1], stride=2), like=fine)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_batch_samples_do_not_mix(backend, device, dtype):
    """A small UNet over a batch gives, per sample, what it gives on that sample alone (same spatial sites too)."""
    dense, mask = random_dense(2, 8, 3, 0.3, dtype, device, seed=9)
    mask[1] |= mask[0]  # sample 1 contains every site of sample 0: neighbours across samples would mix
    dense = dense * mask[:, None]
    torch.manual_seed(0)
    enc = nn.Sequential(SubmanifoldConv3d(3, 8, backend=backend), SparseGroupNorm(2, 8), Activation("silu"))
    down = StridedConv3d(8, 8, backend=backend)
    mid = nn.Sequential(SubmanifoldConv3d(8, 8, backend=backend), SparseGroupNorm(4, 8), Activation("relu"))
    up = TransposedConv3d(8, 8, backend=backend)
    head = nn.Sequential(SubmanifoldConv3d(16, 4, backend=backend), SparseLinear(4, 2))
    for m in (enc, down, mid, up, head):
        m.to(device, dtype)

    def unet(x):
        skip = enc(x)
        return head(cat([skip, up(mid(down(skip)))]))

    both = unet(SparseTensor.from_dense(dense, mask))
    for b in range(2):
        alone = unet(SparseTensor.from_dense(dense[b : b + 1], mask[b : b + 1]))
        sel = both.coords[:, 0] == b
        rows = {tuple(c): f for c, f in zip(both.coords[sel, 1:].tolist(), both.feats[sel], strict=True)}
        ref = torch.stack([rows[tuple(c)] for c in alone.coords[:, 1:].tolist()])
        torch.testing.assert_close(ref, alone.feats, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


def test_group_norm_matches_masked_dense_reference():
    dense, mask = random_dense(3, 6, 6, 0.4, torch.float64, "cpu", seed=10)
    dense = dense * 3.0 + 2.0 * mask[:, None]  # non-zero mean
    mask[2] = False  # an empty sample must not disturb the others
    x = shuffled(SparseTensor.from_dense(dense, mask))
    x = SparseTensor(x.coords, x.feats, batch_size=3)
    norm = SparseGroupNorm(3, 6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    y = norm(x)
    for b in range(2):
        sites = dense[b][:, mask[b]]  # [C, n_b]
        groups = sites.view(3, 2, -1)
        mean = groups.mean(dim=(1, 2), keepdim=True)
        var = groups.var(dim=(1, 2), unbiased=False, keepdim=True)
        ref = ((groups - mean) / torch.sqrt(var + 1e-5)).view(6, -1) * norm.weight[:, None] + norm.bias[:, None]
        ref_dense = torch.zeros_like(dense[b]).masked_scatter(mask[b][None].expand_as(dense[b]), ref.detach())
        sel = y.coords[:, 0] == b
        sites_b = y.coords[sel].clone()
        sites_b[:, 0] = 0
        torch.testing.assert_close(y.feats[sel].detach(), read_at(ref_dense[None], sites_b))


def test_autocast_bfloat16_runs_and_stays_close():
    dense, mask = random_dense(1, 8, 8, 0.3, torch.float32, "cpu", seed=11)
    x = SparseTensor.from_dense(dense, mask)
    conv = SubmanifoldConv3d(8, 8, backend="torch")
    ref = conv(x).feats
    feats = x.feats.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x.replace(feats))
    assert y.feats.dtype == torch.bfloat16
    torch.testing.assert_close(y.feats.float(), ref, atol=0.05, rtol=0.05)
    y.feats.float().sum().backward()
    assert feats.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all()


def test_kernel_maps_are_cached_per_stride_and_checked():
    dense, mask = random_dense(1, 8, 4, 0.3, torch.float32, "cpu", seed=12)
    x = SparseTensor.from_dense(dense, mask)
    c1, c2 = SubmanifoldConv3d(4, 4, backend="torch"), SubmanifoldConv3d(4, 4, backend="torch")
    y = c2(c1(x))
    assert x.cache.builds == 1 and y.cache is x.cache
    StridedConv3d(4, 4, backend="torch")(y)
    assert x.cache.builds == 2
    # neighbour tables (dense lookup table and sorted keys) against brute force, on a shuffled batch of 2
    d2, m2 = random_dense(2, 7, 1, 0.3, torch.float32, "cpu", seed=14)
    coords = shuffled(SparseTensor.from_dense(d2, m2)).coords
    lookup = {tuple(c): i for i, c in enumerate(coords.tolist())}
    expected = torch.tensor(
        [
            [lookup.get((c[0], c[1] + dx, c[2] + dy, c[3] + dz), len(coords)) for dx, dy, dz in OFFSETS_3.tolist()]
            for c in coords.tolist()
        ]
    )
    for method in ("table", "sorted", "auto"):
        kmap = build_submanifold_map(coords, method=method)
        assert torch.equal(kmap.nbr, expected), method
        assert kmap.pairs == int((expected < len(coords)).sum())
        with pytest.raises(ValueError, match=r"duplicates, e.g. \[0, 1, 2, 3\]"):
            build_submanifold_map(
                torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0], [0, 1, 2, 3]], dtype=torch.int32), method=method
            )
    with pytest.raises(ValueError, match="method must be auto, table or sorted"):
        build_submanifold_map(coords, method="hash")
    assert build_submanifold_map(coords[:0]).nbr.shape == (0, 27)
    dmap = build_down_map(x.coords)
    assert (dmap.nbr.view(-1)[dmap.rev] == torch.arange(x.num_points)).all()
    with pytest.raises(ValueError, match="non-negative"):
        build_submanifold_map(torch.tensor([[0, -1, 2, 3]], dtype=torch.int32))


def test_sparse_tensor_conversions_and_errors():
    dense, mask = random_dense(2, 5, 3, 0.4, torch.float32, "cpu", seed=13)
    x = SparseTensor.from_dense(dense, mask)
    torch.testing.assert_close(x.to_dense(5), dense)
    parts = x.unbind()
    y = SparseTensor.from_samples([c for c, _ in parts], [f for _, f in parts])
    assert torch.equal(y.coords, x.coords) and torch.equal(y.feats, x.feats) and y.batch_size == 2
    s, perm = shuffled(x).sorted()
    assert torch.equal(s.coords, x.coords)
    torch.testing.assert_close(x.broadcast(torch.tensor([[1.0], [2.0]])).squeeze(1), x.coords[:, 0].float() + 1)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SparseTensor(torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 1))
    with pytest.raises(TypeError, match="integers"):
        SparseTensor(torch.zeros(3, 4), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="different coordinates"):
        cat([x, shuffled(x)])
    with pytest.raises(ValueError, match="expects 4 channels"):
        SubmanifoldConv3d(4, 4, backend="torch")(x)


def test_backend_switch(monkeypatch, capsys):
    monkeypatch.setattr(backends_mod, "_announced", set())
    assert resolve_backend("torch") == "torch"
    assert "using the pure-PyTorch backend (requested by the config)" in capsys.readouterr().err
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=f"'bogus' from the environment variable {ENV_VAR}"):
        resolve_backend("torch")
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("torchsparse") == "torch"  # the environment wins over the config value
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="'sparse' from the config"):
        resolve_backend("sparse")

    def missing():
        raise ImportError("No module named 'torchsparse'")

    monkeypatch.setattr(backends_mod, "_import_torchsparse", missing)
    backends_mod._load.cache_clear()
    try:
        with pytest.raises(ImportError, match="torchsparse sparse-convolution backend was requested"):
            resolve_backend("torchsparse")
        assert resolve_backend("auto", "cuda") == "torch"
        assert available_backends("cuda") == ["torch"]
    finally:
        backends_mod._load.cache_clear()


@pytest.mark.parametrize("batch_first", [False, True])
def test_torchsparse_coordinate_layouts(batch_first):
    coords = torch.tensor([[0, 1, 2, 3], [1, 4, 0, 7]], dtype=torch.int32)
    ts = backends_mod.to_torchsparse_coords(coords, 4, batch_first)
    if batch_first:  # 2.1: (b, x, y, z) in grid units of the stride
        assert ts.tolist() == coords.tolist()
    else:  # 1.4 / 2.0: (x, y, z, b) as multiples of the stride
        assert ts.tolist() == [[4, 8, 12, 0], [16, 0, 28, 1]]
    assert backends_mod.from_torchsparse_coords(ts, 4, batch_first).tolist() == coords.tolist()
    assert backends_mod.parse_version("2.1.0+torch20cu118") == (2, 1, 0)
    info = backends_mod.TorchsparseInfo(module=backends_mod, version=(2, 1, 0) if batch_first else (1, 4, 0))
    assert info.batch_first is batch_first


# --- the torchsparse adapter against a stand-in module with each release's coordinate layout ----------------------
def fake_torchsparse(version: str):
    """Modules ``torchsparse`` / ``torchsparse.nn.functional`` that follow a torchsparse release's conventions
    (coordinate layout, stride type, cache attributes, keyword names) and compute with dense PyTorch convolutions, so
    the adapter's conversions and cache plumbing are checked where the real library is absent."""
    import types

    major_minor = tuple(int(v) for v in version.split(".")[:2])
    batch_first = major_minor >= (2, 1)

    def stride_int(stride):
        return stride[0] if isinstance(stride, tuple) else stride

    class Caches:
        def __init__(self):
            self.cmaps, self.kmaps, self.hashmaps = {}, {}, {}

    class FakeSparseTensor:
        def __init__(self, feats, coords, stride=1):
            self.feats, self.coords = feats, coords
            if major_minor >= (2, 0):
                self.stride = stride if isinstance(stride, tuple) else (stride,) * 3
            else:
                self.stride = stride
            if batch_first:
                self._caches = Caches()
            elif major_minor >= (2, 0):
                self.cmaps, self.kmaps = {}, {}
            else:
                self.coord_maps, self.kernel_maps = {}, {}

    def decode(coords, s):  # -> (b, x, y, z) in grid units of the stride
        c = coords.long()
        return c if batch_first else torch.cat([c[:, 3:], torch.div(c[:, :3], s, rounding_mode="floor")], 1)

    def encode(c, s):
        return c.int() if batch_first else torch.cat([c[:, 1:] * s, c[:, :1]], 1).int()

    def cmaps(t):
        return t._caches.cmaps if batch_first else (t.cmaps if major_minor >= (2, 0) else t.coord_maps)

    def conv3d(input, weight, kernel_size, bias=None, stride=1, **flags):
        transposed = flags.get("transposed", flags.get("transpose", False))
        s = stride_int(input.stride)
        c = decode(input.coords, s)
        size = 2 * (int(c[:, 1:].max()) // 2 + 2)
        b = int(c[:, 0].max()) + 1
        grid = input.feats.new_zeros(b, size, size, size, input.feats.shape[1])
        grid = grid.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), input.feats).permute(0, 4, 1, 2, 3)
        if kernel_size == 3:
            out, out_s, out_c = F.conv3d(grid, dense_weight_3(weight), padding=1), s, c
        elif not transposed:
            out, out_s = F.conv3d(grid, dense_weight_2(weight).transpose(0, 1), stride=2), 2 * s
            out_c = torch.unique(decode(encode(torch.cat([c[:, :1], c[:, 1:] // 2], 1), out_s), out_s), dim=0)
        else:
            out, out_s = F.conv_transpose3d(grid, dense_weight_2(weight), stride=2), s // 2
            key = (out_s,) * 3 if major_minor >= (2, 0) else out_s
            fine = cmaps(input)[key]
            out_c = decode(fine[0] if batch_first else fine, out_s)
        feats = read_at(out, out_c) + (0 if bias is None else bias)
        output = FakeSparseTensor(feats, encode(out_c, out_s), out_s)
        if batch_first:
            output._caches = input._caches
        elif major_minor >= (2, 0):
            output.cmaps, output.kmaps = input.cmaps, input.kmaps
        else:
            output.coord_maps, output.kernel_maps = input.coord_maps, input.kernel_maps
        key = output.stride
        cmaps(output).setdefault(key, (output.coords, None) if batch_first else output.coords)
        return output

    if batch_first:

        def conv3d_api(
            input,
            weight,
            kernel_size,
            bias=None,
            stride=1,
            padding=0,
            dilation=1,
            config=None,
            transposed=False,
            generative=False,
            training=False,
        ):
            return conv3d(input, weight, kernel_size, bias, stride, transposed=transposed)
    elif major_minor >= (2, 0):

        def conv3d_api(
            input,
            weight,
            kernel_size,
            bias=None,
            stride=1,
            dilation=1,
            transposed=False,
            epsilon=0.0,
            mm_thresh=0,
            kmap_mode="hashmap",
        ):
            return conv3d(input, weight, kernel_size, bias, stride, transposed=transposed)
    else:

        def conv3d_api(inputs, kernel, kernel_size, bias=None, stride=1, dilation=1, transpose=False):
            return conv3d(inputs, kernel, kernel_size, bias, stride, transpose=transpose)

    root = types.ModuleType("torchsparse")
    root.__version__ = version
    root.SparseTensor = FakeSparseTensor
    nn_mod = types.ModuleType("torchsparse.nn")
    functional = types.ModuleType("torchsparse.nn.functional")
    functional.conv3d = conv3d_api
    root.nn, nn_mod.functional = nn_mod, functional
    return {"torchsparse": root, "torchsparse.nn": nn_mod, "torchsparse.nn.functional": functional}


@pytest.mark.parametrize("version", ["1.4.0", "2.0.0", "2.1.0+torch20cu118"])
def test_torchsparse_adapter_matches_the_torch_backend(version, monkeypatch):
    import sys

    for name, module in fake_torchsparse(version).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backends_mod, "_announced", set())
    backends_mod._load.cache_clear()
    try:
        info = backends_mod.torchsparse_info()
        assert info is not None and info.batch_first is version.startswith("2.1")
        if info.runs_on_cpu:
            assert available_backends("cpu") == ["torch", "torchsparse"]
        else:
            with pytest.raises(ValueError, match="convolves on CUDA devices only"):
                SubmanifoldConv3d(2, 2, backend="torchsparse")(
                    SparseTensor(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 2))
                )
            monkeypatch.setattr(backends_mod.TorchsparseInfo, "supports", lambda self, device: True)
        assert resolve_backend("auto", "cpu") == "torch"  # auto uses torchsparse on CUDA only

        dense, mask = random_dense(2, 8, 3, 0.3, torch.float64, "cpu", seed=15)
        torch.manual_seed(0)
        layers = {
            name: nn.ModuleDict(
                {
                    "enc": SubmanifoldConv3d(3, 4, backend=name),
                    "down": StridedConv3d(4, 6, backend=name),
                    "up": TransposedConv3d(6, 4, backend=name),
                }
            ).double()
            for name in ("torch", "torchsparse")
        }
        layers["torchsparse"].load_state_dict(layers["torch"].state_dict())
        outs, coarse, grads = {}, {}, {}
        for name, m in layers.items():
            x = shuffled(SparseTensor.from_dense(dense, mask), seed=2)
            x.feats.requires_grad_(True)
            skip = m["enc"](x)
            low = m["down"](skip)
            y = cat([skip, m["up"](low)])
            assert torch.equal(y.coords, x.coords) and y.stride == 1 and low.stride == 2
            y.feats.square().sum().backward()
            outs[name], coarse[name], grads[name] = y.feats.detach(), low, x.feats.grad
        assert coarse["torchsparse"].cache.backend_state["torchsparse_caches"]  # ran through the adapter
        assert not coarse["torch"].cache.backend_state
        assert sorted(map(tuple, coarse["torch"].coords.tolist())) == sorted(
            map(tuple, coarse["torchsparse"].coords.tolist())
        )
        torch.testing.assert_close(outs["torchsparse"], outs["torch"])
        torch.testing.assert_close(grads["torchsparse"], grads["torch"])
        for key, p in layers["torch"].named_parameters():
            torch.testing.assert_close(dict(layers["torchsparse"].named_parameters())[key].grad, p.grad)
    finally:
        backends_mod._load.cache_clear()


def test_chunked_loops_on_worker_threads_match_the_serial_loops(monkeypatch):
    """Many chunks on worker threads (the CPU path at full size) give the serial results and the dense reference."""
    from one2345pp.sparse import layers, workers

    dense, mask = random_dense(2, 9, 5, 0.35, torch.float64, "cpu", seed=16)
    conv = SubmanifoldConv3d(5, 6, backend="torch").double()
    threads = torch.get_num_threads()
    monkeypatch.setitem(layers.CHUNK_ELEMENTS, "cpu", 5 * 27 * 64)  # 64 rows per chunk: about 8 chunks
    calls = []
    real_map = workers.WORKERS.map
    monkeypatch.setattr(workers.WORKERS, "map", lambda fn, items: calls.append(len(items)) or real_map(fn, items))
    results = {}
    try:
        torch.set_num_threads(2)
        for on_workers in (True, False):
            monkeypatch.setattr(workers, "CPU_WORKERS", on_workers)
            x = shuffled(SparseTensor.from_dense(dense, mask))
            x.feats.requires_grad_(True)
            conv.zero_grad()
            y = conv(x)
            (y.feats * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum().backward()
            results[on_workers] = (y.feats.detach(), x.feats.grad, conv.weight.grad.clone())
            assert torch.get_num_threads() == 2  # the workers leave the caller's thread count alone
    finally:
        torch.set_num_threads(threads)
    # with workers: the kernel map on one worker, then forward, input and weight gradients in several pieces each
    assert len(calls) == 4 and calls[0] == 1 and min(calls[1:]) > 1
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    torch.testing.assert_close(results[True][2], results[False][2], atol=1e-12, rtol=1e-12)
    ref = F.conv3d(dense, dense_weight_3(conv.weight.detach()), conv.bias.detach(), padding=1)
    torch.testing.assert_close(results[True][0], read_at(ref, x.coords), atol=1e-10, rtol=1e-10)
