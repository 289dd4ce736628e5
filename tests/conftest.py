"""Shared fixtures. Tests never touch the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest
import torch

import radapter


@pytest.fixture
def tiny():
    """A fresh tiny ViT CLIP (random init, seeded) with its preprocess and tokenizer."""
    torch.manual_seed(0)
    return radapter.load_model(radapter.TINY_MODEL)


def randomize_adapters(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every adapter (live and EMA copy) non-zero weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, a in radapter.iter_adapters(model):
            for name in a.param_names:
                if name != "scale":
                    p = getattr(a, name)
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            a.scale.fill_(0.7)
            a.update_ema(0.0)
