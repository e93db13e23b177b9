"""The local sweep agent: sampling, macro expansion, and a real trial run."""

import sys

import pytest
import yaml

from one2345pp.cli import main
from one2345pp.training.sweep import SweepError, command_for, load_sweep, trials


def _write(tmp_path, spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_random_samples_respect_ranges_and_are_seeded(tmp_path):
    spec = {
        "method": "random",
        "command": ["one2345pp", "train", "${args_no_hyphens}"],
        "parameters": {
            "optim.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
            "train.steps": {"min": 2, "max": 5},
            "model.width": {"values": [8, 16]},
            "data.cond_samples": {"value": 1},
        },
    }
    a, b = trials(spec, 20, seed=1), trials(spec, 20, seed=1)
    assert a == b
    assert all(1e-5 <= t["optim.lr"] <= 1e-3 and 2 <= t["train.steps"] <= 5 for t in a)
    assert {t["model.width"] for t in a} == {8, 16} and {t["data.cond_samples"] for t in a} == {1}


def test_grid_and_macros(tmp_path):
    spec = {"method": "grid", "command": ["${env}", "${interpreter}", "${program}", "${args}"], "program": "x.py"}
    spec["parameters"] = {"a": {"values": [1, 2]}, "b": {"values": [True, None]}}
    grid = trials(spec, 10)
    assert grid == [{"a": 1, "b": True}, {"a": 1, "b": None}, {"a": 2, "b": True}, {"a": 2, "b": None}]
    assert command_for(spec, grid[0]) == [sys.executable, "x.py", "--a=1", "--b=true"]


def test_bad_sweeps_are_clear(tmp_path):
    with pytest.raises(SweepError, match="bayes needs W&B's server"):
        trials({"method": "bayes", "parameters": {"a": {"values": [1]}}}, 1)
    with pytest.raises(SweepError, match="parameter 'a' needs"):
        load_sweep(_write(tmp_path, {"command": ["x"], "parameters": {"a": {"distribution": "uniform"}}}))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_sweep(tmp_path / "nope.yaml")


def test_cli_runs_a_trial_with_the_sampled_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "trial.txt"
    script = tmp_path / "trial.py"
    script.write_text(
        f"import os, sys\nopen({str(out)!r}, 'w').write(' '.join(sys.argv[1:]) + ' ' + os.environ['WANDB_MODE'])\n"
    )
    spec = {
        "method": "random",
        "program": str(script),
        "command": ["${interpreter}", "${program}", "${args_no_hyphens}"],
        "parameters": {"optim.lr": {"values": [0.001]}, "run.name": {"value": "t"}},
    }
    assert main(["sweep", str(_write(tmp_path, spec)), "--trials", "1"]) == 0
    assert out.read_text() == "optim.lr=0.001 run.name=t offline"
    assert "1 trials succeeded, 0 failed" in capsys.readouterr().out
