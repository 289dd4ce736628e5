"""Attach named adapter sets to a model, switch between them, and remove them.

Each site module gets one :class:`AdapterDict` child named ``radapter`` that holds that
site's adapter of every named set, and one forward hook that adds the *active* set's
branch (unless that set is folded into the weights, see :mod:`radapter.adapters.merge`). The model
keeps an :class:`AdapterState` with each set's config and its list of sites, so nothing
walks the module tree after attaching. peft's ``set_adapter`` / ``delete_adapter`` /
``unload`` are the model for the set operations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import RAdapterError
from .adapter import Adapter
from .config import RAdapterConfig
from .fingerprint import compute_fingerprint
from .placement import SitePlan, resolve_sites
from .sites import get_site_kind, link_fold_target

log = logging.getLogger(__name__)

ADAPTER_ATTR = "radapter"
DEFAULT_ADAPTER = "default"
STATE_ATTR = "_radapter_state"


class AdapterDict(nn.ModuleDict):
    """A site's adapters by set name; ``active`` names the one the forward hook applies.

    ``folded`` is true while the active adapter is merged into the site's weights, so the
    hook must not add it again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active: str | None = None
        self.folded = False
        self.hook: RemovableHandle | None = None

    def live(self) -> Adapter | None:
        """The adapter the forward adds now, if any."""
        if self.folded or self.active is None or self.active not in self:
            return None
        return self[self.active]


@dataclass
class Site:
    """One adapted module of the model, with what merging keeps for it (see :mod:`radapter.adapters.merge`)."""

    path: str
    module: nn.Module
    tower: str
    kind: str
    merge: Any = None  # merge.SiteMerge, created by the first merge

    @property
    def adapters(self) -> AdapterDict:
        return getattr(self.module, ADAPTER_ATTR)

    def set_folded(self, folded: bool) -> None:
        self.adapters.folded = folded
        self.refresh_hook()

    def refresh_hook(self) -> None:
        """Keep the forward hook exactly while it has an adapter to add: a merged model runs no adapter code."""
        container = self.adapters
        if container.live() is None:
            if container.hook is not None:
                container.hook.remove()
                container.hook = None
        elif container.hook is None:
            container.hook = self.module.register_forward_hook(_adapter_hook)


@dataclass
class AdapterSet:
    """One named set of adapters: its config and the sites it adapts, in module order."""

    name: str
    config: RAdapterConfig
    sites: list[Site]
    ema_updates: int | None = None  # cached copy of the adapters' step counter (see radapter.adapters.ema)
    ema_version: int = -1

    def adapters(self) -> Iterator[tuple[Site, Adapter]]:
        for site in self.sites:
            yield site, site.adapters[self.name]


@dataclass
class AdapterState:
    """Model-level adapter bookkeeping, kept on the model as ``_radapter_state``."""

    base_fingerprint: str
    sets: dict[str, AdapterSet] = field(default_factory=dict)
    active: str = DEFAULT_ADAPTER
    sites: dict[str, Site] = field(default_factory=dict)  # every adapted module, by path
    merged: dict[str, float] = field(default_factory=dict)  # tower -> alpha the active set is folded at

    @property
    def active_set(self) -> AdapterSet:
        return self.sets[self.active]

    @property
    def config(self) -> RAdapterConfig:
        """The active set's config."""
        return self.active_set.config


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
    adapter = getattr(module, ADAPTER_ATTR).live()
    if adapter is None:
        return output
    kind = get_site_kind(adapter.site_kind)
    y = kind.output_tensor(output)
    y = adapter.add_to(y, batch_dim=kind.batch_dim(module), channel_dim=kind.channel_dim(module))
    return kind.replace_output(output, y)


def adapter_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise RAdapterError("this model has no adapters; call radapter.add_adapters(model, config) first")
    return state


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries radapter adapters (any named set)."""
    return adapter_state(model) is not None


def base_fingerprint(model: nn.Module) -> str:
    """The base-model fingerprint adapter files are matched against (kept since the first set was added)."""
    state = adapter_state(model)
    return state.base_fingerprint if state is not None else compute_fingerprint(model)


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """Yield ``(site path, site module, adapter)`` for every adapter of the active set, in module order."""
    for site, adapter in require_state(model).active_set.adapters():
        yield site.path, site.module, adapter


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the model's adapter sets (empty for a model without adapters)."""
    state = adapter_state(model)
    return list(state.sets) if state else []


def active_adapter(model: nn.Module) -> str:
    """Name of the set the forward applies (and merges, saves, trains)."""
    return require_state(model).active


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> RAdapterConfig:
    """The config of the set ``adapter_name`` (default: the active set)."""
    state = require_state(model)
    name = state.active if adapter_name is None else adapter_name
    if name not in state.sets:
        raise RAdapterError(f"no adapter set named {name!r}; this model has {list(state.sets)}")
    return state.sets[name].config


def _build_site(model: nn.Module, plan: SitePlan, state: AdapterState) -> Site:
    site = state.sites.get(plan.path)
    if site is not None:
        if site.kind != plan.kind or site.tower != plan.tower:
            raise RAdapterError(f"site {plan.path!r} is a {site.kind!r} site of the {site.tower} tower for the "
                                f"existing adapters, not {plan.kind!r} of {plan.tower}")
        return site
    module = model.get_submodule(plan.path)
    if plan.fold_into is not None:
        link_fold_target(module, model.get_submodule(plan.fold_into))
    container = AdapterDict()
    container.active = state.active
    module.add_module(ADAPTER_ATTR, container)
    site = Site(plan.path, module, plan.tower, plan.kind)
    state.sites[plan.path] = site
    return site


def add_adapters(model: nn.Module, config: RAdapterConfig | None = None, *,
                 adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze ``model`` and attach zero-initialised R-Adapters at the sites its placement names.

    Returns the same model (modified in place). The model's outputs are unchanged until
    the adapters train. Only adapter parameters (and the scale, if learnt) require grad.
    A second call with another ``adapter_name`` adds another set beside the first; the
    first set added is the active one (switch with :func:`set_adapter`).
    """
    config = config or RAdapterConfig()
    state = adapter_state(model)
    if state is not None and adapter_name in state.sets:
        raise RAdapterError(f"this model already has an adapter set named {adapter_name!r}; load or merge it, "
                            "or add the new one under another adapter_name")
    fingerprint = state.base_fingerprint if state is not None else None
    return attach_adapters(model, config, resolve_sites(model, config), fingerprint, adapter_name=adapter_name)


def attach_adapters(model: nn.Module, config: RAdapterConfig, plans: list[SitePlan], fingerprint: str | None,
                    *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """`add_adapters` with the sites (and, for the first set, the base fingerprint) already computed."""
    state = adapter_state(model)
    if not adapter_name or not isinstance(adapter_name, str) or "." in adapter_name:
        raise RAdapterError(f"adapter names are non-empty strings without dots, got {adapter_name!r}")
    first = state is None
    if first:
        model.requires_grad_(False)
        state = AdapterState(base_fingerprint=fingerprint or compute_fingerprint(model), active=adapter_name)
    sites = []
    for plan in plans:
        site = _build_site(model, plan, state)
        weight, _ = get_site_kind(plan.kind).weight_and_bias(site.module)
        adapter = Adapter(plan.features, config).to(device=weight.device).train(site.module.training)
        adapter.site_path, adapter.site_kind, adapter.tower = plan.path, plan.kind, plan.tower
        site.adapters[adapter_name] = adapter
        site.refresh_hook()
        sites.append(site)
    state.sets[adapter_name] = aset = AdapterSet(adapter_name, config, sites)
    set_trainable(aset, first)  # a set added beside others stays frozen until set_adapter, as in peft
    setattr(model, STATE_ATTR, state)
    log.info("radapter: %s", trainable_summary(model))
    return model


def set_trainable(aset: AdapterSet, trainable: bool) -> None:
    """Make the set's adapter parameters trainable (the scale only if the config learns it) or frozen."""
    for _, adapter in aset.adapters():
        for name in adapter.param_names:
            getattr(adapter, name).requires_grad_(trainable and (name != "scale" or aset.config.learn_scale))


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count the active set's adapters, trainable parameters, and base (non-adapter) parameters."""
    state = require_state(model)
    every_adapter = {id(p) for site in state.sites.values() for p in site.adapters.parameters()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if id(p) not in every_adapter)
    return TrainableSummary(adapters=len(state.active_set.sites), trainable=trainable, base=base)


def adapter_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The active set's trainable adapter parameters, for the optimiser."""
    return [p for _, _, a in iter_adapters(model) for p in a.parameters() if p.requires_grad]
