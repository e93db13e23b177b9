"""The inference pipeline: one image -> six views -> coarse occupancy -> fine SDF/colour -> mesh -> textured mesh.

On disk (diffusers style) a pipeline is one folder::

    model_index.json     {"_class_name": "One2345PPPipeline", "_version": ..., "multiview": [module, class], ...,
                          "settings": {...}}   (PipelineSettings: framing, sampler defaults)
    multiview/           MultiViewDiffusionPipeline.save_pretrained (diffusers folder)
    coarse/              CoarseModel export (config.json + model.safetensors; one2345pp.models.coarse)
    fine/                FineModel export (one2345pp.models.fine)
    texture/             texture-stage settings (config.json)

Components load only from the classes listed in :data:`COMPONENTS` (from :mod:`one2345pp.registry`; a model index
never imports arbitrary code; the paths that older folders name are accepted too).
``One2345PPPipeline.from_pretrained(folder, multiview=other)`` swaps a component; ``save_pretrained`` writes the
folder (to a temporary name, renamed when complete).

Frames: the condition view defines azimuth 0; the six views sit at the layout's azimuth offsets and absolute
elevations, at the distance the data were rendered at; meshes come out in the normalised frame ([-0.5, 0.5]^3,
+Z up) like the training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from .. import __version__
from ..cameras import Camera, framing_distance, get_layout, multiview_cameras, tile
from ..geometry.extraction import ExtractionConfig, extract_meshes
from ..geometry.mesh import Mesh
from ..models.multiview_pipeline import SAMPLERS, vae_scale_factor
from ..registry import STAGES, component_class
from ..texture.export import TexturedMesh
from ..texture.refine import image_to_view
from ..texture.settings import TextureSettings, load_settings, save_settings, texture_mesh
from ..utils.atomic import atomic_folder
from ..utils.timing import timed
from .preprocess import PreprocessConfig, alpha_from_background, preprocess_image
from .preprocess import check_config as check_preprocess

INDEX_FILE = "model_index.json"
CLASS_NAME = "One2345PPPipeline"
# component name -> (module, class) the model index names; nothing else is ever imported
COMPONENTS = {name: entry.component for name, entry in STAGES.items()}


@dataclass
class MeshSettings:
    """Mesh extraction knobs of the pipeline; the grid resolution and the SDF units come from the fine stage (its
    resolution, SDF in truncation units), so they are not settings."""

    level: float = 0.0  # iso-value, in truncation units (strictly inside (-1, 1))
    keep_largest_component: bool = True
    merge_distance: float = 0.01  # fine voxels: vertices closer than this are merged
    min_component_fraction: float = 0.01  # components with fewer faces than this fraction of all faces are removed
    target_faces: int | None = None  # quadric decimation to about this many faces (None: keep all)

    def extraction(self, resolution: int) -> ExtractionConfig:
        return ExtractionConfig(resolution=resolution, truncation=1.0, **dataclasses.asdict(self))


@dataclass
class PipelineSettings:
    """Framing and default stage parameters, stored in ``model_index.json``."""

    layout: str = "zero123pp-v1.2"  # camera layout the multi-view stage was trained on
    distance: float | None = None  # camera distance; None: the framing distance of the layout's FoV
    extent: float = 0.9  # longest side of the normalised objects (data.normalize_extent)
    view_size: int | None = None  # pixels per generated view; None: the multi-view stage's trained size
    num_inference_steps: int | None = None  # None: the multi-view model's own (its folder's num_inference_steps)
    guidance_scale: float | None = None  # None: the multi-view model's own default (its folder's guidance_scale)
    num_candidates: int | None = None  # multi-view grids drawn, the consensus kept; None: its folder's num_candidates
    sampler: str = "euler_a"  # "euler_a" or "ddim"
    coarse_steps: int = 50
    fine_steps: int = 20
    coarse_guidance: float | None = None  # None: the coarse model's own default
    fine_guidance: float | None = None
    refine: bool = True  # texture refinement (False: vertex colours of the fine stage)
    view_alpha_threshold: float = 0.08  # colour distance from the gray background that counts as object
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    extraction: MeshSettings = field(default_factory=MeshSettings)

    def check(self) -> None:
        """Raise ValueError naming the first bad value."""
        get_layout(self.layout)
        problems = []
        if self.distance is not None and self.distance <= 0:
            problems.append(f"distance={self.distance} (must be > 0 or null)")
        if not 0 < self.extent <= 1:
            problems.append(f"extent={self.extent} (must lie in (0, 1])")
        if self.view_size is not None and self.view_size < 8:
            problems.append(f"view_size={self.view_size} (must be >= 8 or null)")
        for key in ("num_inference_steps", "num_candidates", "coarse_steps", "fine_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} (must be >= 1)")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} (choose {', '.join(SAMPLERS)})")
        if not 0 < self.view_alpha_threshold < 1:
            problems.append(f"view_alpha_threshold={self.view_alpha_threshold} (must lie in (0, 1))")
        if not -1 < self.extraction.level < 1:
            problems.append(f"extraction.level={self.extraction.level} (must lie in (-1, 1), truncation units)")
        if problems:
            raise ValueError("bad pipeline settings: " + "; ".join(problems))
        check_preprocess(self.preprocess)

    @property
    def camera_distance(self) -> float:
        if self.distance is not None:
            return self.distance
        return framing_distance(get_layout(self.layout).fov_deg, self.extent)


@dataclass
class PipelineOutput:
    condition: Image.Image  # the preprocessed input (RGB on gray)
    views: list[Image.Image]  # six generated views, tiling order
    grid: Image.Image  # the 3x2 grid
    cameras: list[Camera]  # the six views' cameras
    coarse_occupancy: np.ndarray  # bool [C, C, C], indexed [x, y, z]
    mesh_raw: Mesh  # extracted mesh with the fine stage's vertex colours
    mesh: object  # TexturedMesh after refinement + baking (or vertex colours when refine=False)
    timings: dict[str, float]  # seconds per stage and "total"
    settings: dict  # what ran: seed, steps, guidance, refine


def vertex_colored(mesh: Mesh):
    """A :class:`TexturedMesh` with per-vertex colours (the mean of each vertex's corner colours)."""
    if mesh.corner_colors is None:
        colors = np.full((mesh.num_vertices, 3), 0.8)
    else:
        acc = np.zeros((mesh.num_vertices, 4))
        np.add.at(acc, mesh.faces.reshape(-1), mesh.corner_colors.reshape(-1, 4).astype(np.float64))
        count = np.bincount(mesh.faces.reshape(-1), minlength=mesh.num_vertices)[:, None]
        colors = np.where(count > 0, acc[:, :3] / np.maximum(count, 1), 0.8)
    return TexturedMesh(mesh.vertices, mesh.faces, vertex_colors=colors)


def settings_from_dict(d: dict | None, source: str = "settings") -> PipelineSettings:
    """A checked :class:`PipelineSettings` from a plain dict (unknown keys and wrong types are errors)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineSettings), d or {}))
    except OmegaConfBaseException as exc:
        raise ValueError(f"{source}: {exc}") from exc
    settings.check()
    return settings


def _load_component(name: str, entry, folder: Path):
    accepted = [list(COMPONENTS[name])] + [list(old) for old in STAGES[name].legacy_components]
    if not isinstance(entry, (list, tuple)) or list(entry) not in accepted:
        raise ValueError(f"{folder / INDEX_FILE}: component {name!r} is {entry}, expected {list(COMPONENTS[name])}")
    sub = folder / name
    if not sub.is_dir():
        raise FileNotFoundError(f"pipeline component folder missing: {sub}")
    if name == "multiview":
        if not (sub / "model_index.json").is_file():
            raise FileNotFoundError(f"pipeline component {sub} is not a diffusers folder (no model_index.json)")
        pipe = component_class(name).from_pretrained(str(sub))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if name == "texture":
        return load_settings(sub)
    return component_class(name).from_pretrained(sub)


def check_stages(multiview, coarse, fine, settings: PipelineSettings) -> None:
    """Refuse components that cannot work together (ValueError naming both sides)."""
    if coarse.resolution != fine.coarse_resolution:
        raise ValueError(
            f"the coarse stage samples {coarse.resolution}^3 but the fine stage expects {fine.coarse_resolution}^3 "
            f"(fine model.unet.resolution / model.coarse_factor)"
        )

    size = settings.view_size or int(multiview.config.view_size)
    factor = vae_scale_factor(multiview.vae)
    if size % factor:
        raise ValueError(f"view_size={size} is not a multiple of the multi-view VAE's downsampling factor {factor}")


def read_index(folder: str | os.PathLike) -> dict:
    """The ``model_index.json`` of a pipeline folder, checked (FileNotFoundError / ValueError naming the file)."""
    index_path = Path(folder) / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"not a pipeline folder (no {INDEX_FILE}): {folder}")
    try:
        index = json.loads(index_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{index_path}: not valid JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("_class_name") != CLASS_NAME:
        got = index.get("_class_name") if isinstance(index, dict) else None
        raise ValueError(f"{index_path}: _class_name is {got!r}, expected {CLASS_NAME!r}")
    return index


class One2345PPPipeline:
    """Chains the exported stages; see the module doc for the folder layout."""

    def __init__(self, multiview, coarse, fine, texture=None, settings: PipelineSettings | None = None):
        self.multiview, self.coarse, self.fine = multiview, coarse, fine
        self.texture = texture if texture is not None else TextureSettings()
        self.settings = settings or PipelineSettings()
        self.settings.check()
        self.texture.check()
        check_stages(multiview, coarse, fine, self.settings)
        self.coarse.eval()
        self.fine.eval()
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device=None, dtype=None, **components) -> One2345PPPipeline:
        """Load a pipeline folder; keyword arguments (``multiview=``, ``coarse=``, ``fine=``, ``texture=``,
        ``settings=``) replace the stored components, which are then not loaded at all."""
        folder = Path(folder)
        index = read_index(folder)
        unknown = set(components) - set(COMPONENTS) - {"settings"}
        if unknown:
            raise TypeError(f"unknown pipeline components: {sorted(unknown)} (known: {sorted(COMPONENTS)}, settings)")
        parts = {}
        for name in COMPONENTS:
            if components.get(name) is not None:
                parts[name] = components[name]
            elif name in index:
                parts[name] = _load_component(name, index[name], folder)
            elif name != "texture":
                raise ValueError(f"{folder / INDEX_FILE}: component {name!r} is missing")
        settings = components.get("settings") or settings_from_dict(index.get("settings"), str(folder / INDEX_FILE))
        pipe = cls(parts["multiview"], parts["coarse"], parts["fine"], parts.get("texture"), settings)
        return pipe.to(device or "cpu", dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the pipeline folder (temporary name beside it, renamed when complete; an existing folder is
        replaced only then)."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.multiview.save_pretrained(str(tmp / "multiview"), safe_serialization=True)
            self.coarse.save_pretrained(tmp / "coarse")
            self.fine.save_pretrained(tmp / "fine")
            save_settings(self.texture, tmp / "texture")
            index = {"_class_name": CLASS_NAME, "_version": __version__}
            index.update({name: list(entry) for name, entry in COMPONENTS.items()})
            index["settings"] = OmegaConf.to_container(OmegaConf.structured(self.settings))
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return folder

    def to(self, device=None, dtype=None) -> One2345PPPipeline:
        """Move to ``device``; ``dtype`` applies to the multi-view stage (the 3D stages stay float32)."""
        if device is not None:
            self.device = torch.device(device)
            self.multiview.to(self.device)
            self.coarse.to(self.device)
            self.fine.to(self.device)
        if dtype is not None:
            self.dtype = dtype
            self.multiview.to(dtype=dtype)
        return self

    # -------------------------------------------------------------------------------------------------- running
    def cameras(self, size: int) -> list[Camera]:
        """The six views' cameras (the input view at azimuth 0) for views of ``size`` pixels."""
        s = self.settings
        return multiview_cameras(0.0, s.layout, s.camera_distance, size)

    def _views_for_texture(self, views: torch.Tensor, cameras: list[Camera]):
        """Generated views -> refinement targets; the mask is where a view differs from the gray background (the
        input view is not used: its elevation is unknown)."""
        out = []
        for img, cam in zip(views, cameras, strict=True):
            rgb = img.permute(1, 2, 0).float().cpu().numpy()
            alpha = alpha_from_background(rgb, 0.5, self.settings.view_alpha_threshold)
            out.append(image_to_view(np.concatenate([rgb, alpha[..., None]], -1), cam, background=0.5))
        return out

    @torch.no_grad()
    def __call__(
        self,
        image,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        coarse_steps: int | None = None,
        fine_steps: int | None = None,
        refine: bool | None = None,
        refine_iterations: int | None = None,
        progress: bool = False,
        coarse_guidance: float | None = None,
        fine_guidance: float | None = None,
        num_candidates: int | None = None,
    ) -> PipelineOutput:
        """Run the whole chain on one image (path, PIL image or array); ``None`` arguments take the settings'
        defaults (the 3D guidance scales: the models' own). The same seed gives the same output.

        Raises :class:`~one2345pp.pipeline.preprocess.ImageError` for a bad image and RuntimeError when the coarse
        stage finds no surface."""
        # 1. check the inputs: the run's settings (arguments over the pipeline's defaults) and the image
        run = self._run_settings(
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_candidates=num_candidates,
            sampler=sampler,
            coarse_steps=coarse_steps,
            fine_steps=fine_steps,
            refine=refine,
            refine_iterations=refine_iterations,
            coarse_guidance=coarse_guidance,
            fine_guidance=fine_guidance,
        )
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        timings: dict[str, float] = {}
        with timed(timings, "total"):
            # 2. the condition image: background removed, object framed as the shards frame it
            with timed(timings, "preprocess"):
                cond_rgb, _ = preprocess_image(image, self.settings.preprocess)
            # 3. six views around the object
            with timed(timings, "multiview"):
                views = self._multiview_views(cond_rgb, run, progress)
            cameras = self.cameras(views.shape[-1])
            cond = torch.from_numpy(cond_rgb).permute(2, 0, 1).float().div(255.0).to(self.device)
            gen3d = torch.Generator(device="cpu").manual_seed(run["seed"] + 1)  # one stream for both 3D stages
            # 4. coarse occupancy
            with timed(timings, "coarse"):
                occ = self._coarse_occupancy(views, cameras, cond, run, gen3d)
            # 5. fine SDF and colour on the occupied cells
            with timed(timings, "fine"):
                fine = self.fine.sample(
                    views,
                    cameras,
                    cond,
                    coarse_occ=occ,
                    steps=run["fine_steps"],
                    generator=gen3d,
                    guidance_scale=run["fine_guidance"],
                )
            # 6. the mesh
            with timed(timings, "extraction"):
                mesh_raw = extract_meshes(fine, self.settings.extraction.extraction(self.fine.resolution))[0]
            # 7. its texture (refined against the views) or vertex colours
            with timed(timings, "texture"):
                mesh = self._texture(mesh_raw, views, cameras, run, progress)
        # 8. the outputs
        return self._output(cond_rgb, views, cameras, occ, mesh_raw, mesh, timings, run)

    def _run_settings(self, **given) -> dict:
        """The run's settings: each argument, else the pipeline settings' value, else the model's own; the step
        counts are checked."""
        s = self.settings

        def pick(value, default):
            return default if value is None else value

        mv_steps, mv_guidance, mv_candidates = self.multiview.sampling_defaults(
            s.num_inference_steps, s.guidance_scale, s.num_candidates
        )
        run = {
            "seed": int(given["seed"]),
            "num_inference_steps": int(pick(given["num_inference_steps"], mv_steps)),
            "guidance_scale": float(pick(given["guidance_scale"], mv_guidance)),
            "num_candidates": int(pick(given["num_candidates"], mv_candidates)),
            "sampler": pick(given["sampler"], s.sampler),
            "coarse_steps": int(pick(given["coarse_steps"], s.coarse_steps)),
            "fine_steps": int(pick(given["fine_steps"], s.fine_steps)),
            "coarse_guidance": float(
                pick(given["coarse_guidance"], pick(s.coarse_guidance, self.coarse.cfg.diffusion.guidance_scale))
            ),
            "fine_guidance": float(
                pick(given["fine_guidance"], pick(s.fine_guidance, self.fine.cfg.diffusion.guidance_scale))
            ),
            "refine": bool(pick(given["refine"], s.refine)),
            "refine_iterations": int(pick(given["refine_iterations"], self.texture.refine.iterations)),
        }
        for key in ("num_inference_steps", "num_candidates", "coarse_steps", "fine_steps"):
            if run[key] < 1:
                raise ValueError(f"{key} must be >= 1, got {run[key]}")
        return run

    def _multiview_views(self, cond_rgb: np.ndarray, run: dict, progress: bool) -> torch.Tensor:
        """The six generated views, ``[6, 3, h, w]`` in [0, 1] on gray, on the pipeline's device."""
        self.multiview.set_progress_bar_config(disable=not progress)
        mv = self.multiview(
            Image.fromarray(cond_rgb),
            num_inference_steps=run["num_inference_steps"],
            guidance_scale=run["guidance_scale"],
            num_candidates=run["num_candidates"],
            sampler=run["sampler"],
            generator=torch.Generator(device="cpu").manual_seed(run["seed"]),
            view_size=self.settings.view_size,
            output_type="pt",
        )
        return mv.views[0].float().to(self.device)

    def _coarse_occupancy(self, views, cameras, cond, run: dict, generator) -> torch.Tensor:
        occ = self.coarse.sample(
            views, cameras, cond, steps=run["coarse_steps"], generator=generator, guidance_scale=run["coarse_guidance"]
        )
        if not bool((occ > 0).any()):
            raise RuntimeError(
                f"the coarse stage produced an empty occupancy volume for seed {run['seed']} (no surface to "
                "extract); try another seed or guidance, or check that the image shows one object"
            )
        return occ

    def _texture(self, mesh_raw: Mesh, views, cameras, run: dict, progress: bool) -> Mesh:
        if not run["refine"]:
            return vertex_colored(mesh_raw)
        refine = dataclasses.replace(self.texture.refine, iterations=run["refine_iterations"], progress=progress)
        tex = dataclasses.replace(self.texture, refine=refine)
        with torch.enable_grad():
            mesh, _ = texture_mesh(mesh_raw, self._views_for_texture(views, cameras), tex, self.device)
        return mesh

    @staticmethod
    def _output(cond_rgb, views, cameras, occ, mesh_raw, mesh, timings, run) -> PipelineOutput:
        pil = [Image.fromarray(np.uint8(np.round(v.permute(1, 2, 0).cpu().numpy() * 255))) for v in views]
        return PipelineOutput(
            condition=Image.fromarray(cond_rgb),
            views=pil,
            grid=Image.fromarray(tile([np.asarray(p) for p in pil])),
            cameras=cameras,
            coarse_occupancy=(occ[0, 0] > 0).cpu().numpy(),
            mesh_raw=mesh_raw,
            mesh=mesh,
            timings=timings,
            settings=run,
        )
