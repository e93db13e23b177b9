"""GPU rows in one prepared call (issue 16): every full-size figure of the project on one CUDA GPU, in one process
tree, in under 8 minutes; one JSON file and one Markdown table.

    python benchmarks/bench_gpu.py [--out outputs/bench-gpu] [--budget-s 450] [--rows NAME,...] [--dry-run]
    python benchmarks/bench_gpu.py --write-scene .whl/bench_gpu_scene.npz      # here, once: `make gpu-wheels`

On the GPU machine (no package registry there) ``benchmarks/gpu_run.sh`` installs the wheels that ``make gpu-wheels``
put in ``.whl/`` and runs this script; see the README, "GPU figures (make bench-gpu)".

Rows (the figures the project promises; random weights of the full presets, whose speed does not depend on them):

========================== ================================================================ ======================
row                        what                                                             target
========================== ================================================================ ======================
multiview_train_step       stage 1: one bf16 training step (loss, backward, AdamW, EMA),    fits one H100
                           batch 6 grids of 640x960, peak memory                            (peak < 78 GiB)
multiview_sample           stage 1: one 28-step Euler-ancestral sample, guidance 4, bf16    <= 4 s
recon_sample               coarse 50 steps (64^3) + fine 20 steps (128^3, a sphere shell's  <= 8 s
                           support), DINOv2 + CLIP encoders, bf16 autocast
coarse_train_step          coarse stage: one bf16 training step, batch 8, peak memory       peak < 78 GiB
fine_train_step            fine stage: one bf16 training step, batch 8, peak memory         peak < 78 GiB
sparse_conv                torch sparse backend vs dense conv3d at 128^3 on CUDA (3x3x3     >= 1x (our choice;
                           forward + backward), torchsparse when it imports                 the CPU's is 5x)
texture_refine             stage 4: nvdiffrast refinement, 300 iterations, six 320 px views <= 5 s
raster_agreement           triangle ids of nvdiffrast vs the CPU rasteriser (open3d, stored >= 99%
                           by --write-scene), same meshes and cameras
pipeline_glb               image -> textured GLB through One2345PPPipeline                  <= 20 s (paper: 20 s
                                                                                            w/o, 60 s with
                                                                                            refinement, A100)
multiview_sample_compiled  the multiview_sample row with ``torch.compile`` on the UNet      <= 4 s, and faster
                           (compile time apart; the eager time of the same process beside)  than eager
========================== ================================================================ ======================

The texture stage trains no network (it fits a colour field per object): its "training step" is ``texture_refine``.

How it runs. The parent process runs the rows in groups (multiview, recon, sparse, texture, pipeline, compile), each
in a child process of its own with a time limit (``GROUPS``: a cap per group, and never past ``--budget-s`` from the
start): a row that fails records its error and the others go on, a group that hangs is killed with its process
group and its missing rows are recorded as timed out, and a CUDA error cannot poison later groups. nvdiffrast's CUDA
plugin is compiled by a background child (nvcc, ``MAX_JOBS=8``) from the start, while the first groups run; the
texture group waits for it. Progress lines carry the seconds since the start.

The GPU machine has no open3d, pymeshlab or network: the texture rows read their meshes, views and the CPU
rasteriser's triangle ids from the scene file (``--scene``) that ``--write-scene`` renders here; the encoders of the
3D stages (DINOv2-base, CLIP ViT-H/14) are written at random into a work folder and loaded from there
(``HF_HUB_OFFLINE=1``); mesh cleanup falls back to numpy. Untrained 3D stages give no usable surface, so the fine
stage works on a sphere shell's support (``bench_recon.sphere_shell``) and, in ``pipeline_glb``, the mesh is that
sphere's (the samplers still run in full).

``--dry-run`` runs the same code on the CPU at the tiny presets (few steps; its numbers say nothing about a GPU),
with the packages the GPU machine lacks made unimportable (``--absent``), and writes the same JSON and table; the
rows that need CUDA (nvdiffrast, torch.compile timings) are marked as not run with the reason. Without CUDA and
without ``--dry-run`` the script stops. Targets are compared only on CUDA and only here (no timed tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCHEMA = 1
DEFAULT_SCENE = ROOT / ".whl" / "bench_gpu_scene.npz"
# what the GPU machine lacks and the wheels do not bring (its package list: /work/.library/device/KINDS.md); the dry
# run makes them unimportable so that the GPU call can fail only for GPU reasons
DEVICE_ABSENT = ("open3d", "pymeshlab", "wandb", "torchsparse", "nvdiffrast", "rembg", "objaverse")
# peak-memory target of the training steps: an "80GB" H100 has 81,559 MiB = 79.6 GiB, less the CUDA context
PEAK_LIMIT_GIB = 78.0
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "lightning",
    "omegaconf",
    "webdataset",
    "trimesh",
    "xatlas",
    "diffrp-nvdiffrast",
    "numpy",
    "scipy",
    "scikit-image",
    "safetensors",
    "huggingface-hub",
)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    group: str
    figure: str
    target: str
    target_value: float | None = None
    op: str = "<="  # how measured (or details[target_key]) compares to target_value
    units: str = "s"
    target_key: str | None = None  # a details key compared instead of ``measured`` (peak memory)
    cuda_only: str = ""  # why the row cannot run without CUDA ("" = it runs on the CPU in the dry run)


def train_step_row(name: str, group: str, figure: str) -> Row:
    """A training-step row: seconds per step, judged by its peak GPU memory against one H100."""
    target = f"peak < {PEAK_LIMIT_GIB:.0f} GiB (one H100)"
    return Row(name, group, figure, target, PEAK_LIMIT_GIB, "<", "s/step", "peak_gib")


ROWS = (
    train_step_row(
        "multiview_train_step",
        "multiview",
        "stage 1: one bf16 training step (loss, backward, AdamW, EMA), batch 6 grids of 640x960, full UNet size",
    ),
    Row(
        "multiview_sample",
        "multiview",
        "stage 1: one sample, 28 Euler-ancestral steps, guidance 4, 640x960 grid, bf16",
        "<= 4 s on one H100",
        4.0,
    ),
    Row(
        "recon_sample",
        "recon",
        "stages 2 + 3: coarse 50 steps (64^3) + fine 20 steps (128^3), DINOv2 + CLIP, bf16 autocast",
        "<= 8 s on one H100",
        8.0,
    ),
    train_step_row(
        "coarse_train_step",
        "recon",
        "coarse stage: one bf16 training step (loss, backward, AdamW, EMA), batch 8",
    ),
    train_step_row(
        "fine_train_step",
        "recon",
        "fine stage: one bf16 training step (loss, backward, AdamW, EMA), batch 8, sphere-shell supports",
    ),
    Row(
        "sparse_conv",
        "sparse",
        "sparse 3x3x3 conv forward + backward at 128^3 (shell, ~4%), 32 channels: dense conv3d / torch backend",
        ">= 1x: not slower than dense (our choice; CPU target 5x); <= 2x torchsparse where it imports",
        1.0,
        ">=",
        "x",
    ),
    Row(
        "texture_refine",
        "texture",
        "stage 4: texture refinement with nvdiffrast, 300 iterations, six 320 px views (+ bake to 1024^2 apart)",
        "<= 5 s on one H100",
        5.0,
        cuda_only="nvdiffrast has no CPU path",
    ),
    Row(
        "raster_agreement",
        "texture",
        "triangle ids: nvdiffrast vs the CPU rasteriser (stored), same meshes and cameras, 7 views of 320 px",
        ">= 99% of pixels",
        99.0,
        ">=",
        "%",
        cuda_only="nvdiffrast has no CPU path",
    ),
    Row(
        "pipeline_glb",
        "pipeline",
        "image -> textured GLB: One2345PPPipeline (28 + 50 + 20 steps, refinement 300 iterations, bake) + GLB",
        "<= 20 s on one H100 (paper: 20 s without, 60 s with refinement, A100)",
        20.0,
    ),
    Row(
        "multiview_sample_compiled",
        "compile",
        "stage 1 sample as multiview_sample with torch.compile on the UNet (compile time apart)",
        "<= 4 s on one H100, faster than eager",
        4.0,
        cuda_only="torch.compile timings of the full UNet are only meaningful on the GPU",
    ),
)
ROW_BY_NAME = {r.name: r for r in ROWS}


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    cap_s: float  # most seconds the group may take on the GPU
    min_s: float  # not started with less left
    dry_cap_s: float = 300.0


GROUPS = (
    Group("multiview", 120, 40),
    Group("recon", 120, 40),
    Group("sparse", 60, 20),
    Group("texture", 150, 30),  # includes waiting for the nvdiffrast build
    Group("pipeline", 150, 40),
    Group("compile", 180, 90),
)


class NotRun(Exception):
    """A row that is not run here, with the reason."""


# ----------------------------------------------------------------------------------------------------- environment
def block_modules(names) -> None:
    """Make ``names`` unimportable in this process (``import`` raises ImportError, ``find_spec`` returns None), as
    on a machine without them."""
    for n in names:
        if n and n not in sys.modules:
            sys.modules[n] = None  # type: ignore[assignment]


def quiet_environment() -> None:
    """No network, no progress bars, unbuffered output (children inherit it)."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(dry_run: bool) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": package_versions(),
    }
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


class Clock:
    def __init__(self, t0: float):
        self.t0 = t0

    def say(self, msg: str) -> None:
        print(f"[bench-gpu {time.time() - self.t0:6.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------ the scene
def write_scene(path: Path, objects: int, resolution: int) -> Path:
    """Render ``objects`` procedural objects like ``bench_texture`` (input view + six views + a held-out view, CPU
    ray caster) and store meshes, views, cameras and the CPU rasteriser's triangle ids in one compressed npz."""
    import numpy as np
    from bench_texture import scene

    from one2345pp.rendering.rasterizer import make_rasterizer
    from one2345pp.utils.atomic import atomic_file

    cpu = make_rasterizer("cpu")
    arrays: dict = {}
    uids = []
    for i in range(objects):
        obj, mesh, views, held = scene(i, resolution)
        cams = [v.camera for v in views]
        ids = cpu.rasterize(cpu.prepare(mesh), cams).face_ids.numpy().astype(np.int32)
        p = f"o{i}_"
        arrays[p + "vertices"] = mesh.vertices
        arrays[p + "faces"] = mesh.faces.astype(np.int32)
        arrays[p + "images"] = _to_u8(np.stack([v.image.numpy() for v in views + [held]]))
        arrays[p + "alpha"] = _to_u8(np.stack([v.alpha.numpy() for v in views + [held]]))
        arrays[p + "cameras"] = np.array(
            [[c.azimuth_deg, c.elevation_deg, c.distance, c.fov_deg, c.width, c.height] for c in cams + [held.camera]]
        )
        arrays[p + "face_ids"] = ids
        uids.append(obj.uid)
    meta = {"objects": objects, "resolution": resolution, "uids": uids, "views": "input + six + held-out"}
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez_compressed(f, **arrays)
    return path


def _to_u8(x):
    import numpy as np

    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_scene(path: Path) -> list[dict]:
    """The objects of a scene file: ``mesh``, ``views`` (input + six), ``held``, ``face_ids`` [7, H, W], ``uid``."""
    import numpy as np
    import torch

    from one2345pp.cameras import Camera
    from one2345pp.geometry.mesh import Mesh
    from one2345pp.texture.refine import View

    if not path.is_file():
        raise FileNotFoundError(f"no scene file at {path}: `make gpu-wheels` (or --write-scene PATH) writes it")
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    out = []
    for i in range(meta["objects"]):
        p = f"o{i}_"
        cams = [Camera(a, e, d, f, int(w), int(h)) for a, e, d, f, w, h in data[p + "cameras"]]
        img = torch.from_numpy(data[p + "images"].astype(np.float32) / 255.0)
        alpha = torch.from_numpy(data[p + "alpha"].astype(np.float32) / 255.0)
        views = [View(c, img[k], alpha[k]) for k, c in enumerate(cams)]
        out.append(
            {
                "uid": meta["uids"][i],
                "mesh": Mesh(data[p + "vertices"], data[p + "faces"]),
                "views": views[:-1],
                "held": views[-1],
                "face_ids": data[p + "face_ids"],
            }
        )
    return out


# ------------------------------------------------------------------------------------------------- child helpers
class Ctx:
    """What a group's child process knows: device, sizes, folders, and where its rows go."""

    def __init__(self, args, group: str):
        import torch

        self.args, self.group = args, group
        self.dry = bool(args.dry_run)
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.bf16 = self.cuda or bool(args.bf16)  # --bf16: the GPU's dtypes in the dry run (checks their paths)
        self.work, self.out = Path(args.work), Path(args.out)
        self.clock = Clock(args.t0)
        self.rows_file = self.work / f"rows-{group}.jsonl"
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def emit(self, name: str, status: str, measured=None, details=None, reason=None, seconds=None) -> None:
        rec = {
            "name": name,
            "status": status,
            "measured": measured,
            "reason": reason,
            "device": self.device_name,
            "seconds": seconds,
            "details": details or {},
        }
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(rec, default=_jsonable) + "\n")
        shown = f"{measured:.4g} {ROW_BY_NAME[name].units}" if isinstance(measured, (int, float)) else status
        self.clock.say(f"{name}: {shown}" + (f" ({reason})" if reason else ""))

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def run_row(ctx: Ctx, name: str, fn) -> None:
    """Run one row: ``fn()`` returns ``(measured, details)`` or raises NotRun; any other error is recorded."""
    row = ROW_BY_NAME[name]
    if ctx.args.rows and name not in ctx.args.rows:
        return
    t0 = time.perf_counter()
    ctx.clock.say(f"{name}: start")
    try:
        if row.cuda_only and not ctx.cuda:
            raise NotRun(f"needs CUDA: {row.cuda_only}")
        measured, details = fn()
        ctx.emit(name, "ok", measured, details, seconds=time.perf_counter() - t0)
    except NotRun as exc:
        ctx.emit(name, "not_run", reason=str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
        traceback.print_exc()  # the whole story in the log; the record keeps its end
        tb = traceback.format_exc().strip().splitlines()
        ctx.emit(
            name,
            "error",
            reason=f"{type(exc).__name__}: {str(exc)[:500]}",
            details={"traceback": tb[-12:]},
            seconds=time.perf_counter() - t0,
        )
    finally:
        ctx.free()


class Lazy:
    """A value built on first use and shared by the rows of a group; a failed build fails each row that asks."""

    def __init__(self, fn):
        self.fn, self.done, self.value, self.error = fn, False, None, None

    def __call__(self):
        if not self.done:
            self.done = True
            try:
                self.value = self.fn()
            except Exception as exc:  # noqa: BLE001
                self.error = exc
        if self.error is not None:
            raise self.error
        return self.value


# ------------------------------------------------------------------------------------------------ group: multiview
def group_multiview(ctx: Ctx) -> None:
    import torch
    from bench_multiview import build_module, time_sampling, time_training

    from one2345pp.config import load_config, to_object
    from one2345pp.stages.multiview import MultiViewConfig

    if ctx.dry:
        cfg_path, overrides, batch_size, steps, samples = ROOT / "experiments/tiny/multiview.yaml", [], 2, 1, 1
    else:  # random weights in the SD2 / ViT-H shapes of the full preset, its batch per GPU
        cfg_path, overrides, batch_size, steps, samples = ROOT / "experiments/multiview.yaml", [], 6, 2, 2
        overrides.append("model.pretrained=null")
    cfg = to_object(load_config(MultiViewConfig, cfg_path, overrides))
    built = Lazy(lambda: build_module(cfg, ctx.device, batch_size))
    bf16 = ctx.bf16

    def train():
        m, batch = built()
        ctx.reset_peak()
        t = time_training(m, batch, steps, ctx.device, bf16)
        details = {
            "batch": batch_size,
            "grid": f"{2 * cfg.model.view_size}x{3 * cfg.model.view_size}",
            "trainable": cfg.train.trainable,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "unet_params_m": sum(p.numel() for p in m.unet.parameters()) / 1e6,
            "trainable_params_m": sum(p.numel() for p in m.trainable_parameters()) / 1e6,
            "timed_steps": steps,
            "peak_gib": ctx.peak_gib(),
            "dtype": "bf16 autocast" if bf16 else "fp32",
        }
        return t, details

    def sample():
        m, batch = built()
        m.eval()
        pipe = m.pipeline()
        if bf16:
            pipe.to(torch.bfloat16)
        ctx.reset_peak()
        with torch.no_grad():
            t = time_sampling(pipe, batch["cond"][:1].float(), samples, ctx.device)
        return t, {
            "steps": 28,
            "guidance": 4.0,
            "sampler": "euler_a (trailing)",
            "grid": f"{2 * cfg.model.view_size}x{3 * cfg.model.view_size}",
            "dtype": "bf16" if bf16 else "fp32",
            "timed_samples": samples,
            "peak_gib": ctx.peak_gib(),
        }

    run_row(ctx, "multiview_train_step", train)  # training first: the sampling pipeline turns the weights to bf16
    run_row(ctx, "multiview_sample", sample)


# ---------------------------------------------------------------------------------------------------- group: recon
def encoder_overrides(ctx: Ctx) -> list[str]:
    """Random DINOv2 / CLIP vision encoders in the full presets' shapes (dry run: tiny ones) written once into the
    work folder; overrides that make the 3D stages load them (no hub access on the GPU machine)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from one2345pp.models.multiview_builders import PRESETS

    folder = ctx.work / "encoders"
    dino_dir, clip_dir = folder / "dinov2", folder / "clip"
    if ctx.dry:
        dino_cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56)
        clip_cfg = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
        sizes = ["model.condition.image_features.dinov2_image_size=56", "model.global_embedding.clip_image_size=56"]
    else:
        dino_cfg = Dinov2Config(image_size=518)  # the defaults are dinov2-base's (768 wide, 12 layers, patch 14)
        clip_cfg = CLIPVisionConfig(**PRESETS["full"]["image_encoder"])  # OpenCLIP ViT-H/14, 1024-d projection
        sizes = []
    t0 = time.perf_counter()
    for path, make in (
        (dino_dir, lambda: Dinov2Model(dino_cfg)),
        (clip_dir, lambda: CLIPVisionModelWithProjection(clip_cfg)),
    ):
        if not (path / "config.json").is_file():
            with torch.device(ctx.device):
                model = make()
            model.save_pretrained(path, safe_serialization=True)  # float32, as the published checkpoints
            del model
    ctx.clock.say(f"encoders in {folder} ({time.perf_counter() - t0:.1f} s)")
    return [
        "model.condition.image_features.kind=dinov2",
        f"model.condition.image_features.dinov2={dino_dir}",
        "model.global_embedding.kind=clip",
        f"model.global_embedding.clip={clip_dir}",
        *sizes,
    ]


def volume_batch(batch_size: int, view_size: int, coarse_res: int, device) -> dict:
    """A synthetic coarse / fine training batch in VolumeDataModule's format: the shell and the SDF of a sphere of
    radius 0.35 (as ``bench_recon.sphere_shell``), smooth random views with the layout's cameras."""
    import torch
    from bench_multiview import smooth_images
    from bench_recon import sphere_shell

    from one2345pp.cameras import framing_distance, get_layout, multiview_cameras
    from one2345pp.models.condition_volume import camera_tensors
    from one2345pp.models.fine import cell_centres, support_from_occupancy

    fine_res = 2 * coarse_res
    occ = sphere_shell(coarse_res, "cpu")
    kids = support_from_occupancy(occ, 2)  # [M, 4] int32, batch index 0
    centres = cell_centres(kids, fine_res)
    sdf = centres.norm(dim=1) - 0.35
    rgb = (centres * 2).clamp(-1, 1)
    layout = get_layout("zero123pp-v1.2")
    cams = multiview_cameras(0.0, layout, framing_distance(layout.fov_deg, 0.9), view_size)
    c2w, k = camera_tensors([cams] * batch_size)
    coords = torch.cat([torch.cat([torch.full_like(kids[:, :1], b), kids[:, 1:]], 1) for b in range(batch_size)])
    views = smooth_images(batch_size * 6, view_size, view_size, "cpu", seed=2).view(batch_size, 6, 3, view_size, -1)
    batch = {
        "occ": occ.expand(batch_size, -1, -1, -1, -1).contiguous(),
        "fine_coords": coords,
        "fine_sdf": sdf.repeat(batch_size),
        "fine_rgb": rgb.repeat(batch_size, 1),
        "views": views,
        "views_c2w": c2w,
        "views_K": k,
        "cond": smooth_images(batch_size, view_size, view_size, "cpu", seed=3),
    }
    batch = {key: v.to(device) for key, v in batch.items()}
    batch["meta"] = [{"fine_resolution": fine_res, "uid": f"sphere{b}"} for b in range(batch_size)]
    return batch


def time_stage_step(ctx: Ctx, stage, batch: dict, steps: int) -> tuple[float, dict]:
    """Seconds per training step of a coarse / fine LightningModule (its training_step, backward, AdamW, EMA) after
    one warm-up step, bf16 autocast on CUDA; peak memory over the steps (weights, optimizer state, activations)."""
    import torch

    opt = stage.configure_optimizers()["optimizer"]
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16)
    stage.train()

    def step():
        with autocast:
            loss = stage.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stage.ema.update(stage.model)
        return float(loss.detach())

    ctx.reset_peak()
    step()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    ctx.sync()
    seconds = (time.perf_counter() - t0) / steps
    trainable = sum(p.numel() for p in stage.model.parameters() if p.requires_grad)
    details = {
        "batch": batch["occ"].shape[0],
        "timed_steps": steps,
        "loss": loss,
        "trainable_params_m": trainable / 1e6,
        "peak_gib": ctx.peak_gib(),
        "dtype": "bf16 autocast" if ctx.bf16 else "fp32",
    }
    return seconds, details


def group_recon(ctx: Ctx) -> None:
    from bench_recon import gpu_timing

    from one2345pp.config import load_config, to_object
    from one2345pp.stages import coarse as coarse_stage
    from one2345pp.stages import fine as fine_stage

    overrides = Lazy(lambda: encoder_overrides(ctx))
    if ctx.dry:
        folder, view, coarse_res, batch_size, steps = ROOT / "experiments/tiny", 64, 32, 2, (3, 2)
    else:
        folder, view, coarse_res, batch_size, steps = ROOT / "experiments", 320, 64, 8, (50, 20)
    batch = Lazy(lambda: volume_batch(batch_size, view, coarse_res, ctx.device))

    def sample():
        out = gpu_timing(ctx.device, steps[0], steps[1], overrides(), tiny=ctx.dry, bf16=ctx.bf16)
        details = {k: out[k] for k in ("coarse_s", "fine_s", "steps", "support", "encoders")}
        return out["coarse_s"] + out["fine_s"], details

    def train(module, cfg_cls, name):
        def fn():
            cfg = to_object(load_config(cfg_cls, folder / f"{name}.yaml", overrides()))
            stage = module(cfg).to(ctx.device)
            b = batch()
            seconds, details = time_stage_step(ctx, stage, b, 1 if ctx.dry else 2)
            if name == "fine":
                details["support_cells"] = int(b["fine_coords"].shape[0])
            return seconds, details

        return fn

    run_row(ctx, "recon_sample", sample)
    run_row(ctx, "coarse_train_step", train(coarse_stage.CoarseStage, coarse_stage.CoarseConfig, "coarse"))
    run_row(ctx, "fine_train_step", train(fine_stage.FineStage, fine_stage.FineConfig, "fine"))


# --------------------------------------------------------------------------------------------------- group: sparse
def group_sparse(ctx: Ctx) -> None:
    import bench_sparse

    def fn():
        res, ch, repeats = (24, 8, 1) if ctx.dry else (128, 32, 3)
        if ctx.dry:
            bench_sparse.MIN_TOTAL_S = 0.05  # a check that it runs, not a timing
        os.environ.pop(bench_sparse.backends.ENV_VAR, None)
        coords = bench_sparse.shell_coords(res, ctx.device)
        results = {"dense": bench_sparse.bench_dense(res, ch, ctx.device, repeats)}
        for backend in bench_sparse.available_backends(ctx.device):
            results[backend] = bench_sparse.bench_backend(backend, coords, res, ch, ctx.device, repeats)
        ops = ("subm_fwd_s", "subm_fwdbwd_s", "down_fwdbwd_s", "up_fwdbwd_s")
        speedup = {k: results["dense"][k] / results["torch"][k] for k in ops}
        details = {
            "resolution": res,
            "channels": ch,
            "active": int(coords.shape[0]),
            "results": results,
            "dense_over_torch": speedup,
            "torchsparse": bench_sparse.torchsparse_status(ctx.device) or "measured",
        }
        if "torchsparse" in results:
            details["torch_over_torchsparse"] = {k: results["torch"][k] / results["torchsparse"][k] for k in ops}
        return speedup["subm_fwdbwd_s"], details

    run_row(ctx, "sparse_conv", fn)


# -------------------------------------------------------------------------------------------------- group: texture
def texture_settings(dry: bool):
    from one2345pp.config import load_config, to_object
    from one2345pp.stages.texture import TextureStageConfig
    from one2345pp.texture.settings import TextureSettings

    cfg = to_object(load_config(TextureStageConfig, ROOT / "experiments/texture.yaml", []))
    settings = TextureSettings.from_stage_config(cfg)
    if dry:
        settings.refine.iterations, settings.bake.texture_size = 10, 64
    return settings


def group_texture(ctx: Ctx) -> None:
    import torch

    from one2345pp.rendering import rasterizer as R

    objects = Lazy(lambda: load_scene(Path(ctx.args.scene)))
    os.environ[R.ENV_VAR] = "nvdiffrast"  # no silent fallback to the CPU backend (open3d is not there)

    def refine():
        from bench_texture import run_refinement

        settings = texture_settings(ctx.dry)
        scene = objects()
        first = scene[0]
        run_refinement(first["mesh"], first["views"][1:], first["held"], settings, "cuda")  # warm-up
        runs = []
        for obj in scene:
            r = run_refinement(obj["mesh"], obj["views"][1:], obj["held"], settings, "cuda")
            runs.append({"uid": obj["uid"], **r})
        mean = sum(r["refine_s"] for r in runs) / len(runs)
        return mean, {
            "backend": runs[0]["backend"],
            "iterations": settings.refine.iterations,
            "views": len(scene[0]["views"]) - 1,
            "resolution": scene[0]["views"][0].camera.width,
            "bake_s_mean": sum(r["bake_s"] for r in runs) / len(runs),
            "objects": runs,
        }

    def agreement():
        gpu = R.make_rasterizer("nvdiffrast", "cuda")
        per = []
        for obj in objects():
            cams = [v.camera for v in obj["views"]]
            ours = gpu.rasterize(gpu.prepare(obj["mesh"]), cams)
            ids = torch.from_numpy(obj["face_ids"].astype("int64"))
            stored = R.Rasterization(ids, torch.zeros(*ids.shape, 2), torch.zeros(ids.shape))
            per.append(
                {
                    "uid": obj["uid"],
                    "agreement": R.pixel_agreement(stored, ours),
                    "covered_cpu": float((ids >= 0).float().mean()),
                    "covered_gpu": float(ours.mask.float().mean().cpu()),
                }
            )
        return 100.0 * min(p["agreement"] for p in per), {"objects": per, "views": len(obj["views"])}

    run_row(ctx, "texture_refine", refine)
    run_row(ctx, "raster_agreement", agreement)


# ------------------------------------------------------------------------------------------------- group: pipeline
def input_image(size: int = 512):
    """An RGBA image of a two-coloured disc on a transparent background (the weights are random: any object does)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    disc = xx * xx + yy * yy < 0.3**2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0] = np.where(xx > 0, 200, 60)
    rgba[..., 1], rgba[..., 2] = 120, np.where(yy > 0, 40, 220)
    rgba[..., 3] = disc * 255
    return Image.fromarray(rgba, "RGBA")


def stand_in_samplers(pipe, radius: float = 0.35) -> None:
    """Untrained 3D stages: keep their sampling work but return a sphere (shell for the coarse stage, SDF for the
    fine stage), so that the mesh, the refinement and the bake have the size of a real object's."""
    import torch
    from bench_recon import sphere_shell

    from one2345pp.models.fine import cell_centres

    coarse, fine = pipe.coarse, pipe.fine
    coarse_sample, fine_sample = coarse.sample, fine.sample

    def coarse_stand_in(*a, **kw):
        occ = coarse_sample(*a, **kw)
        return sphere_shell(occ.shape[-1], occ.device, radius).expand_as(occ).contiguous()

    def fine_stand_in(*a, **kw):
        out = fine_sample(*a, **kw)
        d = cell_centres(out.coords, fine.resolution).norm(dim=1) - radius
        sdf = (d / fine.cfg.sdf_truncation).clamp(-1, 1).to(out.feats.dtype)
        return out.replace(torch.cat([sdf[:, None], out.feats[:, 1:]], dim=1))

    coarse.sample, fine.sample = coarse_stand_in, fine_stand_in  # instance attributes: the pipeline calls these


def group_pipeline(ctx: Ctx) -> None:
    import torch
    from bench_pipeline import multiview_pipeline

    from one2345pp.config import load_config, to_object
    from one2345pp.models.coarse import CoarseModel
    from one2345pp.models.fine import FineModel
    from one2345pp.pipeline.one2345 import One2345PPPipeline, PipelineSettings
    from one2345pp.stages import coarse as coarse_stage
    from one2345pp.stages import fine as fine_stage
    from one2345pp.texture import bake as bake_module
    from one2345pp.texture.export import save_glb

    def fn():
        folder = ROOT / ("experiments/tiny" if ctx.dry else "experiments")
        overrides = encoder_overrides(ctx)
        ccfg = to_object(load_config(coarse_stage.CoarseConfig, folder / "coarse.yaml", overrides))
        fcfg = to_object(load_config(fine_stage.FineConfig, folder / "fine.yaml", overrides))
        dtype = torch.bfloat16 if ctx.bf16 else torch.float32
        mv = multiview_pipeline("tiny" if ctx.dry else "full", ctx.device, dtype)
        coarse = CoarseModel(ccfg.model)
        fine = FineModel(fcfg.model)
        refine, why = (
            ctx.cuda,
            "" if ctx.cuda else "no CUDA: the CPU rasteriser needs open3d, absent on the GPU machine",
        )
        build = ctx.work / "nvdiffrast_build.json"
        if refine and build.is_file() and json.loads(build.read_text()).get("status") != "ok":
            refine, why = False, "nvdiffrast did not build (nvdiffrast_build.log): no refinement"
        settings = PipelineSettings(refine=refine)
        if ctx.dry:
            settings.num_inference_steps, settings.coarse_steps, settings.fine_steps = 4, 2, 2
        pipe = One2345PPPipeline(mv, coarse, fine, texture_settings(ctx.dry), settings).to(ctx.device, dtype)
        stand_in_samplers(pipe)
        image = input_image()
        if ctx.cuda:
            os.environ["ONE2345PP_RASTERIZER"] = "nvdiffrast"
        # the xatlas unwrap of the bake (single-threaded CPU work: 34 s for a 76k-face mesh on the 2-core
        # development machine) is timed apart
        unwrap, spent = bake_module.unwrap, {"s": 0.0}

        def timed_unwrap(*a, **kw):
            t = time.perf_counter()
            try:
                return unwrap(*a, **kw)
            finally:
                spent["s"] += time.perf_counter() - t

        bake_module.unwrap = timed_unwrap
        quick = {"num_inference_steps": 2, "coarse_steps": 2, "fine_steps": 2, "refine": False}
        t0 = time.perf_counter()
        pipe(image, seed=0, **quick)  # warm-up: CUDA kernels, cuDNN choices (no bake: xatlas would run twice)
        ctx.sync()
        warm = time.perf_counter() - t0
        spent["s"] = 0.0
        t0 = time.perf_counter()
        out = pipe(image, seed=1)
        t1 = time.perf_counter()
        glb = save_glb(out.mesh, ctx.out / "pipeline.glb")
        total = time.perf_counter() - t0
        return total, {
            "timings": out.timings,
            "glb_s": time.perf_counter() - t1,
            "glb_bytes": glb.stat().st_size,
            "xatlas_unwrap_s": spent["s"],
            "faces": int(out.mesh_raw.num_faces),
            "refine": refine,
            "refine_note": why,
            "settings": out.settings,
            "warm_up_s": warm,
            "stand_ins": "coarse -> sphere shell, fine SDF -> sphere (r 0.35); samplers run in full",
            "multiview_dtype": str(dtype).replace("torch.", ""),
        }

    run_row(ctx, "pipeline_glb", fn)


# -------------------------------------------------------------------------------------------------- group: compile
def group_compile(ctx: Ctx) -> None:
    import torch
    from bench_multiview import GUIDANCE, smooth_images, time_sampling
    from bench_pipeline import multiview_pipeline

    def fn():
        pipe = multiview_pipeline("full", ctx.device, torch.bfloat16)
        cond = smooth_images(1, 320, 320, ctx.device, seed=0)
        with torch.no_grad():
            eager = time_sampling(pipe, cond, 2, ctx.device)
            pipe.unet.compile()
            t0 = time.perf_counter()
            pipe(cond, num_inference_steps=2, guidance_scale=GUIDANCE, output_type="pt")  # compiles
            ctx.sync()
            compile_s = time.perf_counter() - t0
            compiled = time_sampling(pipe, cond, 2, ctx.device)
        return compiled, {
            "eager_s": eager,
            "compile_s": compile_s,
            "speedup": eager / compiled,
            "pays": compiled < 0.95 * eager,
            "mode": "default",
        }

    run_row(ctx, "multiview_sample_compiled", fn)


GROUP_FUNCS = {
    "multiview": group_multiview,
    "recon": group_recon,
    "sparse": group_sparse,
    "texture": group_texture,
    "pipeline": group_pipeline,
    "compile": group_compile,
}


def build_nvdiffrast(ctx_args) -> int:
    """Compile and load nvdiffrast's CUDA plugin (torch's extension cache), as the texture rows will use it."""
    t0 = time.perf_counter()
    record = {"status": "error"}
    try:
        import nvdiffrast.torch as dr

        dr.RasterizeCudaContext(device="cuda")
        record = {"status": "ok"}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
    record["seconds"] = time.perf_counter() - t0
    (Path(ctx_args.work) / "nvdiffrast_build.json").write_text(json.dumps(record))
    return 0 if record["status"] == "ok" else 1


def child_main(args) -> int:
    import torch

    if args.dry_run and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child == "nvdiffrast-build":
        return build_nvdiffrast(args)
    ctx = Ctx(args, args.child)
    GROUP_FUNCS[args.child](ctx)
    return 0


# ---------------------------------------------------------------------------------------------------------- parent
def start_child(args, name: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(args.work)]
    cmd += [
        "--out",
        str(args.out),
        "--t0",
        repr(args.t0),
        "--scene",
        str(args.scene),
        "--absent",
        ",".join(args.absent),
    ]
    if args.rows:
        cmd += ["--rows", ",".join(args.rows)]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.bf16:
        cmd.append("--bf16")
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def stop(proc: subprocess.Popen) -> None:
    """Kill a child and everything it started (its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def read_rows(path: Path) -> dict:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            out[rec["name"]] = rec
    return out


def measured_text(row: Row, rec: dict) -> str:
    m = rec.get("measured")
    if rec["status"] != "ok" or m is None:
        return "-"
    d = rec.get("details") or {}
    if row.units == "%":
        text = f"{m:.2f}%"
    elif row.units == "x":
        text = f"{m:.2f}x"
    else:
        text = f"{m:.2f} {row.units}" if m >= 0.1 else f"{m:.4f} {row.units}"
    if d.get("peak_gib") is not None and row.target_key == "peak_gib":
        text += f", peak {d['peak_gib']:.1f} GiB"
    return text


def met(row: Row, rec: dict, dry: bool):
    if dry or rec["status"] != "ok" or row.target_value is None:
        return None
    value = rec["details"].get(row.target_key) if row.target_key else rec.get("measured")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    ok = {"<=": value <= row.target_value, "<": value < row.target_value, ">=": value >= row.target_value}[row.op]
    if row.name == "multiview_sample_compiled":
        ok = ok and bool(rec["details"].get("pays"))
    return bool(ok)


def note(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {rec.get('reason') or ''}".strip()
    d = rec.get("details") or {}
    bits = []
    for key, fmt in (
        ("coarse_s", "coarse {:.2f} s"),
        ("fine_s", "fine {:.2f} s"),
        ("bake_s_mean", "bake {:.2f} s"),
        ("eager_s", "eager {:.2f} s"),
        ("compile_s", "compile {:.0f} s"),
        ("encoders", "{}"),
        ("torchsparse", "torchsparse: {}"),
        ("xatlas_unwrap_s", "xatlas unwrap {:.2f} s"),
        ("refine_note", "{}"),
    ):
        if d.get(key) not in (None, ""):
            bits.append(fmt.format(d[key]))
    if "timings" in d:
        bits.append(
            ", ".join(f"{k} {v:.2f}" for k, v in d["timings"].items() if k != "total") + f", glb {d['glb_s']:.2f}"
        )
    return "; ".join(bits)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU figures ({'DRY RUN on the CPU: tiny presets, not GPU figures' if report['dry_run'] else 'measured'})"
        + ("" if report["complete"] else " - INCOMPLETE: the run was stopped"),
        "",
        f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python "
        f"{env['python']}; {report['date']}; {report['total_s']:.0f} s in all (budget {report['budget_s']:.0f} s).",
        "",
        "| row | figure | target | measured | met | device | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        mark = {True: "yes", False: "NO", None: "-"}[r["met"]]
        cells = [r["name"], r["figure"], r["target"], r["measured_text"], mark, r["device"] or "-", r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    build = report.get("nvdiffrast_build")
    if build:
        lines += ["", f"nvdiffrast build: {build.get('status')} in {build.get('seconds', float('nan')):.0f} s."]
    return "\n".join(lines) + "\n"


def wait_for_build(args, proc: subprocess.Popen, timeout: float, clock: Clock) -> dict:
    """The nvdiffrast build's record, after waiting at most ``timeout`` seconds for it (then it is stopped). A build
    that did not finish is recorded as such, so that the pipeline group refines nothing rather than build again."""
    if proc.poll() is None:
        clock.say("waiting for the nvdiffrast build")
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop(proc)
            clock.say("nvdiffrast build: stopped (time budget)")
    path = args.work / "nvdiffrast_build.json"
    if not path.is_file():
        path.write_text(json.dumps({"status": "not finished", "returncode": proc.returncode}))
    build = json.loads(path.read_text())
    clock.say(f"nvdiffrast build: {build.get('status')}")
    return build


def scene_note(path: Path) -> str:
    """What the dry run can check of the texture rows: that their scene file reads."""
    try:
        return f" (scene file {path}: {len(load_scene(path))} objects, read)"
    except Exception as exc:  # noqa: BLE001
        return f" (scene file: {exc})"


def parent_main(args) -> int:
    import torch

    clock = Clock(args.t0)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(
            "bench_gpu: no CUDA device here; `--dry-run` runs the same code on the CPU at tiny sizes", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry_run)
    clock.say(f"{env['device']}; torch {env['torch']}, CUDA {env['cuda']}; budget {args.budget_s:.0f} s")
    deadline = args.t0 + args.budget_s
    wanted = {ROW_BY_NAME[r].group for r in args.rows} if args.rows else {g.name for g in GROUPS}

    build_proc, build_log = None, None
    if not args.dry_run and wanted & {"texture", "pipeline"}:
        build_log = open(args.out / "nvdiffrast_build.log", "w")  # noqa: SIM115 - closed below
        env_build = dict(os.environ)
        env_build.setdefault("MAX_JOBS", "8")  # leave half the cores to the rows timed meanwhile
        major, minor = torch.cuda.get_device_capability(0)
        env_build.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
        build_proc = start_child(args, "nvdiffrast-build", stdout=build_log, stderr=subprocess.STDOUT, env=env_build)
        clock.say("nvdiffrast: building its CUDA plugin in the background (nvdiffrast_build.log)")

    records: dict = {}
    try:
        for group in GROUPS:
            names = [r.name for r in ROWS if r.group == group.name and (not args.rows or r.name in args.rows)]
            if not names:
                continue
            if args.dry_run and all(ROW_BY_NAME[n].cuda_only for n in names):  # no child: nothing would run
                extra = scene_note(args.scene) if group.name == "texture" else ""
                for n in names:
                    reason = f"needs CUDA: {ROW_BY_NAME[n].cuda_only}{extra}"
                    records[n] = {"name": n, "status": "not_run", "reason": reason, "device": env["device"]}
                clock.say(f"group {group.name}: not run (needs CUDA){extra}")
                continue
            left = deadline - time.time()
            cap = group.dry_cap_s if args.dry_run else group.cap_s
            if left < (0 if args.dry_run else group.min_s):
                for n in names:
                    records[n] = {"name": n, "status": "not_run", "reason": f"time budget: {left:.0f} s left"}
                clock.say(f"group {group.name}: skipped ({left:.0f} s left)")
                continue
            limit = min(cap, left)
            t_group = time.time()
            if group.name in ("texture", "pipeline") and build_proc is not None:
                build = wait_for_build(args, build_proc, limit - 30, clock)
                if build.get("status") != "ok" and group.name == "texture":  # no second build in the child
                    why = build.get("reason") or build.get("status")
                    why = f"nvdiffrast did not build ({why}; see nvdiffrast_build.log)"
                    for n in names:
                        records[n] = {"name": n, "status": "error", "reason": why}
                    clock.say(f"group {group.name}: {why}")
                    continue
                limit = min(cap - (time.time() - t_group), deadline - time.time())
            clock.say(f"group {group.name}: {', '.join(names)} (limit {limit:.0f} s)")
            proc = start_child(args, group.name)
            timed_out = False
            try:
                rc = proc.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                stop(proc)
                rc, timed_out = None, True
            got = read_rows(args.work / f"rows-{group.name}.jsonl")
            for n in names:
                if n in got:
                    records[n] = got[n]
                elif timed_out:
                    records[n] = {"name": n, "status": "timeout", "reason": f"group stopped after {limit:.0f} s"}
                else:
                    records[n] = {"name": n, "status": "error", "reason": f"child process exited with code {rc}"}
            clock.say(f"group {group.name}: done in {time.time() - t_group:.0f} s")
            write_report(args, env, records, build_proc is not None, final=False)
    finally:
        if build_proc is not None:
            stop(build_proc)
            build_log.close()

    report = write_report(args, env, records, build_proc is not None, final=True)
    md = markdown(report)
    print()
    print(md)
    print(json.dumps(report, default=_jsonable))
    return 0


def write_report(args, env: dict, records: dict, built: bool, final: bool) -> dict:
    """bench_gpu.json and bench_gpu.md from the rows recorded so far (written after every group, so a run stopped
    from outside still leaves the finished rows; rows not reached yet read "not_run: not reached")."""
    build = None
    if built:
        path = args.work / "nvdiffrast_build.json"
        build = json.loads(path.read_text()) if path.is_file() else {"status": "not finished"}
    rows = []
    for row in ROWS:
        missing = "not selected (--rows)" if args.rows and row.name not in args.rows else "not reached"
        rec = dict(records.get(row.name) or {"name": row.name, "status": "not_run", "reason": missing})
        rec.setdefault("device", env["device"] if rec["status"] == "ok" else None)
        rec.setdefault("measured", None)
        rec.setdefault("details", {})
        rec.setdefault("seconds", None)
        rec.setdefault("reason", None)
        full = {**dataclasses.asdict(row), **rec}
        full.pop("cuda_only", None)
        full["measured_text"] = measured_text(row, rec)
        full["met"] = met(row, rec, args.dry_run)
        full["note"] = note(rec)
        rows.append(full)
    report = {
        "bench": "gpu",
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dry_run": bool(args.dry_run),
        "complete": final,
        "budget_s": args.budget_s,
        "total_s": time.time() - args.t0,
        "absent": list(args.absent),
        "environment": env,
        "nvdiffrast_build": build,
        "rows": rows,
    }
    (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    (args.out / "bench_gpu.md").write_text(markdown(report))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs/bench-gpu", help="bench_gpu.json, bench_gpu.md, logs")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    ap.add_argument("--bf16", action="store_true", help="dry run: bf16 as on the GPU (checks those code paths)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds for everything (the groups stop there)")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--scene", type=Path, default=DEFAULT_SCENE, help="scene file of the texture rows")
    ap.add_argument(
        "--absent",
        default=None,
        help=f"modules made unimportable (default: none; with --dry-run: {','.join(DEVICE_ABSENT)})",
    )
    ap.add_argument("--write-scene", type=Path, default=None, help="render the scene file here (needs open3d), exit")
    ap.add_argument("--scene-objects", type=int, default=2)
    ap.add_argument("--scene-resolution", type=int, default=320)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROW_BY_NAME]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(ROW_BY_NAME)}")
    if args.absent is None:
        args.absent = list(DEVICE_ABSENT) if args.dry_run else []
    else:
        args.absent = [a for a in args.absent.split(",") if a]
    block_modules(args.absent)
    quiet_environment()
    if args.write_scene is not None:
        t0 = time.time()
        path = write_scene(args.write_scene, args.scene_objects, args.scene_resolution)
        print(f"scene: {path} ({path.stat().st_size / 2**20:.2f} MiB, {time.time() - t0:.1f} s)")
        return 0
    args.t0 = args.t0 or time.time()
    if args.child:
        return child_main(args)
    own_work = args.work is None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        return parent_main(args)
    finally:
        if own_work:
            import shutil

            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
