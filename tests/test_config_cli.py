from pathlib import Path

import pytest

from one2345pp.cli import main
from one2345pp.config import ConfigError, config_diff, load_config, save_config, to_object
from one2345pp.data.config import DataBuildConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("data.yaml")))
def test_shipped_data_configs_match_the_schema(path):
    cfg = to_object(load_config(DataBuildConfig, path))
    assert cfg.data.cond_samples >= 1


def test_file_then_overrides_then_saved(tmp_path):
    cfg = load_config(DataBuildConfig, ROOT / "experiments/tiny/data.yaml", ["data.volume.coarse_resolution=16"])
    assert cfg.data.view_resolution == 64 and cfg.data.volume.coarse_resolution == 16
    assert cfg.data.layout == "zero123pp-v1.2"  # untouched defaults stay
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(DataBuildConfig, saved)
    assert config_diff(again, cfg) == []
    assert set(config_diff(load_config(DataBuildConfig), cfg)) == {
        "data.cond_samples",
        "data.cond_resolution",
        "data.distance",
        "data.procedural.orientation",
        "data.procedural.texture_resolution",
        "data.render.supersample",
        "data.view_resolution",
        "data.volume.coarse_resolution",
    }


def test_bad_overrides_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DataBuildConfig, None, ["data.cond_samples"])
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(DataBuildConfig, None, ["data.no_such_key=1"])
    with pytest.raises(ConfigError, match="cond_samples"):
        load_config(DataBuildConfig, None, ["data.cond_samples=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(DataBuildConfig, tmp_path / "missing.yaml")


def test_cli_reports_unknown_stage_and_source(capsys, tmp_path):
    assert main(["train", "--stage", "voxels"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'voxels'" in err
    assert "coarse, fine, multiview, texture" in err
    with pytest.raises(SystemExit):
        main(["data", "build", "--source", "nowhere", "--out", "x"])
    out = tmp_path / "out"
    assert main(["data", "build", "--source", "folder", "--out", str(out), "--input", "/does/not/exist"]) == 2
    assert "mesh folder not found: /does/not/exist" in capsys.readouterr().err
    assert not out.exists()  # nothing is created for a job that cannot start


def test_slurm_array_rank_for_any_start_and_step(monkeypatch):
    from one2345pp.cli import slurm_array_rank

    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert slurm_array_rank() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "32")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    ranks = []
    for task in range(1, 64, 2):  # --array=1-63:2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        ranks.append(slurm_array_rank())
    assert ranks == [(r, 32) for r in range(32)]
