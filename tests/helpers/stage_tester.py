"""The round trip every training stage's test makes, written once: a tiny run (fit), its resume, the export folder that
the end of training writes and the one ``export`` writes from a checkpoint, each loaded by the stage's export class
alone (``from_pretrained`` of a copy of the folder, without the run's config or checkpoint).

Every run is checked the same way: it stopped at the asked step (the trainer, ``last.ckpt`` and the EMA updates),
its run folder holds ``config.yaml``, ``ckpts/last.ckpt`` and ``logs/metrics.csv``, and its ``export/`` folder is
the stage's export (the registry's marker). A resume must start from the step, optimizer state and EMA state the
previous run saved, and an export must hold exactly the EMA weights of the run that wrote it.

The stage's own checks (its metrics, samples, files) stay in its test, on the :class:`TrainedRun` and the loaded
export these functions hand back.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import nn

from one2345pp import registry

__all__ = ["ResumeProbe", "StageTester", "TrainedRun", "exported_tensors", "tiny_run_overrides"]

# what a tiny CPU run of any stage sets in the tests: no loader workers, a small shuffle buffer, one validation batch
TINY_RUN = {
    "data.num_workers": 0,
    "data.shuffle_buffer": 2,
    "trainer.limit_val_batches": 1,
    "trainer.enable_progress_bar": False,
    "run.name": "t",
}

# what the coarse and fine tests' tiny runs share: small CNN image features, one training step of two objects on
# the CPU, a short EMA
TINY_3D = {
    "model.condition.image_features.kind": "cnn",
    "model.condition.image_features.cnn_channels": "[8,8]",
    "model.condition.mlp_hidden": 8,
    "model.condition.feature_channels": 8,
    "model.global_embedding.kind": "cnn",
    "model.global_embedding.cnn_channels": "[8,8]",
    "model.global_embedding.cnn_dim": 8,
    "optim.warmup_steps": 0,
    "optim.lr": 1e-3,
    "ema.decay": 0.9,
    "data.batch_size": 2,
    "data.epoch_samples": 2,
    "trainer.max_steps": 1,
    "trainer.accelerator": "cpu",
    "trainer.devices": "1",
    "trainer.log_every_n_steps": 1,
}


def tiny_run_overrides(root: str | Path, values: Mapping[str, object]) -> list[str]:
    """``key=value`` overrides of a tiny run under ``run.root=root``: :data:`TINY_RUN`, then the stage's ``values``
    (which win)."""
    merged = {**TINY_RUN, "run.root": root, **values}
    return [f"{k}={v}" for k, v in merged.items()]


@dataclass
class TrainedRun:
    """One finished ``run_training`` call of a stage: its trainer, run folder and ``last.ckpt``."""

    trainer: object
    directory: Path
    ckpt: dict
    exported: object = field(default=None, repr=False)  # RUN/export loaded alone (after a resume)

    @property
    def module(self):
        return self.trainer.lightning_module

    def metric(self, name: str) -> list[float]:
        """Every value of ``name`` in the run's ``logs/metrics.csv``."""
        with open(self.directory / "logs" / "metrics.csv", newline="") as f:
            return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


class ResumeProbe(Callback):
    """What the trainer holds when training (re)starts: step, optimizer state, EMA state."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.optimizer = {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in trainer.optimizers[0].state_dict()["state"].items()
        }
        self.ema = {k: v.clone() for k, v in pl_module.ema.shadow.items()} if pl_module.ema is not None else None
        self.ema_updates = pl_module.ema.num_updates if pl_module.ema is not None else None


def exported_tensors(component) -> dict[str, torch.Tensor]:
    """The tensors of a loaded export under the names the stage's EMA module gives them: a network's state dict, or
    for a diffusers pipeline its modules' state dicts under their component names (``unet.``, ``conditioner.``...)."""
    if isinstance(component, nn.Module):
        return dict(component.state_dict())
    parts = {name: part for name, part in component.components.items() if isinstance(part, nn.Module)}
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()}


class StageTester:
    """The fit -> resume -> export -> from_pretrained round trip of stage ``stage`` (a name of the registry), run
    through its module's ``load_stage_config`` / ``run_training`` / ``export`` as ``one2345pp train`` runs them."""

    def __init__(self, stage: str, overrides: Sequence[str], config: str | Path | None = None):
        self.stage = stage
        self.commands = registry.stage_module(stage)
        self.config_path = config
        self.overrides = list(overrides)

    def config(self, *extra: str):
        return self.commands.load_stage_config(self.config_path, [*self.overrides, *extra])

    # ---------------------------------------------------------------------------------------------------- runs
    def _run(self, steps: int, extra: Sequence[str], callbacks=()) -> TrainedRun:
        trainer, directory = self.commands.run_training(self.config(f"trainer.max_steps={steps}", *extra), callbacks)
        for rel in ("config.yaml", "ckpts/last.ckpt", "logs/metrics.csv"):
            assert (directory / rel).is_file(), rel
        assert registry.has_export(self.stage, directory / "export")  # written when training ended
        ckpt = torch.load(directory / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)
        assert trainer.global_step == steps and ckpt["global_step"] == steps
        ema = trainer.lightning_module.ema
        if ema is not None:  # one EMA update per optimizer step, and the checkpoint holds the run's last EMA state
            assert ema.num_updates == int(ckpt["ema"]["num_updates"]) == steps
            assert set(ema.shadow) == set(ckpt["ema"]["shadow"])
            assert all(torch.equal(v, ckpt["ema"]["shadow"][k]) for k, v in ema.shadow.items())
        return TrainedRun(trainer, directory, ckpt)

    def fit(self, steps: int, *extra: str) -> TrainedRun:
        """A fresh run of ``steps`` optimizer steps."""
        return self._run(steps, extra)

    def resume(self, previous: TrainedRun, steps: int, *extra: str) -> TrainedRun:
        """Resume ``previous`` (``run.resume=last``) up to ``steps``: it must start where ``previous`` saved (step,
        optimizer and EMA state), and its ``RUN/export`` must hold its EMA weights (``TrainedRun.exported``)."""
        probe = ResumeProbe()
        run = self._run(steps, ["run.resume=last", *extra], [probe])
        assert run.directory == previous.directory
        assert probe.step == previous.ckpt["global_step"]
        saved = previous.ckpt["optimizer_states"][0]["state"]
        assert saved and set(probe.optimizer) == set(saved)
        for k, s in saved.items():
            for name, value in s.items():
                assert torch.equal(torch.as_tensor(probe.optimizer[k][name]), torch.as_tensor(value)), (k, name)
        if probe.ema is not None:
            assert probe.ema_updates == int(previous.ckpt["ema"]["num_updates"])
            assert set(probe.ema) == set(previous.ckpt["ema"]["shadow"])
            assert all(torch.equal(v, previous.ckpt["ema"]["shadow"][k]) for k, v in probe.ema.items())
        run.exported = self.load_alone(run.directory / "export", run)
        return run

    # -------------------------------------------------------------------------------------------------- export
    def export(self, run: TrainedRun, out: str | Path | None = None):
        """``export`` of ``run`` (its run folder, ``out`` default ``RUN/export``) -> the folder loaded alone, checked
        to hold the run's EMA weights; returns ``(folder, loaded)``."""
        folder = self.commands.export(run.directory, out)
        assert folder == (Path(out) if out is not None else run.directory / "export")
        return folder, self.load_alone(folder, run)

    def load_alone(self, folder: Path, run: TrainedRun):
        """A copy of ``folder`` (away from the run's config and checkpoint) loaded by the stage's export class; its
        tensors must be the run module's weights with the EMA averages swapped in: every EMA-tracked tensor, and no
        other tensor than the module's."""
        alone = folder.parent / f"{folder.name}-alone"
        shutil.rmtree(alone, ignore_errors=True)
        shutil.copytree(folder, alone)
        loaded = registry.component_class(self.stage).from_pretrained(str(alone))
        if hasattr(loaded, "set_progress_bar_config"):
            loaded.set_progress_bar_config(disable=True)
        module = run.module
        with module.ema_weights() as weights:
            # the swapped-in tensors are restored in place on exit: compare inside the block
            live = weights.state_dict()
            exported = exported_tensors(loaded)
            assert set(exported) <= set(live), sorted(set(exported) - set(live))[:5]
            for key, value in exported.items():
                assert torch.equal(value, live[key].to(value.dtype)), key
            if module.ema is not None:
                assert set(module.ema.shadow) <= set(exported), sorted(set(module.ema.shadow) - set(exported))[:5]
        return loaded
