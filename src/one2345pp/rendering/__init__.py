"""Rendering: the backend-neutral interface and its config (:mod:`.base`) and the CPU ray-cast renderer
(:mod:`.raycast`)."""

from .base import BACKGROUNDS, Light, RenderConfig, Renderer, RenderOutput, background_color, light_from_config
from .raycast import RaycastRenderer

__all__ = [
    "BACKGROUNDS",
    "Light",
    "RaycastRenderer",
    "RenderConfig",
    "RenderOutput",
    "Renderer",
    "background_color",
    "light_from_config",
]
