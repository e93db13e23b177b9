"""The life every training stage shares, written once: :class:`Stage` (EMA, checkpoints without the frozen parts,
optimizer and schedule, export of a ``from_pretrained`` folder to ``RUN/export`` when training ends) and the config
helpers of the ``train`` / ``export`` commands (:func:`read_stage_config` reads renamed keys under their old names,
with a warning).

A stage subclasses :class:`Stage`, receives its network(s) built by its own builder, and keeps only what is its own:
loss, sampling, validation metrics and its config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ..config import ConfigError, load_config, parse_overrides
from ..models.export_io import PretrainedMixin, checkpoint_path
from ..training.ema import EMAWeights
from ..training.optim import adamw_with_schedule
from ..utils.run_layout import run_of_checkpoint

__all__ = ["EMAConfig", "Stage", "export_dir", "export_from_checkpoint", "read_stage_config", "renamed_keys"]

log = logging.getLogger(__name__)


@dataclass
class EMAConfig:
    """EMA of the trained weights, used for validation and export (``ema.*`` in every stage)."""

    enabled: bool = True
    decay: float = 0.9999  # effective decay min(decay, (1 + n) / (10 + n)) after n updates


# ------------------------------------------------------------------------------------------------------ config keys
def renamed_keys(node: DictConfig, renames: Mapping[str, str], source: str) -> DictConfig:
    """``node`` with every old dotted key of ``renames`` (old -> new) moved to its new name, each with a logged
    warning naming ``source`` and the new key; a file that sets both names is an error."""
    for old, new in renames.items():
        if OmegaConf.select(node, old, default=_MISSING) is _MISSING:
            continue
        if OmegaConf.select(node, new, default=_MISSING) is not _MISSING:
            raise ConfigError(f"{source}: sets both {old} (its old name) and {new}; keep {new}")
        value = OmegaConf.select(node, old)
        parent, _, leaf = old.rpartition(".")
        holder = OmegaConf.select(node, parent) if parent else node
        del holder[leaf]
        OmegaConf.update(node, new, value, force_add=True)
        log.warning("%s: config key %s is now %s; reading it under the new name", source, old, new)
    return node


_MISSING = object()


def _merge(cfg: DictConfig, node: DictConfig, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def read_stage_config(
    schema, config_path: str | os.PathLike | None, overrides: Sequence[str], renames: Mapping[str, str]
) -> DictConfig:
    """:func:`one2345pp.config.load_config` of a stage, with old key names (``renames``: old -> new) in the file and
    the overrides read under their new names, so run folders and sweep files written before a rename keep working."""
    cfg = load_config(schema)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            node = OmegaConf.load(path)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        cfg = _merge(cfg, renamed_keys(node, renames, str(path)), str(path))
    if overrides:
        cfg = _merge(cfg, renamed_keys(parse_overrides(overrides), renames, "overrides"), "override rejected")
    return cfg


# ------------------------------------------------------------------------------------------------------------ stage
class Stage(LightningModule):
    """A LightningModule with the shared life of a stage.

    Subclasses set :attr:`ema` in ``__init__`` with :meth:`track_ema` and may override
    :meth:`ema_module` (what the EMA averages; its parameter names are what the checkpoint's ``ema`` state holds),
    :meth:`unstored_prefixes` (state-dict prefixes checkpoints leave out), :meth:`trainable_parameters` /
    :meth:`optimizer_groups` and :meth:`save_pretrained` (the export folder of the current weights).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.ema: EMAWeights | None = None
        self._val_weights: ExitStack | None = None

    # --------------------------------------------------------------------------------------------------- hooks
    def ema_module(self) -> nn.Module:
        return self.model

    def unstored_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (of this module) that checkpoints leave out: the frozen pretrained encoders."""
        return tuple(f"model.{p}" for p in self.model.frozen_prefixes())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer_groups(self) -> list:
        """Parameters (or parameter groups) of the optimizer."""
        return self.trainable_parameters()

    def total_steps(self) -> int:
        """Optimizer steps of the schedule: ``trainer.max_steps`` of the config (at least 1)."""
        return max(1, int(self.cfg.trainer.max_steps))

    def save_pretrained(self, folder: str | Path) -> Path:
        """The export folder of the current weights (a 3D stage's network writes its own)."""
        return self.model.save_pretrained(folder, step=int(self.global_step))

    # ----------------------------------------------------------------------------------------------------- EMA
    def track_ema(self, ema: EMAConfig) -> None:
        """Start the EMA of the trained parameters of :meth:`ema_module` when ``ema.enabled``."""
        self.ema = EMAWeights(self.ema_module(), ema.decay) if ema.enabled else None

    def ema_weights(self):
        """Context in which the module holds the weights used for validation, sampling and export: the EMA averages
        when EMA is on (swapped in, and back on exit), else the current weights."""
        return self.ema.applied(self.ema_module()) if self.ema is not None else nullcontext(self.ema_module())

    def export_pretrained(self, folder: str | Path) -> Path:
        """Write the export folder (what the stage's ``from_pretrained`` reads) with the EMA weights when EMA is on."""
        with self.ema_weights():
            return self.save_pretrained(folder)

    def on_train_end(self) -> None:
        """The end of training writes ``RUN/export`` (global rank 0). It runs here, inside the training process, so
        that every launcher (Lightning's DDP, torchrun, spawn) exports the weights and EMA state the run ended with."""
        if self.trainer.is_global_zero:
            path = self.export_pretrained(export_dir(self.trainer.default_root_dir))
            log.info("exported the %s stage to %s", self.stage_name, path)

    # ----------------------------------------------------------------------------------------------- lightning
    def configure_optimizers(self):
        return adamw_with_schedule(self.optimizer_groups(), self.cfg.optim, self.total_steps())

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.ema_module())

    def on_validation_epoch_start(self) -> None:  # validate what export writes: the EMA weights
        if self._val_weights is None:
            self._val_weights = ExitStack()
            self._val_weights.enter_context(self.ema_weights())

    def on_validation_epoch_end(self) -> None:
        stack, self._val_weights = self._val_weights, None
        if stack is not None:
            stack.close()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._val_weights is not None:
            raise RuntimeError("checkpoint requested while the EMA weights are swapped in (inside validation)")
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.unstored_prefixes())]:
            del state[key]
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        unstored = self.unstored_prefixes()
        for key, value in self.state_dict().items():  # parts checkpoints leave out: keep the ones built
            if key.startswith(unstored):
                state[key] = value
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise KeyError(
                    f"ema.enabled=true but the checkpoint has no 'ema' state (not written by the {self.stage_name} "
                    "stage, or trained with ema.enabled=false?)"
                )
            self.ema.load_state_dict(checkpoint["ema"])

    @property
    def stage_name(self) -> str:
        return type(self).__name__.removesuffix("Stage").lower()


# ----------------------------------------------------------------------------------------------------------- export
def export_dir(run: str | Path) -> Path:
    """Where a run's export folder lives: ``RUN/export`` (written at the end of training, and by ``export``)."""
    return Path(run) / "export"


def export_from_checkpoint(
    run: str | Path, out: str | Path | None, model_cls: type[PretrainedMixin], config_key: str
) -> Path:
    """A run directory (its ``ckpts/last.ckpt``) or a checkpoint file of a 3D stage -> export folder (EMA weights
    when the checkpoint holds them); ``out`` defaults to ``RUN/export`` (for a checkpoint file: the run directory
    above its ``ckpts/``, else the file's own folder). ``config_key`` is the checkpoint entry with the network's
    config."""
    stage = model_cls.export_stage
    ckpt_path = checkpoint_path(run)
    if out is None:
        out = export_dir(run_of_checkpoint(ckpt_path))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if config_key not in ckpt:
        raise ValueError(f"{ckpt_path} is not a {stage}-stage checkpoint (no {config_key!r})")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    ema = ckpt.get("ema", {"shadow": {}})  # absent when the run trained with ema.enabled=false
    for name, value in ema["shadow"].items():
        if name not in state:
            raise KeyError(f"{ckpt_path}: EMA parameter {name!r} is not in the model state")
        state[name] = value
    return model_cls.write_pretrained(out, ckpt[config_key], state, int(ckpt.get("global_step", 0)))
