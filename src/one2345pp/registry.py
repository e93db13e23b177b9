"""The one list of stages: name -> the class of its export component (what a pipeline folder holds and loads), the
file that marks an export folder, and the module with its LightningModule and ``train`` / ``export`` commands.

Module paths are strings, resolved only when asked (:func:`stage_module`, :func:`component_class`), so inference code
(the pipeline) reads this list without importing Lightning or any training code. The CLI, the pipeline builder, the
demo and the sweeps read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PIPELINE_STAGES",
    "STAGES",
    "StageEntry",
    "component_class",
    "export_marker",
    "has_export",
    "stage_entry",
    "stage_module",
]


@dataclass(frozen=True)
class StageEntry:
    name: str
    module: str  # import path of the stage module: its LightningModule, train(config, overrides), export(run, out)
    component: tuple[str, str]  # (module, class) of the export loader, as a pipeline's model_index.json names it
    marker: str  # the file whose presence makes a folder this stage's export
    # (module, class) pairs older pipeline folders name for the same component (read, never written)
    legacy_components: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, StageEntry] = {
    e.name: e
    for e in (
        StageEntry(
            "multiview",
            "one2345pp.stages.multiview",
            ("one2345pp.models.multiview_pipeline", "MultiViewDiffusionPipeline"),
            "model_index.json",
        ),
        StageEntry(
            "coarse",
            "one2345pp.stages.coarse",
            ("one2345pp.models.coarse", "CoarseModel"),
            "config.json",
            (("one2345pp.stages.coarse", "CoarseModel"),),
        ),
        StageEntry(
            "fine",
            "one2345pp.stages.fine",
            ("one2345pp.models.fine", "FineModel"),
            "config.json",
            (("one2345pp.stages.fine", "FineModel"),),
        ),
        StageEntry(
            "texture",
            "one2345pp.stages.texture",
            ("one2345pp.texture.settings", "TextureSettings"),
            "config.json",
            (("one2345pp.stages.texture", "TextureSettings"),),
        ),
    )
}

# stages whose trained runs `one2345pp export --multiview RUN --coarse RUN --fine RUN` chains (texture is settings)
PIPELINE_STAGES = ("multiview", "coarse", "fine")


def stage_entry(name: str) -> StageEntry:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]


def stage_module(name: str):
    """The stage's training module (imports Lightning: for commands, not for inference)."""
    return importlib.import_module(stage_entry(name).module)


def component_class(name: str) -> type:
    """The class that loads the stage's export folder (``from_pretrained``; for texture, its settings)."""
    module, cls = stage_entry(name).component
    return getattr(importlib.import_module(module), cls)


def export_marker(name: str) -> str:
    return stage_entry(name).marker


def has_export(name: str, folder: str | Path) -> bool:
    """Whether ``folder`` holds an export of stage ``name`` (its marker file is there)."""
    return (Path(folder) / export_marker(name)).is_file()
