"""Config loading: a typed dataclass schema, an optional YAML file, then ``key=value`` overrides (omegaconf).

Every command goes through :func:`load_config` and writes the resolved result beside its outputs with
:func:`save_config`, so a run can be reproduced (and a later stage can read the previous stage's settings).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .utils.atomic import write_text


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names it."""


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc


def load_config(schema, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """``schema`` (a dataclass type or instance) <- YAML file <- overrides; unknown keys and bad types are errors."""
    cfg = OmegaConf.structured(schema)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, parse_overrides(overrides))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override rejected: {exc}") from exc
    return cfg


def to_object(cfg: DictConfig):
    """The dataclass instance behind a structured config (typed attribute access, no omegaconf nodes)."""
    return OmegaConf.to_object(cfg)


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    text = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg), resolve=True)
    return write_text(path, text)


def config_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (for refusing to mix settings in one output)."""
    da = OmegaConf.to_container(a, resolve=True) if isinstance(a, DictConfig) else a
    db = OmegaConf.to_container(b, resolve=True) if isinstance(b, DictConfig) else b
    if isinstance(da, dict) and isinstance(db, dict):
        out = []
        for key in sorted(set(da) | set(db)):
            out += config_diff(da.get(key), db.get(key), f"{prefix}{key}.")
        return out
    return [] if da == db else [prefix.rstrip(".")]


def check_or_save_config(
    path: str | os.PathLike,
    cfg,
    *,
    what: str,
    remedy: str,
    ignore: Sequence[str] = (),
    read: Callable[[Path], object] = OmegaConf.load,
    keep: bool = False,
) -> Path:
    """Refuse to mix settings in one output folder: when ``path`` holds a config (``read`` from the file) that
    differs from ``cfg`` in keys other than ``ignore`` (settings that do not change the outputs), raise a
    :class:`ConfigError` naming the file, ``what`` it records, the differing keys and the ``remedy``. Otherwise
    write ``cfg`` to ``path`` (:func:`save_config`); with ``keep`` a file already there is left as it is, so it
    records the run that made the folder rather than the latest one."""
    path = Path(path)
    if path.is_file():
        try:
            held = read(path)
        except Exception as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); {remedy}") from exc
        diff = [k for k in config_diff(held, cfg) if k not in ignore]
        if diff:
            raise ConfigError(
                f"{path.parent} holds {what} made with other settings ({', '.join(diff)} differ, see {path}); {remedy}"
            )
        if keep:
            return path
    return save_config(cfg, path)
