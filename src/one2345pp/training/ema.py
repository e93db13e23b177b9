"""Exponential moving average of a module's trainable parameters (checkpoint-safe: tensors only)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMAWeights:
    """Exponential moving average of a module's trainable parameters, held as a plain dict of tensors.

    ``update`` after every optimizer step with decay ``min(decay, (1 + n) / (10 + n))``; ``applied(module)`` swaps
    the averages in for a ``with`` block; ``state_dict`` / ``load_state_dict`` are tensors only (checkpoint-safe).
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.num_updates = 0

    def _params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(module.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the module lacks: {missing[:5]}")
        return params

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = self._params(module)
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for n, s in self.shadow.items():
            p = params[n].detach()
            if s.device != p.device or s.dtype != p.dtype:
                s = self.shadow[n] = s.to(device=p.device, dtype=p.dtype)
            s.lerp_(p, 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def applied(self, module: nn.Module):
        params = self._params(module)
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, s in self.shadow.items():
                params[n].copy_(s)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, b in backup.items():
                    params[n].copy_(b)

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "num_updates": torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra, lack = sorted(set(shadow) - set(self.shadow)), sorted(set(self.shadow) - set(shadow))
            raise KeyError(f"EMA state does not match the model: unexpected {extra[:5]}, missing {lack[:5]}")
        self.shadow = {n: t.clone() for n, t in shadow.items()}
        self.num_updates = int(state["num_updates"])
