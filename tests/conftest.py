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


# Slow tests (5 s to minutes each, measured with --durations on the shared 2-core machine: trainings, DDP process
# pairs, the demo run, module fixtures that build and run a pipeline folder) of the stage, pipeline and demo test
# files, by file and test name; the other slow tests carry @pytest.mark.slow. `make test-fast` (-m "not slow")
# leaves them out, `make test` runs them all. A renamed test falls out of this table and back into the fast set.
SLOW_TESTS = {
    "test_coarse.py": {"test_fit_resume_export_and_from_pretrained", "test_train_builds_the_module_from_run_seed"},
    "test_fine.py": {"test_fit_resume_export_sample_and_from_pretrained"},
    "test_multiview.py": {
        "test_resume_restores_step_optimizer_and_ema_and_export_matches",
        "test_vae_fit_learns_to_reconstruct_and_travels_with_checkpoints",
        "test_a_few_dozen_steps_on_one_batch_lower_the_loss",
    },
    "test_ddp.py": {
        "test_two_process_ddp_run_shares_one_run_directory",
        "test_forked_or_spawned_workers_get_per_rank_seeds",
    },
    "test_sweep.py": {"test_a_tiny_sweep_trial_runs_offline_end_to_end"},
    "test_pipeline.py": {
        "test_to_moves_the_multiview_stage_to_a_dtype",
        "test_export_from_runs_reproduces_the_pipeline",
        "test_swapping_components_by_keyword",
        "test_same_seed_same_output_other_seed_other_views",
        "test_save_pretrained_round_trip",
    },
    "test_demo.py": {  # every test of the module fixture that runs the demo (about 2 minutes)
        "test_demo_writes_the_pipeline_meshes_metrics_and_an_index_of_existing_files",
        "test_rerun_skips_finished_steps",
        "test_other_settings_in_the_same_folder_are_refused",
        "test_a_shipped_multiview_run_stands_in_for_its_training",
    },
    "test_infer.py": {  # every test of the module fixture that runs infer on a pipeline folder
        "test_infer_writes_the_four_outputs_per_image",
        "test_rerun_skips_finished_images_and_overwrite_redoes_them",
        "test_a_failing_image_is_recorded_and_the_others_go_on",
        "test_infer_refuses_bad_jobs_before_running",
    },
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.originalname in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline folder (``model_index.json`` + component folders); treat it as read-only."""
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("tiny_pipeline") / "pipeline")
