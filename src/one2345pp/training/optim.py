"""Optimiser settings shared by the stages: AdamW with linear warm-up, then a constant or cosine learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..config import ConfigError

SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000  # linear warm-up from 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (to min_lr_ratio * lr at trainer.max_steps)
    min_lr_ratio: float = 0.1


def check_optim(cfg: OptimConfig, prefix: str = "optim") -> None:
    """Errors name the key: ``optim.lr``, ``optim.schedule``, ..."""
    if cfg.lr <= 0:
        raise ConfigError(f"{prefix}.lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"{prefix}.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"{prefix}.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"{prefix}.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {list(cfg.betas)}")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


def adamw_with_schedule(param_groups: Iterable, cfg: OptimConfig, max_steps: int) -> dict:
    """What ``configure_optimizers`` returns: AdamW over ``param_groups`` (parameters or dicts with their own
    ``weight_decay``) and the per-step schedule."""
    check_optim(cfg)
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
