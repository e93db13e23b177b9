"""Shared fixtures and markers; the helpers they build on live in ``tests/helpers/``.

``tiny_pipeline_dir``: a saved tiny pipeline folder (:mod:`helpers.tiny_pipeline`) for tests of the pipeline,
``one2345pp infer`` and ``one2345pp eval --dataset``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_pipeline import (  # the names test modules imported from here before tests/helpers/ existed
    SPHERE_RADIUS,
    tiny_coarse_config,
    tiny_fine_config,
    tiny_multiview,
    tiny_pipeline,
    tiny_texture_settings,
)

__all__ = ["SPHERE_RADIUS", "tiny_coarse_config", "tiny_fine_config", "tiny_multiview", "tiny_texture_settings"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline folder (``model_index.json`` + component folders); treat it as read-only."""
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("tiny_pipeline") / "pipeline")
