"""Settings of a dataset evaluation (``one2345pp eval --dataset gso|procedural``), read with
:func:`one2345pp.config.load_config`: the defaults below <- an optional YAML file (``experiments/eval/*.yaml``) <-
``key=value`` overrides (``points=5000 views.resolution=128 pipeline.num_inference_steps=50``).

The defaults are the protocol of METHOD.md: 100,000 surface points, F-Score at 0.05, rotation search + ICP,
24 CLIP views (12 at elevation 30, 12 at 0). CLIP and LPIPS need weights that are not downloaded here: with
``clip.model`` / ``lpips.weights`` left null those columns are recorded as not available (with the reason); a path
or hub id that is set but cannot be loaded is an error before any object is evaluated.

Choices the method leaves open, written down here:

- Meshes are read with the shard builder's loader and up-axis rule (``up_axis``, as ``data.up_axis``: GSO's OBJ
  files +Z up, GLB files +Y up turned +Z up), so ground-truth renders match the training renders.
- Input view: a rendering at azimuth ``input.azimuth_deg`` (0: the +X side of the mesh in the project's +Z-up
  frame; for a glTF asset, whose front faces -Y after reading, its left side) and elevation
  ``input.elevation_deg`` (20, inside the [-10, 40] range the condition views were trained on), at the pipeline's
  camera distance and FoV and its preprocessing size, RGBA so the pipeline takes the alpha as its mask.
- Ground truth is normalised as the shard builder does it (bounding box centred, longest side = the pipeline's
  ``extent``), then turned by ``-input.azimuth_deg`` about +Z so that the input camera sits at azimuth 0: the frame
  the pipeline's views and meshes are in. The six target views are rendered at the pipeline's cameras and view
  size, composited on its gray background.
- Renderings (ground truth and predicted mesh) use the CPU ray caster with the training data's world-fixed light
  (``render``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.config import ProceduralConfig
from ..rendering.base import RenderConfig
from .appearance import EvalViewsConfig
from .geometry import AlignConfig

__all__ = [
    "EvalClipConfig",
    "EvalConfig",
    "EvalLpipsConfig",
    "HeldOutProceduralConfig",
    "InputViewConfig",
    "PipelineCallConfig",
    "RUN_ONLY_KEYS",
]


@dataclass
class InputViewConfig:
    azimuth_deg: float = 0.0  # the "frontal" side in the mesh's own frame (+X at 0)
    elevation_deg: float = 20.0
    resolution: int | None = None  # None: the pipeline's preprocessing size (preprocess.size)


@dataclass
class EvalClipConfig:
    # a transformers CLIPModel / CLIPVisionModelWithProjection folder or hub id (the GSO preset names OpenAI's
    # ViT-L/14, "openai/clip-vit-large-patch14"); null: CLIP similarity is recorded as not available
    model: str | None = None
    subfolder: str | None = None
    batch_size: int = 8
    background: float = 1.0  # renderings are composited over this grey level (white) before CLIP


@dataclass
class EvalLpipsConfig:
    # safetensors file of one2345pp.evaluation.lpips (python -m one2345pp.evaluation.lpips --vgg ... --lin ...);
    # null: LPIPS is recorded as not available
    weights: str | None = None
    batch_size: int = 8


@dataclass
class HeldOutProceduralConfig(ProceduralConfig):
    """The procedural objects of ``--dataset procedural``: generated in code like the training set, with another
    seed (the training data default to seed 0), written as mesh files and read back through the same loader."""

    seed: int = 1000
    num_objects: int = 16


@dataclass
class PipelineCallConfig:
    """Arguments of each pipeline call; null: the pipeline's stored settings."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_candidates: int | None = None
    sampler: str | None = None
    coarse_steps: int | None = None
    fine_steps: int | None = None
    refine: bool | None = None
    refine_iterations: int | None = None
    coarse_guidance: float | None = None
    fine_guidance: float | None = None


@dataclass
class EvalConfig:
    up_axis: str = "auto"  # up axis of the mesh files, as data.up_axis: auto (by format), y or z
    seed: int = 0  # the pipeline's seed for every object (results do not depend on the order of objects)
    points: int = 100_000  # surface samples per mesh for F-Score / Chamfer
    tau: float = 0.05  # F-Score threshold in the unit bounding box
    align: bool = True  # rotation search + ICP before scoring geometry
    alignment: AlignConfig = field(default_factory=AlignConfig)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    mesh_format: str = "glb"  # the predicted mesh is saved as objects/<uid>/mesh.<fmt> (glb, obj, ply)
    retry_failed: bool = False  # a rerun evaluates objects recorded as failed again (finished ones are skipped)
    progress: bool = True
    input: InputViewConfig = field(default_factory=InputViewConfig)
    views: EvalViewsConfig = field(default_factory=EvalViewsConfig)  # the CLIP / turntable cameras
    render: RenderConfig = field(default_factory=RenderConfig)
    clip: EvalClipConfig = field(default_factory=EvalClipConfig)
    lpips: EvalLpipsConfig = field(default_factory=EvalLpipsConfig)
    procedural: HeldOutProceduralConfig = field(default_factory=HeldOutProceduralConfig)
    pipeline: PipelineCallConfig = field(default_factory=PipelineCallConfig)


# keys that change how a run goes, not what it measures: free to differ when a partial evaluation is resumed
RUN_ONLY_KEYS = (
    "device",
    "retry_failed",
    "progress",
    "render.threads",
    "clip.batch_size",
    "lpips.batch_size",
    "procedural.num_objects",
)
