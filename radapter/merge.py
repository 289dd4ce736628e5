"""The weight-space ensemble: fold adapters into the layers before them at a given alpha.

``merge_adapters(model, alpha)`` rewrites each site's weights to
``W <- (I + alpha * s * A) W`` and ``b <- (I + alpha * s * A) b`` and removes the adapter
hooks, so the merged model runs the base model's forward path at the base model's cost.
The products ``D = s * A @ W`` are computed once per adapter state and cached, so
re-merging at a new alpha is ``W <- W_org + alpha * D``: one add, no matmul.
``unmerge_adapters`` copies the kept originals back: exact, no subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter
from .errors import RAdapterError
from .inject import attach_hook, detach_hook, iter_adapters, require_state
from .sites import FoldedTensor, get_site_kind


@dataclass
class _MergeCache:
    originals: dict[str, torch.Tensor]
    plan: list[FoldedTensor] = field(default_factory=list)
    key: tuple = ()


def _source_key(adapter: Adapter, use_ema: bool) -> tuple:
    tensors = adapter.tensors(use_ema)
    if any(t.is_inference() for t in tensors.values()):
        raise RAdapterError("adapters created or loaded under torch.inference_mode() cannot be tracked for "
                            "merging; add or load them outside it (torch.no_grad() is fine)")
    return (use_ema, *((id(t), t._version) for t in tensors.values()))


@torch.no_grad()
def _plan_for(module: nn.Module, adapter: Adapter, use_ema: bool) -> list[FoldedTensor]:
    kind = get_site_kind(adapter.site_kind)
    cache: _MergeCache | None = adapter._merge_cache
    if cache is None:
        keep = kind.tensors_to_keep(module)
        cache = _MergeCache(originals={n: t.detach().clone() for n, t in keep.items()})
        adapter._merge_cache = cache
    key = _source_key(adapter, use_ema)
    if key != cache.key:
        cache.plan = kind.fold_plan(module, cache.originals, adapter.delta_matrix(use_ema))
        cache.key = key
    return cache.plan


@torch.no_grad()
def merge_adapters(model: nn.Module, alpha: float | None = None, *, use_ema: bool = True) -> nn.Module:
    """Fold every adapter into its layer at ``alpha`` (default: the config's ``default_alpha``).

    alpha = 0 gives the pretrained model, alpha = 1 the fine-tuned one. Calling it on a
    merged model re-merges at the new alpha from the kept originals. ``use_ema`` picks
    the EMA copy of the adapter weights when one is kept.
    """
    state = require_state(model)
    alpha = state.config.default_alpha if alpha is None else float(alpha)
    # Plan every site before writing any, so a site that cannot fold leaves the model untouched.
    plans = [(module, _plan_for(module, adapter, use_ema)) for _, module, adapter in iter_adapters(model)]
    for module, plan in plans:
        for t in plan:
            if t.delta is None:
                t.target.copy_(t.base)
            else:
                torch.add(t.base, t.delta, alpha=alpha, out=t.target)
        detach_hook(module)
    state.merged_alpha = alpha
    return model


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Restore the original weights exactly and re-attach the adapter hooks."""
    state = require_state(model)
    if state.merged_alpha is None:
        return model
    for _, module, adapter in iter_adapters(model):
        cache: _MergeCache = adapter._merge_cache
        live = get_site_kind(adapter.site_kind).tensors_to_keep(module)
        for name, original in cache.originals.items():
            live[name].copy_(original)
        attach_hook(module)
    state.merged_alpha = None
    return model


def merged_alpha(model: nn.Module) -> float | None:
    """The alpha the model is merged at, or ``None`` when unmerged."""
    return require_state(model).merged_alpha


def release_merge_cache(model: nn.Module) -> None:
    """Free the kept originals and deltas (about 2x the adapted layers' weights).

    Only allowed when unmerged; the next merge rebuilds the cache.
    """
    if require_state(model).merged_alpha is not None:
        raise RuntimeError("unmerge the adapters before releasing the merge cache")
    for _, _, adapter in iter_adapters(model):
        adapter._merge_cache = None


def interpolate_weights(
    theta_0: dict[str, torch.Tensor], theta_1: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * theta_0 + alpha * theta_1`` over matching tensors.

    Non-floating tensors (e.g. integer buffers) are taken from ``theta_0``.
    """
    if theta_0.keys() != theta_1.keys():
        missing = sorted(theta_0.keys() ^ theta_1.keys())[:5]
        raise ValueError(f"state dicts differ in keys, e.g. {missing}")
    return {
        k: torch.lerp(v, theta_1[k].to(v.dtype), alpha) if v.is_floating_point() else v
        for k, v in theta_0.items()
    }
