"""A fingerprint of a model's base weights, so adapters never land on the wrong model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

ADAPTER_KEY = ".radapter."


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter tensors (as stored, merged or not)."""
    return {k: v for k, v in model.state_dict().items() if ADAPTER_KEY not in f".{k}"}


def compute_fingerprint(model: nn.Module) -> str:
    """Fingerprint of an unmerged model's non-adapter weights."""
    return state_fingerprint(base_state_dict(model))
