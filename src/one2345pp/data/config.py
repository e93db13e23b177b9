"""Typed configs of the data side: procedural source, shards, loaders, and the build config that composes the
rendering recipe (:class:`~one2345pp.rendering.base.RenderConfig`) and the ground-truth volumes
(:class:`~one2345pp.geometry.volumes.VolumeConfig`).

Every value here is a config key (``data.render.supersample=2`` on any command line); the choices the method left
open are written down beside their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The render and volume schemas live with what they configure (the renderer, the volume builder); a DataConfig
# composes them, and they stay importable from here for the code and the saved configs that name them so.
from ..geometry.volumes import VolumeConfig
from ..rendering.base import RenderConfig


@dataclass
class ProceduralConfig:
    seed: int = 0  # object i is generated from (seed, i): deterministic and independent of worker order
    families: list[str] | None = None  # None: all of procedural.FAMILIES, drawn uniformly
    # "any": every part and the whole object turned uniformly at random, so no object has an up; "upright": turned
    # only about the vertical axis (+Z), standing as Objaverse and GSO assets stand (see procedural.ORIENTATIONS)
    orientation: str = "any"
    min_parts: int = 1
    max_parts: int = 3
    texture_resolution: int = 256
    file_formats: list[str] = field(default_factory=lambda: ["glb", "obj"])  # object i is written as formats[i % n]


@dataclass
class ShardConfig:
    max_samples: int = 32  # samples per shard before a new shard starts
    png_compress_level: int = 1  # zlib level for PNG fields (1 = fast, 9 = small)


@dataclass
class DataConfig:
    # Up axis of the mesh files: "auto" (glTF / GLB +Y up, turned +Z up as Blender's importer does; OBJ, PLY, OFF,
    # STL +Z up as Google Scanned Objects are), or "y" / "z" for every file of the build (geometry/mesh_io.py).
    up_axis: str = "auto"
    normalize_extent: float = 0.9  # longest bounding-box side after normalisation, inside the cube [-0.5, 0.5]^3
    layout: str = "zero123pp-v1.2"
    distance: float | None = None  # None: the framing distance of the layout's FoV (cameras.framing_distance)
    view_resolution: int = 320  # each target view; the tiled grid is 2 * this wide and 3 * this high
    cond_resolution: int = 320
    cond_samples: int = 3  # condition views per object, each with its own six targets
    cond_elevation_min: float = -10.0
    cond_elevation_max: float = 40.0
    seed: int = 0  # per-object randomness (condition poses, lighting) derives from (seed, uid)
    render: RenderConfig = field(default_factory=RenderConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)


@dataclass
class DataBuildConfig:
    """The file ``one2345pp data build --config`` reads (``data:`` at its top, as in a stage's config)."""

    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class LoaderConfig:
    """What a LightningDataModule reads: shard URL patterns (brace-expanded) and how to stream them."""

    train_shards: str = "data/procedural/shard-{000000..000000}.tar"
    val_shards: str | None = None  # None: hold out the last shard of train_shards when there are several
    batch_size: int = 4
    num_workers: int = 2
    shuffle_buffer: int = 64
    resampled: bool = True  # resampled shards + with_epoch: every DDP rank sees the same number of batches
    epoch_samples: int = 256  # samples per rank per epoch when resampled
    seed: int = 0
    background: str = "gray"  # background the RGBA views are composited on ("gray", "white", "random")
    view_resolution: int | None = None  # resize views on load (None = as stored)
    cond_resolution: int | None = None
    # frame each condition view as the product frames its input images (its object's alpha box centred, the box's
    # longer side this share of the view; data.framing) instead of as rendered; a pipeline built from the run frames
    # its inputs at the same share (pipeline.build.condition_fill). None: as rendered.
    cond_fill: float | None = None
