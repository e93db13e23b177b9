"""The run layout: where checkpoints are, and which run a checkpoint file belongs to."""

from pathlib import Path

from one2345pp.utils.run_layout import last_checkpoint, run_of_checkpoint


def test_last_checkpoint_is_in_the_runs_ckpts_folder(tmp_path):
    assert last_checkpoint(tmp_path / "run") == tmp_path / "run" / "ckpts" / "last.ckpt"


def test_run_of_a_checkpoint_in_ckpts_is_the_folder_above(tmp_path):
    assert run_of_checkpoint(tmp_path / "run" / "ckpts" / "step0000100.ckpt") == tmp_path / "run"


def test_run_of_a_loose_checkpoint_is_its_own_folder():
    assert run_of_checkpoint(Path("downloads/model.ckpt")) == Path("downloads")
