"""Several named adapter sets on one base model: switch, delete, unload (peft's model).

Each set is added with ``add_adapters(model, config, adapter_name=...)`` or
``load_adapters(model, path, adapter_name=...)``; one is active at a time.
"""

from __future__ import annotations

from torch import nn

from ..errors import RAdapterError
from .inject import ADAPTER_ATTR, STATE_ATTR, Site, require_state, set_trainable
from .merge import AlphaSpec, merge_adapters, unmerge_adapters
from .sites import unlink_fold_target


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active set: the forward, merges, saving and training use it.

    Its parameters become trainable and the others frozen (as in peft). A merged model
    stays merged: the new set is folded at the same per-tower alphas.
    """
    state = require_state(model)
    if adapter_name not in state.sets:
        raise RAdapterError(f"no adapter set named {adapter_name!r}; this model has {list(state.sets)}")
    if adapter_name == state.active:
        return model
    merged = dict(state.merged)
    if merged:
        unmerge_adapters(model)
    set_trainable(state.active_set, False)
    state.active = adapter_name
    for site in state.sites.values():
        site.adapters.active = adapter_name
        site.refresh_hook()
    set_trainable(state.active_set, True)
    towers = set(state.active_set.config.towers)
    if merged and (keep := {t: a for t, a in merged.items() if t in towers}):
        merge_adapters(model, keep)
    return model


def _remove_site(site: Site) -> None:
    if site.adapters.hook is not None:
        site.adapters.hook.remove()
    del site.module._modules[ADAPTER_ATTR]
    unlink_fold_target(site.module)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one adapter set; deleting the active set activates the first remaining one.

    Deleting the last set is :func:`unload`.
    """
    state = require_state(model)
    if adapter_name not in state.sets:
        raise RAdapterError(f"no adapter set named {adapter_name!r}; this model has {list(state.sets)}")
    if len(state.sets) == 1:
        return unload(model)
    if adapter_name == state.active:
        if state.merged:
            unmerge_adapters(model)
        set_adapter(model, next(n for n in state.sets if n != adapter_name))
    aset = state.sets.pop(adapter_name)
    used = {s.path for other in state.sets.values() for s in other.sites}
    for site in aset.sites:
        del site.adapters[adapter_name]
        site.refresh_hook()
        if site.path not in used:
            _remove_site(site)
            del state.sites[site.path]
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter set and its hooks, restoring the base weights: the plain base model."""
    state = require_state(model)
    if state.merged:
        unmerge_adapters(model)
    for site in state.sites.values():
        _remove_site(site)
    delattr(model, STATE_ATTR)
    return model


def merge_and_unload(model: nn.Module, alpha: AlphaSpec = None, *, use_ema: bool = True) -> nn.Module:
    """Merge the active set at ``alpha`` and remove every adapter: a plain model with merged weights."""
    merge_adapters(model, alpha, use_ema=use_ema)
    state = require_state(model)
    for site in state.sites.values():
        site.merge = None  # unload must not restore the originals
    state.merged.clear()
    return unload(model)
