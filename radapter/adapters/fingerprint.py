"""A fingerprint of a model's base weights, so adapters never land on the wrong model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

ADAPTER_KEY = ".radapter."


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order.

    Floating tensors are hashed as float32, so a float64 copy of a float32 base has the
    base's fingerprint; a lossy cast (float16, bfloat16) has another one.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter tensors (as stored, merged or not)."""
    return {k: v for k, v in model.state_dict().items() if ADAPTER_KEY not in f".{k}"}


def float_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's first floating parameter (``"float32"``...), if any."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def compute_fingerprint(model: nn.Module) -> str:
    """Fingerprint of an unmerged model's non-adapter weights."""
    return state_fingerprint(base_state_dict(model))
