"""What trains for each method, and which modules are in training mode."""

from __future__ import annotations

from torch import nn

import radapter

from .config import TrainConfig
from .lora import add_lora


def prepare_trainable(model: nn.Module, cfg: TrainConfig) -> list[nn.Parameter]:
    """Attach the method's trainable structure; return the parameters the optimiser updates."""
    if cfg.uses_adapters:
        radapter.add_adapters(model, adapter_config(cfg))
        radapter.lean_frozen_layers(model)  # the frozen base keeps less for backward (opt-in in the library)
        return radapter.adapter_parameters(model)
    if cfg.method == "lora":
        return add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.method in ("full-ft", "full-ft-drm"):
        model.requires_grad_(True)
        if isinstance(getattr(model, "logit_scale", None), nn.Parameter):
            model.logit_scale.requires_grad_(False)  # temperature stays at the pretrained value
        return [p for p in model.parameters() if p.requires_grad]
    raise ValueError(f"method {cfg.method!r} has no trainable structure")


def adapter_config(cfg: TrainConfig) -> radapter.RAdapterConfig:
    return radapter.RAdapterConfig(rank=cfg.rank, scale_init=cfg.scale_init, drop_prob=cfg.drop_prob,
                                   drop_mode=cfg.drop_mode, ema_momentum=cfg.ema_momentum)


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """Full fine-tuning trains the whole model (BatchNorm statistics stay frozen, as is usual
    for fine-tuning with small batches); PEFT methods keep the frozen base in eval mode
    (no dropout noise on frozen layers) and only the adapters train (adapter dropping)."""
    if cfg.method in ("full-ft", "full-ft-drm"):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return
    model.eval()
    for _, _, adapter in radapter.iter_adapters(model) if radapter.has_adapters(model) else ():
        adapter.train()
