"""LoRA baseline: ``W <- W + (alpha / r) * B @ A`` on the same layers R-Adapter adapts.

LoRA is parallel (acts on the layer's input) where R-Adapter is sequential (acts on its
output). It is attached as a weight parametrisation, which also reaches the attention
output projection that ``nn.MultiheadAttention`` uses without calling it. ``merge_lora``
folds it into the weights for inference at the base model's cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

import radapter


class LoRADelta(nn.Module):
    """Parametrisation ``W -> W + scale * (B @ A)`` (reshaped for 1x1 convolutions)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape[0], weight[0].numel()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).reshape(weight.shape)
        return weight + self.scale * delta.to(weight.dtype)


def _owner(model: nn.Module, tensor: torch.Tensor) -> nn.Module:
    for module in model.modules():
        if module._parameters.get("weight") is tensor:
            return module
    raise RuntimeError("could not find the module owning an adapted weight")


def add_lora(model: nn.Module, rank: int, alpha: float,
             config: radapter.RAdapterConfig | None = None) -> list[nn.Parameter]:
    """Freeze the model and add LoRA to the weights of every R-Adapter site; returns the LoRA parameters."""
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    # conv_bn sites: LoRA goes on the conv that feeds the BatchNorm (the weight the site folds into)
    for weight in radapter.site_weights(model, config).values():
        owner = _owner(model, weight)
        delta = LoRADelta(weight, rank, alpha)
        parametrize.register_parametrization(owner, "weight", delta)
        params += [delta.lora_A, delta.lora_B]
    radapter.lean_frozen_layers(model)  # as for R-Adapter: the frozen layers keep less for backward
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA delta into its weight and remove the parametrisations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
