"""LoRA baseline through Hugging Face ``peft``, on the layers R-Adapter adapts.

``W <- W + (lora_alpha / r) * B @ A`` on the weight each R-Adapter site folds into: the 1x1
convolution before a BatchNorm site, the linear layer of a linear site. LoRA is parallel
(acts on the layer's input) where R-Adapter is sequential (acts on its output).
``nn.MultiheadAttention`` (ViT attention sites) is targeted whole: its forward reads
``out_proj.weight`` without calling ``out_proj``, so peft adapts the module's ``in_proj`` and
``out_proj`` together there. After training, ``merge_lora`` calls peft's
``merge_and_unload``: the model is the plain base model again, at the base model's cost.
"""

from __future__ import annotations

import torch
from torch import nn

import radapter

#: Where the peft tuner of a model in training is kept: a plain attribute, not a submodule
#: (the tuner holds the model; as a submodule it would make the module tree cyclic).
_TUNER = "_radapter_peft_lora"


def lora_targets(model: nn.Module, config: radapter.RAdapterConfig | None = None) -> list[str]:
    """Names of the modules peft's LoRA goes on: the owner of each R-Adapter site's weight
    (the enclosing ``nn.MultiheadAttention`` for an attention output projection)."""
    owners = {id(m.weight): name for name, m in model.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    targets = set()
    for site, weight in radapter.site_weights(model, config).items():
        name = owners.get(id(weight))
        if name is None:
            raise RuntimeError(f"no module owns the weight of adapter site {site}")
        parent = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
            name = parent
        targets.add(name)
    return sorted(targets)


def add_lora(model: nn.Module, rank: int, alpha: float,
             config: radapter.RAdapterConfig | None = None) -> list[nn.Parameter]:
    """Freeze the model and add peft LoRA (``r=rank``, ``lora_alpha=alpha``, no dropout, no bias)
    on the layers of every R-Adapter site; returns the LoRA parameters."""
    from peft import LoraConfig, LoraModel

    targets = lora_targets(model, config)
    model.requires_grad_(False)
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    tuner = LoraModel(model, lora_config, "default")  # injects the LoRA layers into `model` in place
    model.__dict__[_TUNER] = tuner
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    radapter.lean_frozen_layers(model)  # as for R-Adapter: the frozen layers keep less for backward
    return params


def has_lora(model: nn.Module) -> bool:
    return _TUNER in model.__dict__


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its weight and remove the LoRA layers (peft's ``merge_and_unload``)."""
    tuner = model.__dict__.pop(_TUNER, None)
    if tuner is None:
        raise RuntimeError("this model has no LoRA layers (add_lora) to merge")
    merged = tuner.merge_and_unload()
    if merged is not model:
        raise RuntimeError("peft returned another model object than the one it was given")
    return model
