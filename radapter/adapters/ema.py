"""The temporal ensemble: an exponential moving average of adapter weights only.

As timm's ``ModelEmaV3``: one step counter for the whole set and one fused
``torch._foreach_lerp_`` over every adapter tensor per step, so a step costs no host sync.
Each adapter keeps the counter as an ``ema_updates`` buffer too (it travels in state dicts
and training checkpoints); it is read back only when a load has replaced it.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import lerp_all
from .inject import AdapterSet, require_state


def ema_momentum(momentum: float, updates: int, warmup: bool) -> float:
    """Momentum for the next update; with warm-up, ``min(m, (1 + t) / (10 + t))``."""
    return min(momentum, (1 + updates) / (10 + updates)) if warmup else momentum


def _updates(aset: AdapterSet, counter: torch.Tensor) -> int:
    if aset.ema_updates is None or aset.ema_version != counter._version:
        aset.ema_updates = int(counter)  # after a load_state_dict only
    return aset.ema_updates


@torch.no_grad()
def update_ema(model: nn.Module) -> None:
    """Call after every optimiser step: ``A_ema <- m * A_ema + (1 - m) * A`` for the active set."""
    aset = require_state(model).active_set
    config = aset.config
    if config.ema_momentum is None:
        return
    adapters = [a for _, a in aset.adapters()]
    counters = [a.ema_updates for a in adapters]
    step = _updates(aset, counters[0])
    m = ema_momentum(config.ema_momentum, step, config.ema_warmup)
    lerp_all([p for a in adapters for p in a.ema_pairs()], 1.0 - m)
    torch._foreach_add_(counters, 1)
    aset.ema_updates, aset.ema_version = step + 1, counters[0]._version
