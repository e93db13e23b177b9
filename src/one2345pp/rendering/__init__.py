"""Rendering: the backend-neutral interface (:mod:`.base`) and the CPU ray-cast renderer (:mod:`.raycast`)."""

from .base import BACKGROUNDS, Light, Renderer, RenderOutput, background_color, light_from_config
from .raycast import RaycastRenderer

__all__ = [
    "BACKGROUNDS",
    "Light",
    "RaycastRenderer",
    "RenderOutput",
    "Renderer",
    "background_color",
    "light_from_config",
]
