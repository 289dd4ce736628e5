"""Attach adapters to a model (`add_adapters`) and find them again."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .config import RAdapterConfig
from .errors import RAdapterError
from .fingerprint import compute_fingerprint
from .frozen_layers import lean_frozen_layers
from .placement import SitePlan, resolve_sites
from .sites import get_site_kind, link_fold_target

log = logging.getLogger(__name__)

ADAPTER_ATTR = "radapter"


@dataclass
class AdapterState:
    """Model-level adapter bookkeeping, kept on the model as ``_radapter_state``."""

    config: RAdapterConfig
    base_fingerprint: str
    merged_alpha: float | None = None


@dataclass(frozen=True)
class TrainableSummary:
    adapters: int
    trainable: int
    base: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        return (f"{self.adapters} adapters, {self.trainable:,} trainable parameters "
                f"({100 * self.share:.2f}% of {self.base:,} base parameters)")


def _adapter_hook(module: nn.Module, args: Any, output: Any) -> Any:
    adapter: Adapter = getattr(module, ADAPTER_ATTR)
    kind = get_site_kind(adapter.site_kind)
    y = kind.output_tensor(output)
    y = adapter.add_to(y, batch_dim=kind.batch_dim(module), channel_dim=kind.channel_dim(module))
    return kind.replace_output(output, y)


def attach_hook(module: nn.Module) -> None:
    adapter: Adapter = getattr(module, ADAPTER_ATTR)
    if adapter.hook_handle is None:
        adapter.hook_handle = module.register_forward_hook(_adapter_hook)


def detach_hook(module: nn.Module) -> None:
    adapter: Adapter = getattr(module, ADAPTER_ATTR)
    if adapter.hook_handle is not None:
        adapter.hook_handle.remove()
        adapter.hook_handle = None


def adapter_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, "_radapter_state", None)


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise RAdapterError("this model has no adapters; call radapter.add_adapters(model, config) first")
    return state


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """Yield ``(site path, site module, adapter)`` for every adapter, in module order."""
    for path, module in model.named_modules():
        adapter = getattr(module, ADAPTER_ATTR, None)
        if isinstance(adapter, Adapter) and not isinstance(module, Adapter):
            yield path, module, adapter


def _build_adapter(model: nn.Module, plan: SitePlan, config: RAdapterConfig) -> Adapter:
    module = model.get_submodule(plan.path)
    if plan.fold_into is not None:
        link_fold_target(module, model.get_submodule(plan.fold_into))
    weight, _ = get_site_kind(plan.kind).weight_and_bias(module)
    adapter = Adapter(plan.features, config).to(device=weight.device).train(module.training)
    adapter.site_path = plan.path
    adapter.site_kind = plan.kind
    adapter.tower = plan.tower
    adapter.hook_handle = None
    module.add_module(ADAPTER_ATTR, adapter)
    attach_hook(module)
    return adapter


def add_adapters(model: nn.Module, config: RAdapterConfig | None = None) -> nn.Module:
    """Freeze ``model`` and attach zero-initialised R-Adapters at the sites its placement names.

    Returns the same model (modified in place). The model's outputs are unchanged until
    the adapters train. Only adapter parameters (and the scale, if learnt) require grad.
    """
    config = config or RAdapterConfig()
    if adapter_state(model) is not None:
        raise RAdapterError("this model already has adapters; load or merge them instead of adding more")
    return attach_adapters(model, config, resolve_sites(model, config), compute_fingerprint(model))


def attach_adapters(model: nn.Module, config: RAdapterConfig, plans: list[SitePlan], fingerprint: str) -> nn.Module:
    """`add_adapters` with the sites and base fingerprint already computed."""
    model.requires_grad_(False)
    for plan in plans:
        adapter = _build_adapter(model, plan, config)
        for name in adapter.param_names:
            getattr(adapter, name).requires_grad_(name != "scale" or config.learn_scale)
    model._radapter_state = AdapterState(config=config, base_fingerprint=fingerprint)
    lean_frozen_layers(model)  # the frozen base keeps less for backward (see frozen_layers)
    log.info("radapter: %s", trainable_summary(model))
    return model


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count adapters, trainable parameters, and base (non-adapter) parameters."""
    adapter_ids = {id(p) for _, _, a in iter_adapters(model) for p in a.parameters()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    return TrainableSummary(adapters=sum(1 for _ in iter_adapters(model)), trainable=trainable, base=base)


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters, for the optimiser."""
    return [p for _, _, a in iter_adapters(model) for p in a.parameters() if p.requires_grad]
