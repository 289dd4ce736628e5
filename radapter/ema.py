"""The temporal ensemble: an exponential moving average of adapter weights only."""

from __future__ import annotations

from torch import nn

from .inject import iter_adapters, require_state


def ema_momentum(momentum: float, updates: int, warmup: bool) -> float:
    """Momentum for the next update; with warm-up, ``min(m, (1 + t) / (10 + t))``."""
    return min(momentum, (1 + updates) / (10 + updates)) if warmup else momentum


def update_ema(model: nn.Module) -> None:
    """Call after every optimiser step: ``A_ema <- m * A_ema + (1 - m) * A`` per adapter."""
    config = require_state(model).config
    if config.ema_momentum is None:
        return
    for _, _, adapter in iter_adapters(model):
        adapter.update_ema(ema_momentum(config.ema_momentum, int(adapter.ema_updates), config.ema_warmup))
