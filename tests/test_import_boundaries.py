"""Layer boundaries that inference relies on: the pipeline loads exports without Lightning or training code, and
pipeline folders written before the networks moved to ``one2345pp.models`` still load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from one2345pp import registry


def test_pipeline_imports_no_training_code():
    code = (
        "import sys, one2345pp.pipeline, one2345pp.pipeline.one2345, one2345pp.pipeline.build, one2345pp.models.recon\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')"
        " or m.startswith('one2345pp.stages'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_registry_lists_every_stage_once():
    from one2345pp import cli
    from one2345pp.demo.config import STAGE_NAMES
    from one2345pp.pipeline.build import STAGE_NAMES as PIPELINE_NAMES
    from one2345pp.pipeline.one2345 import COMPONENTS

    assert list(cli.STAGES) == list(registry.STAGES) == list(STAGE_NAMES) == list(COMPONENTS)
    assert set(PIPELINE_NAMES) <= set(registry.STAGES)
    for name in registry.STAGES:
        module = registry.stage_module(name)
        assert callable(module.train) and callable(module.export) and callable(module.load_stage_config)
        assert registry.component_class(name).__name__ == registry.STAGES[name].component[1]
    with pytest.raises(KeyError, match="known stages"):
        registry.stage_entry("nope")


def test_old_class_paths_still_resolve():
    """Code and pipeline indexes that name the 3D networks by their old module keep working."""
    from one2345pp.models.coarse import CoarseModel
    from one2345pp.models.fine import FineModel
    from one2345pp.stages.coarse import CoarseModel as OldCoarse
    from one2345pp.stages.fine import FineModel as OldFine

    assert OldCoarse is CoarseModel and OldFine is FineModel
    for entry in registry.STAGES.values():
        for module, cls in entry.legacy_components:
            __import__(module)
            assert getattr(sys.modules[module], cls) is registry.component_class(entry.name)


def test_pipeline_folder_with_old_component_paths_loads(tmp_path, tiny_pipeline_dir):
    """A pipeline folder whose model_index.json names ``one2345pp.stages.*`` (written before the move) loads."""
    import shutil

    from one2345pp.pipeline.one2345 import One2345PPPipeline

    folder = tmp_path / "old"
    shutil.copytree(tiny_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["coarse"] = ["one2345pp.stages.coarse", "CoarseModel"]
    index["fine"] = ["one2345pp.stages.fine", "FineModel"]
    index["texture"] = ["one2345pp.stages.texture", "TextureSettings"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = One2345PPPipeline.from_pretrained(folder)
    assert type(pipe.coarse).__module__ == "one2345pp.models.coarse"
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index["fine"] = ["os", "system"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="component 'fine'"):
        One2345PPPipeline.from_pretrained(bad)


def test_old_config_keys_are_read_with_a_warning(tmp_path, caplog):
    from one2345pp.config import to_object
    from one2345pp.stages.base import read_stage_config
    from one2345pp.stages.coarse import RENAMED_KEYS, CoarseConfig

    old = tmp_path / "old.yaml"
    old.write_text("train:\n  ema_decay: 0.5\n  val_sample_steps: 7\n  val_seed: 3\n")
    with caplog.at_level(logging.WARNING, logger="one2345pp.stages.base"):
        cfg = to_object(read_stage_config(CoarseConfig, old, ["train.val_sample_batches=2"], RENAMED_KEYS))
    assert (cfg.ema.decay, cfg.val.sample_steps, cfg.val.seed, cfg.val.sample_batches) == (0.5, 7, 3, 2)
    text = caplog.text
    for new in ("ema.decay", "val.sample_steps", "val.seed", "val.sample_batches"):
        assert new in text
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  ema_decay: 0.5\nema:\n  decay: 0.6\n")
    with pytest.raises(ValueError, match="ema.decay"):
        read_stage_config(CoarseConfig, both, [], RENAMED_KEYS)
