"""The local sweep agent: sampling, macro expansion, and a real trial run."""

import sys
from pathlib import Path

import pytest
import yaml

from one2345pp import registry
from one2345pp.cli import main
from one2345pp.config import ConfigError
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


# --------------------------------------------------------------------------------------- the shipped sweep files
ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").rglob("*.yaml"))
STAGES = tuple(registry.STAGES)


def stage_of(spec: dict) -> tuple[str, Path]:
    """The ``--stage`` and ``--config`` of a sweep's train command."""
    cmd = [str(t) for t in spec["command"]]
    assert cmd[cmd.index("one2345pp") + 1] == "train", cmd
    return cmd[cmd.index("--stage") + 1], ROOT / cmd[cmd.index("--config") + 1]


def load_stage_config(stage: str, config: Path, overrides: list[str]):
    """The stage's own loader and checks, as ``one2345pp train`` applies them (unknown keys are errors)."""
    from one2345pp.config import to_object
    from one2345pp.registry import stage_module

    return to_object(stage_module(stage).load_stage_config(config, overrides))


def train_overrides(spec: dict, values: dict) -> list[str]:
    """The ``key=value`` arguments the trial's command passes (fixed ones and the sampled ``values``)."""
    argv = command_for(spec, values)
    return [a for a in argv[argv.index("--config") + 2 :] if "=" in a]


def logged_metrics(stage: str) -> set[str]:
    """The names the stage's LightningModule passes to ``self.log`` (f-strings over the train/val split expanded)."""
    import re

    source = (ROOT / "src" / "one2345pp" / "stages" / f"{stage}.py").read_text()
    names = set()
    for name in re.findall(r'self\.log\(\s*f?"([^"]+)"', source):
        names |= {name.replace("{split}", split) for split in ("train", "val")}
    return names


def test_every_stage_has_a_full_and_a_tiny_sweep():
    found = {(p.parent.name == "tiny", stage_of(load_sweep(p))[0]) for p in SWEEPS}
    assert found == {(tiny, s) for tiny in (False, True) for s in STAGES}
    for path in SWEEPS:
        stage, config = stage_of(load_sweep(path))
        expected = ROOT / "experiments" / ("tiny" if path.parent.name == "tiny" else "") / f"{stage}.yaml"
        assert config == expected, path


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT / "experiments" / "sweeps")))
def test_sweep_parameters_are_keys_of_the_stage_config_and_the_metric_is_logged(path):
    spec = load_sweep(path)
    stage, config = stage_of(spec)
    assert spec.get("method") in ("grid", "random")  # runs with W&B's agent and the local one alike
    assert spec["metric"]["goal"] in ("minimize", "maximize")
    assert spec["metric"]["name"] in logged_metrics(stage), (spec["metric"], sorted(logged_metrics(stage)))
    # every value a parameter can take (each listed value, the bounds of a range), applied as the trial applies it
    cases = []
    for key, param in spec["parameters"].items():
        options = param.get(
            "values", [param.get("value")] if "value" in param else [param.get("min"), param.get("max")]
        )
        cases += [{key: v} for v in options]
    for values in cases:
        conf = load_stage_config(stage, config, train_overrides(spec, values))
        ((key, value),) = values.items()
        node = conf
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, (key, node, value)
    # the check catches a typo: an unknown key is rejected by the same loader
    with pytest.raises(ConfigError):
        load_stage_config(stage, config, train_overrides(spec, {"optim.learning_rate": 1e-3}))
    fixed = load_stage_config(stage, config, train_overrides(spec, {}))
    assert fixed.run.logger == "wandb" and fixed.run.name is None


@pytest.mark.slow
def test_a_tiny_sweep_trial_runs_offline_end_to_end(tmp_path):
    """`one2345pp sweep experiments/sweeps/tiny/texture.yaml --trials 1` as a subprocess, pointed at small shards:
    the trial trains with the sampled values and leaves an offline W&B run that holds the sweep's metric."""
    import json
    import os
    import subprocess

    from omegaconf import OmegaConf

    from one2345pp.data.config import DataConfig, ProceduralConfig, RenderConfig, ShardConfig, VolumeConfig
    from one2345pp.data.shards import build_shards
    from test_media import wandb_history

    shards = tmp_path / "shards"
    data = DataConfig(
        view_resolution=48,
        cond_resolution=48,
        cond_samples=2,
        render=RenderConfig(supersample=1),
        volume=VolumeConfig(coarse_resolution=16),
        procedural=ProceduralConfig(seed=3, texture_resolution=32, families=["sphere", "box", "cylinder"]),
        shards=ShardConfig(max_samples=2),
    )
    build_shards("procedural", shards, data, num_objects=3, progress=False)
    spec = load_sweep(ROOT / "experiments" / "sweeps" / "tiny" / "texture.yaml")
    local = [f"data.train_shards={shards}", f"run.root={tmp_path / 'runs'}", "data.view_resolution=48"]
    local += ["data.cond_resolution=48", "refine.iterations=40"]  # small shards, fewer steps than sampled
    spec["command"] = [*spec["command"], *local]
    path = tmp_path / "texture.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", NETRC=str(tmp_path / "no-netrc"))
    proc = subprocess.run(
        [sys.executable, "-m", "one2345pp.cli", "sweep", str(path), "--trials", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 trials succeeded, 0 failed" in proc.stdout
    (run,) = (tmp_path / "runs" / "texture").iterdir()
    saved = OmegaConf.load(run / "config.yaml")
    (sampled,) = trials(load_sweep(path), 1, seed=0)  # what the agent drew (its default seed)
    for key, value in sampled.items():
        if key != "refine.iterations":
            assert OmegaConf.select(saved, key) == pytest.approx(value), key
    assert saved.run.logger == "wandb" and saved.run.name == run.name
    (run_file,) = run.glob("logs/wandb/offline-run-*/run-*.wandb")
    metric = spec["metric"]["name"]
    (row,) = [row for row in wandb_history(run_file) if metric in row]
    value = json.loads(row[metric])
    assert 5.0 < value < 60.0, row  # a PSNR in dB
    assert json.loads((run / "metrics.json").read_text())["val"]["psnr_mean"] == pytest.approx(value)


def test_failed_trials_are_reported_and_the_sweep_goes_on(tmp_path, capsys):
    script = tmp_path / "trial.py"
    script.write_text("import sys\nsys.exit(3 if 'a=1' in sys.argv else 0)\n")
    spec = {
        "method": "grid",
        "program": str(script),
        "command": ["${interpreter}", "${program}", "${args_no_hyphens}"],
        "parameters": {"a": {"values": [1, 2]}},
    }
    assert main(["sweep", str(_write(tmp_path, spec)), "--trials", "2"]) == 1
    out = capsys.readouterr().out
    assert "trial 1/2] failed with exit code 3 (a=1)" in out and "trial 2/2] failed" not in out
    assert "1 trials succeeded, 1 failed" in out
    spec["command"] = [str(tmp_path / "no-such-program"), "${args_no_hyphens}"]
    assert main(["sweep", str(_write(tmp_path, spec)), "--trials", "1"]) == 1
    assert "cannot start" in capsys.readouterr().out
