"""Config loading: a typed dataclass schema, an optional YAML file, then ``key=value`` overrides (omegaconf).

Every command goes through :func:`load_config` and writes the resolved result beside its outputs with
:func:`save_config`, so a run can be reproduced (and a later stage can read the previous stage's settings).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg), resolve=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


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
