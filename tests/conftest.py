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


def encode_both(model, images, tokens) -> torch.Tensor:
    """Image and text embeddings of a model, flattened into one vector (for exact comparisons)."""
    with torch.no_grad():
        return torch.cat([model.encode_image(images).flatten(), model.encode_text(tokens).flatten()])


def relative_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def adapt_with_reference(model, images, tokens, rank):
    """Record the pretrained outputs and weights, then add randomised adapters of ``rank``.

    The reference is taken with frozen weights, as in the adapted model: frozen weights select
    nn.MultiheadAttention's fused kernel, about 1e-6 apart from the other one.
    """
    model.requires_grad_(False)
    base = encode_both(model, images, tokens)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=rank))
    randomize_adapters(model)
    return base, base_weights


def tiny_service(folder):
    """The app's ModelService on the tiny model, with one randomised adapter file ``colours`` in ``folder``."""
    from app.service import ModelService, discover_adapters

    torch.manual_seed(0)
    model, preprocess, tok = radapter.load_model(radapter.TINY_MODEL)
    trained = radapter.load_model(radapter.TINY_MODEL)[0]
    trained.load_state_dict(model.state_dict())
    radapter.add_adapters(trained, radapter.RAdapterConfig())
    randomize_adapters(trained, std=0.3)
    radapter.save_adapters(trained, folder / "colours.safetensors", default_alpha=0.4,
                           training={"method": "r-adapter", "benchmark": "toy", "steps": 1})
    return ModelService(model, preprocess, tok, discover_adapters(folder), model_name="tiny")
