"""Triangle rasterisation behind one interface: per pixel the triangle id, barycentrics and depth, plus a
differentiable attribute interpolation in torch.

Two backends give the same visibility for the same input (both sample the pixel centres ``(i + 0.5, j + 0.5)`` of
:mod:`one2345pp.cameras` and keep the nearest surface, seen from either side):

* ``cpu``: one ray per pixel centre through open3d's ``RaycastingScene``
  (:func:`one2345pp.geometry.raycasting.build_scene`);
* ``nvdiffrast``: NVIDIA's CUDA rasteriser (``RasterizeCudaContext``), imported only when chosen (version 0.3.2 or
  later for resolutions that are not multiples of 8).

The backend is picked by :func:`resolve_backend`: an explicit name (config ``rasterizer.backend``) wins; ``"auto"``
takes the environment variable ``ONE2345PP_RASTERIZER`` when set, else ``nvdiffrast`` on a CUDA device and ``cpu``
otherwise. ``"auto"`` on CUDA without nvdiffrast installed falls back to ``cpu`` with a warning; asking for
``nvdiffrast`` explicitly without it is an error that says how to install it.

Conventions of a :class:`Rasterization` (batched over ``N`` cameras of one resolution):

* ``face_ids`` int64 [N, H, W]: index of the visible triangle, -1 where the pixel centre sees nothing;
* ``bary`` float32 [N, H, W, 2]: ``(b1, b2)`` with the surface point at ``(1 - b1 - b2) v0 + b1 v1 + b2 v2`` (the
  convention of :mod:`one2345pp.geometry.mesh` and open3d's ``primitive_uvs``), 0 where empty;
* ``depth`` float32 [N, H, W]: camera z-depth along the OpenCV forward axis, 0 where empty.

Geometry is fixed here: barycentrics carry no gradient, attributes do (:func:`interpolate`).

UV-space rasterisation (:meth:`Rasterizer.rasterize_uv`) treats per-corner texture coordinates as a flat mesh and
samples texel centres; row 0 of its output is the top of the texture image (``v`` near 1, OBJ convention), so the
result indexes a texture image directly.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cameras import Camera
from ..geometry.mesh import Mesh
from ..geometry.raycasting import build_scene
from ..utils.optional import require

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "CpuRasterizer",
    "NvdiffrastRasterizer",
    "RasterMesh",
    "Rasterization",
    "Rasterizer",
    "RasterizerConfig",
    "interpolate",
    "interpolate_corners",
    "make_rasterizer",
    "pixel_agreement",
    "resolve_backend",
]

log = logging.getLogger(__name__)

BACKENDS = ("cpu", "nvdiffrast")
ENV_VAR = "ONE2345PP_RASTERIZER"

NVDIFFRAST_HINT = (
    "nvdiffrast is NVIDIA's CUDA rasteriser and has no CPU path. Install it on a CUDA machine with "
    "`pip install diffrp-nvdiffrast` (its source on PyPI; compiled with nvcc on first use) or "
    "`pip install git+https://github.com/NVlabs/nvdiffrast`, or choose the CPU backend with "
    f"rasterizer.backend=cpu or {ENV_VAR}=cpu."
)


@dataclass
class RasterizerConfig:
    # "auto" ($ONE2345PP_RASTERIZER, else nvdiffrast on CUDA and cpu otherwise), "cpu" or "nvdiffrast"
    backend: str = "auto"
    threads: int = 0  # open3d ray-casting threads of the cpu backend, 0 = all


def resolve_backend(name: str = "auto", device: torch.device | str | None = None) -> str:
    """The backend to use: ``name`` unless it is ``"auto"``, then ``$ONE2345PP_RASTERIZER``, then the device."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS + ("auto",):
                raise ValueError(f"{ENV_VAR}={env!r} is not a rasteriser backend; use one of {', '.join(BACKENDS)}")
            name = env
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return "nvdiffrast" if dev.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown rasteriser backend {name!r}; expected auto or one of {', '.join(BACKENDS)}")
    return name


def make_rasterizer(backend: str = "auto", device: torch.device | str | None = None, threads: int = 0) -> Rasterizer:
    """A rasteriser for ``device`` (see :func:`resolve_backend`)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    explicit = (backend or "auto").strip().lower() != "auto" or bool(os.environ.get(ENV_VAR, "").strip())
    name = resolve_backend(backend, dev)
    if name == "nvdiffrast":
        try:
            return NvdiffrastRasterizer(dev)
        except ImportError:
            if explicit:
                raise
            log.warning("nvdiffrast is not available on %s; rasterising on the CPU instead. %s", dev, NVDIFFRAST_HINT)
            name = "cpu"
    return CpuRasterizer(dev, threads)


# --------------------------------------------------------------------------------------------------- data types
@dataclass
class RasterMesh:
    """Geometry prepared for one backend: float32 vertices [V, 3] and int64 faces [F, 3] on the device."""

    vertices: torch.Tensor
    faces: torch.Tensor
    state: object = field(default=None, repr=False)  # backend data (open3d scene, int32 faces on the GPU)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])


@dataclass
class Rasterization:
    """Per-pixel visibility of ``N`` views (see the module docstring)."""

    face_ids: torch.Tensor  # int64 [N, H, W], -1 = empty
    bary: torch.Tensor  # float32 [N, H, W, 2]
    depth: torch.Tensor  # float32 [N, H, W], 0 = empty

    @property
    def mask(self) -> torch.Tensor:
        return self.face_ids >= 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.face_ids.shape)  # type: ignore[return-value]

    def __getitem__(self, i: int) -> Rasterization:
        """View ``i`` as a batch of one."""
        return Rasterization(self.face_ids[i : i + 1], self.bary[i : i + 1], self.depth[i : i + 1])


def _weights(bary: torch.Tensor) -> torch.Tensor:
    """(b1, b2) [..., 2] -> corner weights (1 - b1 - b2, b1, b2) [..., 3]."""
    return torch.cat([1.0 - bary.sum(-1, keepdim=True), bary], dim=-1)


def interpolate(attr: torch.Tensor, faces: torch.Tensor, rast: Rasterization) -> torch.Tensor:
    """Vertex attributes ``attr`` [V, C] at every pixel -> [N, H, W, C] (0 where empty); differentiable in ``attr``."""
    if attr.ndim != 2:
        raise ValueError(f"vertex attributes must have shape [V, C], got {tuple(attr.shape)}")
    corner = attr[faces.to(attr.device)]  # [F, 3, C]
    return interpolate_corners(corner, rast)


def interpolate_corners(corner_attr: torch.Tensor, rast: Rasterization) -> torch.Tensor:
    """Per-face-corner attributes [F, 3, C] at every pixel -> [N, H, W, C] (0 where empty); differentiable."""
    if corner_attr.ndim != 3 or corner_attr.shape[1] != 3:
        raise ValueError(f"corner attributes must have shape [F, 3, C], got {tuple(corner_attr.shape)}")
    n, h, w = rast.shape
    mask = rast.mask.to(corner_attr.device)
    fid = rast.face_ids.to(corner_attr.device)[mask]
    wts = _weights(rast.bary.to(corner_attr.device)[mask]).to(corner_attr.dtype)  # [P, 3]
    vals = (corner_attr[fid] * wts[..., None]).sum(1)  # [P, C]
    out = corner_attr.new_zeros((n, h, w, corner_attr.shape[-1]))
    return out.masked_scatter(mask[..., None], vals)


# ----------------------------------------------------------------------------------------------------- backends
def _check_cameras(cameras: Sequence[Camera]) -> tuple[int, int]:
    if len(cameras) == 0:
        raise ValueError("rasterize needs at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"cameras of one rasterize call must share a resolution, got {sorted(sizes)}")
    w, h = sizes.pop()
    if w < 1 or h < 1:
        raise ValueError(f"camera resolution must be positive, got {w}x{h}")
    return w, h


def _mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mesh, Mesh):
        v, f = mesh.vertices, mesh.faces
    else:
        v, f = mesh
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(f, dtype=np.int64).reshape(-1, 3)
    if len(f) == 0:
        raise ValueError("cannot rasterise a mesh without faces")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"face indices outside [0, {len(v)})")
    if not np.isfinite(v).all():
        raise ValueError("mesh vertices contain NaN or infinite values")
    return v, f


class Rasterizer(abc.ABC):
    """Rasterise meshes in cameras of :mod:`one2345pp.cameras` or in UV space; results live on ``device``."""

    name: str

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def prepare(self, mesh: Mesh | tuple) -> RasterMesh:
        """Geometry of a :class:`Mesh` (or a ``(vertices, faces)`` pair) in the backend's form, for reuse."""
        v, f = _mesh_arrays(mesh)
        rm = RasterMesh(
            torch.as_tensor(v, dtype=torch.float32, device=self.device),
            torch.as_tensor(f, dtype=torch.int64, device=self.device),
        )
        rm.state = self._backend_state(v, f)
        return rm

    @abc.abstractmethod
    def _backend_state(self, vertices: np.ndarray, faces: np.ndarray) -> object: ...

    @abc.abstractmethod
    def rasterize(self, mesh: RasterMesh, cameras: Sequence[Camera]) -> Rasterization:
        """Visibility of ``mesh`` in each camera (all of one resolution) -> batch of ``len(cameras)``."""

    @abc.abstractmethod
    def rasterize_uv(self, face_uvs: torch.Tensor | np.ndarray, width: int, height: int) -> Rasterization:
        """Which face covers each texel centre of a ``width`` x ``height`` texture, from UVs [F, 3, 2] (OBJ
        convention); batch of one, row 0 = top of the image."""


class CpuRasterizer(Rasterizer):
    """Ray casting through open3d's RaycastingScene: one ray per pixel centre, nearest hit."""

    name = "cpu"

    def __init__(self, device: torch.device | str = "cpu", threads: int = 0):
        super().__init__(device)
        self._o3d = require("open3d")
        self.threads = int(threads)

    def _backend_state(self, vertices: np.ndarray, faces: np.ndarray):
        return build_scene(Mesh(vertices, faces))

    def _cast(self, scene, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        res = scene.cast_rays(self._o3d.core.Tensor(np.ascontiguousarray(rays, np.float32)), nthreads=self.threads)
        t = res["t_hit"].numpy()
        hit = np.isfinite(t)
        face = res["primitive_ids"].numpy().astype(np.int64)
        face[~hit] = -1
        bary = res["primitive_uvs"].numpy().astype(np.float32)
        bary[~hit] = 0.0
        depth = np.where(hit, t, 0.0).astype(np.float32)
        return face, bary, depth

    def _result(self, face: np.ndarray, bary: np.ndarray, depth: np.ndarray, shape: tuple[int, ...]) -> Rasterization:
        dev = self.device
        return Rasterization(
            torch.from_numpy(face.reshape(shape)).to(dev),
            torch.from_numpy(bary.reshape(*shape, 2)).to(dev),
            torch.from_numpy(depth.reshape(shape)).to(dev),
        )

    def rasterize(self, mesh: RasterMesh, cameras: Sequence[Camera]) -> Rasterization:
        w, h = _check_cameras(cameras)
        rays = np.empty((len(cameras), h, w, 6), dtype=np.float32)
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
        for i, cam in enumerate(cameras):
            K, c2w = cam.K, cam.c2w
            # camera-space direction with z = 1, so the ray parameter of a hit is its camera z-depth
            d_cam = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], axis=-1)
            rays[i, ..., :3] = c2w[:3, 3]
            rays[i, ..., 3:] = d_cam @ c2w[:3, :3].T
        face, bary, depth = self._cast(mesh.state, rays.reshape(-1, 6))
        return self._result(face, bary, depth, (len(cameras), h, w))

    def rasterize_uv(self, face_uvs, width: int, height: int) -> Rasterization:
        uv = _face_uv_array(face_uvs)
        corners = np.concatenate([uv.reshape(-1, 2), np.zeros((len(uv) * 3, 1))], axis=1)
        faces = np.arange(len(corners), dtype=np.int64).reshape(-1, 3)
        scene = build_scene(Mesh(corners, faces))
        jj, ii = np.mgrid[0:height, 0:width].astype(np.float64)
        rays = np.zeros((height, width, 6), dtype=np.float32)
        rays[..., 0] = (ii + 0.5) / width
        rays[..., 1] = 1.0 - (jj + 0.5) / height
        rays[..., 2] = 1.0
        rays[..., 5] = -1.0
        face, bary, depth = self._cast(scene, rays.reshape(-1, 6))
        return self._result(face, bary, depth, (1, height, width))


def _face_uv_array(face_uvs) -> np.ndarray:
    uv = face_uvs.detach().cpu().numpy() if isinstance(face_uvs, torch.Tensor) else np.asarray(face_uvs)
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 3 or uv.shape[1:] != (3, 2) or len(uv) == 0:
        raise ValueError(f"face uvs must have shape [F, 3, 2] with F > 0, got {uv.shape}")
    if not np.isfinite(uv).all():
        raise ValueError("face uvs contain NaN or infinite values")
    return uv


class NvdiffrastRasterizer(Rasterizer):
    """NVIDIA nvdiffrast's CUDA rasteriser (perspective-correct barycentrics at pixel centres)."""

    name = "nvdiffrast"

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the nvdiffrast backend needs a CUDA device, got {device}; use the cpu backend")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device)
        try:
            import nvdiffrast.torch as dr
        except ImportError as exc:
            raise ImportError(f"nvdiffrast could not be imported ({exc}). {NVDIFFRAST_HINT}") from exc
        self._dr = dr
        try:
            self._ctx = dr.RasterizeCudaContext(device=device)
        except Exception as exc:  # the plugin is compiled on first use; a missing nvcc fails here
            msg = f"nvdiffrast is installed but its CUDA context failed ({exc}). {NVDIFFRAST_HINT}"
            raise ImportError(msg) from exc

    def _backend_state(self, vertices: np.ndarray, faces: np.ndarray):
        if len(faces) >= 2**31:
            raise ValueError(f"nvdiffrast indexes faces with int32; {len(faces)} faces are too many")
        return torch.as_tensor(faces, dtype=torch.int32, device=self.device).contiguous()

    @staticmethod
    def clip_matrix(camera: Camera, vertices: np.ndarray) -> np.ndarray:
        """World -> clip space [4, 4] of an OpenCV camera for nvdiffrast (row 0 of its output = image row 0).

        ``x_ndc = 2 u / W - 1`` and ``y_ndc = 2 v / H - 1`` for pixel coordinates (u, v), so nvdiffrast's pixel
        centres are those of :mod:`one2345pp.cameras`; near/far planes bracket the mesh's depth range."""
        K, w2c = camera.K, camera.w2c
        w, h = camera.width, camera.height
        z = vertices @ w2c[2, :3] + w2c[2, 3]
        far = max(float(z.max()) * 1.01, 1e-3)
        near = max(float(z.min()) * 0.99, far * 1e-4)
        proj = np.array(
            [
                [2 * K[0, 0] / w, 0.0, 2 * K[0, 2] / w - 1.0, 0.0],
                [0.0, 2 * K[1, 1] / h, 2 * K[1, 2] / h - 1.0, 0.0],
                [0.0, 0.0, (far + near) / (far - near), -2 * far * near / (far - near)],
                [0.0, 0.0, 1.0, 0.0],
            ]
        )
        return proj @ w2c

    def _run(self, clip: torch.Tensor, tri: torch.Tensor, h: int, w: int) -> torch.Tensor:
        rast, _ = self._dr.rasterize(self._ctx, clip.contiguous(), tri, resolution=[h, w], grad_db=False)
        return rast

    @staticmethod
    def _unpack(rast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """nvdiffrast's (w0, w1, z/w, id + 1) -> face ids, our (b1, b2) and the hit mask."""
        fid = rast[..., 3].round().to(torch.int64) - 1
        hit = fid >= 0
        b1 = rast[..., 1]
        b2 = 1.0 - rast[..., 0] - rast[..., 1]
        bary = torch.stack([b1, b2], dim=-1) * hit[..., None]
        return fid, bary, hit

    def rasterize(self, mesh: RasterMesh, cameras: Sequence[Camera]) -> Rasterization:
        w, h = _check_cameras(cameras)
        verts = mesh.vertices.detach().to(self.device, torch.float32)
        v_np = verts.cpu().numpy().astype(np.float64)
        mats = torch.as_tensor(
            np.stack([self.clip_matrix(c, v_np) for c in cameras]), dtype=torch.float32, device=self.device
        )
        homo = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)  # [V, 4]
        clip = torch.einsum("nij,vj->nvi", mats, homo)
        with torch.no_grad():
            rast = self._run(clip, mesh.state, h, w)
        fid, bary, hit = self._unpack(rast)
        # camera z-depth from the perspective-correct barycentrics (exact, unlike z/w)
        w2c_z = torch.as_tensor(np.stack([c.w2c[2] for c in cameras]), dtype=torch.float32, device=self.device)
        zv = torch.einsum("nj,vj->nv", w2c_z, homo)  # [N, V]
        corner = mesh.faces.to(self.device)[fid.clamp(min=0)]  # [N, H, W, 3]
        zc = torch.gather(zv[:, None, None, :].expand(-1, h, w, -1), 3, corner)
        depth = (_weights(bary) * zc).sum(-1) * hit
        return Rasterization(fid, bary.float(), depth.float())

    def rasterize_uv(self, face_uvs, width: int, height: int) -> Rasterization:
        uv = torch.as_tensor(_face_uv_array(face_uvs), dtype=torch.float32, device=self.device).reshape(-1, 2)
        clip = torch.cat([uv * 2.0 - 1.0, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=1)[None]
        tri = torch.arange(uv.shape[0], dtype=torch.int32, device=self.device).reshape(-1, 3)
        with torch.no_grad():
            rast = self._run(clip, tri, height, width)
        rast = torch.flip(rast, dims=[1])  # nvdiffrast's row 0 is v = 0 (bottom); ours is the top of the image
        fid, bary, hit = self._unpack(rast)
        return Rasterization(fid, bary.float(), hit.float())


def pixel_agreement(a: Rasterization, b: Rasterization) -> float:
    """Share of pixels where two rasterisations see the same triangle (or both see nothing)."""
    fa, fb = a.face_ids.cpu(), b.face_ids.cpu()
    if fa.shape != fb.shape:
        raise ValueError(f"rasterisations differ in shape: {tuple(fa.shape)} vs {tuple(fb.shape)}")
    return float((fa == fb).float().mean())
