"""The weight-space ensemble: fold adapters into the layers before them at a given alpha.

``merge_adapters(model, alpha)`` rewrites each site's weights to
``W <- (I + alpha * s * A) W`` and ``b <- (I + alpha * s * A) b`` and the site's hook stops
adding the adapter, so the merged model runs the base model's forward path at its cost.
The alpha may differ per tower (``{"image": 0.3, "text": 0.7}``) and ``towers=`` merges
some towers only. ``unmerge_adapters`` copies the kept originals back: exact, no subtraction.

What merging keeps follows the live weights, as peft's merge recomputes from the live
weight every time:

- the originals are taken again at every merge of an unmerged site (if they did not change,
  the cached products are kept), so an edit or ``load_state_dict`` of the base is honoured;
- while merged, each written tensor's device, dtype, storage and version are recorded; if any
  changed, the weights are compared with what was written: a moved or cast copy moves the
  originals along (``model.to(...)``), anything else is taken as a new base (an edit that
  bypasses autograd's version counter, ``param.data.copy_``, is not seen while merged);
- the products ``D = s * A @ W`` are cached per adapter and keyed on the adapter tensors'
  identity and version and on the originals they were made from, so re-merging at a new
  alpha is ``W <- W_org + alpha * D``: one add per tensor, no matmul.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RAdapterError
from .adapter import Adapter
from .inject import AdapterSet, AdapterState, Site, require_state
from .sites import get_site_kind

AlphaSpec = float | Mapping[str, float] | None


def _record(t: torch.Tensor) -> tuple:
    return t.device, t.dtype, t.data_ptr(), t._version


@dataclass
class SiteMerge:
    """A site's pristine tensors and what was last written over them."""

    originals: dict[str, torch.Tensor]
    records: dict[str, tuple]
    generation: int = 0
    written: tuple[dict[str, torch.Tensor | None], float] | None = None  # (deltas, alpha); None: base in place


@dataclass
class _DeltaCache:
    key: tuple = ()
    deltas: dict[str, torch.Tensor | None] = field(default_factory=dict)


def _live(site: Site) -> dict[str, torch.Tensor]:
    return get_site_kind(site.kind).tensors_to_keep(site.module)


def _written_value(m: SiteMerge, name: str) -> torch.Tensor:
    deltas, alpha = m.written
    base, delta = m.originals[name], deltas[name]
    return base.clone() if delta is None else torch.add(base, delta, alpha=alpha)


def _sync(site: Site, live: dict[str, torch.Tensor]) -> SiteMerge:
    """The site's originals, made to agree with its ``live`` tensors (see the module docstring).

    Callers run it under ``torch.no_grad()``, as the other helpers here.
    """
    m: SiteMerge | None = site.merge
    if m is not None and m.written is not None:
        if all(m.records[n] == _record(t) for n, t in live.items()):
            return m
        if all(torch.equal(t, _written_value(m, n).to(t.device, t.dtype)) for n, t in live.items()):
            # moved or cast while merged: the originals and the written products follow
            m.originals = {n: m.originals[n].to(t.device, t.dtype) for n, t in live.items()}
            deltas, alpha = m.written
            m.written = ({n: None if d is None else d.to(live[n].device, live[n].dtype)
                          for n, d in deltas.items()}, alpha)
            m.records = {n: _record(t) for n, t in live.items()}
            m.generation += 1
            return m
        site.set_folded(False)  # a new base was written over the merged weights
    fresh = {n: t.detach().clone() for n, t in live.items()}
    if m is None:
        m = site.merge = SiteMerge(fresh, {})
    elif not (m.originals.keys() == fresh.keys() and all(
            o.device == fresh[n].device and o.dtype == fresh[n].dtype and torch.equal(o, fresh[n])
            for n, o in m.originals.items())):
        m.originals = fresh
        m.generation += 1
    m.records = {n: _record(t) for n, t in live.items()}
    m.written = None
    return m


def _source_key(adapter: Adapter, use_ema: bool) -> tuple:
    tensors = adapter.tensors(use_ema)
    if any(t.is_inference() for t in tensors.values()):
        raise RAdapterError("adapters created or loaded under torch.inference_mode() cannot be tracked for "
                            "merging; add or load them outside it (torch.no_grad() is fine)")
    return (use_ema, *((id(t), t._version) for t in tensors.values()))


def _deltas(site: Site, adapter: Adapter, m: SiteMerge, use_ema: bool) -> dict[str, torch.Tensor | None]:
    cache: _DeltaCache | None = adapter._merge_cache
    if cache is None:
        cache = adapter._merge_cache = _DeltaCache()
    key = (*_source_key(adapter, use_ema), id(m), m.generation)
    if key != cache.key:
        plan = get_site_kind(site.kind).fold_plan(site.module, m.originals, adapter.delta_matrix(use_ema))
        by_base = {id(t.base): t.delta for t in plan}
        cache.deltas = {n: by_base[id(o)] for n, o in m.originals.items()}
        cache.key = key
    return cache.deltas


def _write(site: Site, live: dict[str, torch.Tensor], m: SiteMerge, deltas: dict[str, torch.Tensor | None],
           alpha: float) -> None:
    for name, target in live.items():
        base, delta = m.originals[name], deltas[name]
        if delta is None:
            target.copy_(base)
        else:
            torch.add(base, delta, alpha=alpha, out=target)
        m.records[name] = _record(target)
    m.written = (deltas, alpha)
    if not site.adapters.folded:
        site.set_folded(True)


def _alpha(value: float) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise RAdapterError(f"alpha must be a number, got {value!r}") from None
    if not math.isfinite(alpha):
        raise RAdapterError(f"alpha must be finite, got {alpha}")
    return alpha


def _tower_alphas(aset: AdapterSet, alpha: AlphaSpec, towers: tuple[str, ...] | None) -> dict[str, float]:
    own = tuple(aset.config.towers)
    if isinstance(alpha, Mapping):
        if towers is not None:
            raise RAdapterError("give per-tower alphas or towers=, not both")
        unknown = sorted(set(alpha) - set(own))
        if unknown:
            raise RAdapterError(f"adapter set {aset.name!r} adapts the towers {list(own)}, not {unknown}")
        return {t: _alpha(a) for t, a in alpha.items()}
    chosen = own if towers is None else tuple(towers)
    unknown = sorted(set(chosen) - set(own))
    if unknown:
        raise RAdapterError(f"adapter set {aset.name!r} adapts the towers {list(own)}, not {unknown}")
    value = aset.config.default_alpha if alpha is None else _alpha(alpha)
    return dict.fromkeys(chosen, value)


@torch.no_grad()
def merge_adapters(model: nn.Module, alpha: AlphaSpec = None, *, use_ema: bool = True,
                   towers: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """Fold the active set's adapters into their layers at ``alpha``.

    ``alpha``: a number for every tower (default: the config's ``default_alpha``) or a
    mapping ``{tower: alpha}``; ``towers`` limits a single alpha to some towers. Towers not
    named keep their state. alpha = 0 gives the pretrained model, alpha = 1 the fine-tuned
    one; calling it on a merged model re-merges from the kept originals. ``use_ema`` picks
    the EMA copy of the adapter weights when one is kept.
    """
    state = require_state(model)
    aset = state.active_set
    alphas = _tower_alphas(aset, alpha, None if towers is None else tuple(towers))
    # Plan every site before writing any, so a site that cannot fold leaves the model untouched.
    plans = []
    for site, adapter in aset.adapters():
        if site.tower in alphas:
            live = _live(site)
            m = _sync(site, live)
            plans.append((site, live, m, _deltas(site, adapter, m, use_ema), alphas[site.tower]))
    for site, live, m, deltas, a in plans:
        _write(site, live, m, deltas, a)
    state.merged.update(alphas)
    return model


@torch.no_grad()
def unmerge_adapters(model: nn.Module, *, towers: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """Restore the original weights exactly (of ``towers``, default all) and apply the adapters again."""
    state = require_state(model)
    chosen = set(state.merged if towers is None else towers)
    for site in state.active_set.sites:
        if site.tower not in chosen or site.merge is None or site.merge.written is None:
            continue
        live = _live(site)
        m = _sync(site, live)
        if m.written is None:
            continue  # a new base was written over it: that is now the base
        for name, target in live.items():
            target.copy_(m.originals[name])
            m.records[name] = _record(target)
        m.written = None
        site.set_folded(False)
    for t in chosen:
        state.merged.pop(t, None)
    return model


def merge_targets(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The live tensors a merge of the active set writes, by site path (e.g. to size or time a merge)."""
    return {site.path: _live(site) for site in require_state(model).active_set.sites}


def merged_alphas(model: nn.Module) -> dict[str, float | None]:
    """Per tower of the active set, the alpha it is merged at (``None``: unmerged)."""
    state = require_state(model)
    return {t: state.merged.get(t) for t in state.config.towers}


def merged_alpha(model: nn.Module) -> float | None:
    """The alpha the model is merged at, or ``None`` when unmerged.

    Raises :class:`RAdapterError` when the towers are at different alphas (see :func:`merged_alphas`).
    """
    values = set(merged_alphas(model).values())
    if len(values) > 1:
        raise RAdapterError(f"the towers are merged at different alphas ({merged_alphas(model)}); "
                            "read radapter.merged_alphas(model)")
    return values.pop()


def release_merge_cache(model: nn.Module) -> None:
    """Free the kept originals and products (about 2x the adapted layers' weights).

    Only allowed when unmerged; the next merge rebuilds the cache.
    """
    state: AdapterState = require_state(model)
    if state.merged:
        raise RuntimeError("unmerge the adapters before releasing the merge cache")
    for site in state.sites.values():
        site.merge = None
        for adapter in site.adapters.values():
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
