"""Adapter files: safetensors with the base model's fingerprint and the adapter config.

Only adapter tensors are stored (the EMA copy by default), with string metadata:
``format``, ``format_version``, ``base_model``, ``base_fingerprint``, ``base_dtype``,
``adapter_config`` (JSON, with the default alpha), ``default_alpha`` (a copy), ``training``
(JSON) and any extra user metadata (JSON).
Files are never unpickled, and a file that does not fit the model changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from ..errors import CheckpointError, PlacementError
from ..models.info import model_info
from .config import RAdapterConfig
from .fingerprint import compute_fingerprint, float_dtype
from .inject import DEFAULT_ADAPTER, adapter_state, attach_adapters, iter_adapters, require_state
from .merge import merge_adapters
from .placement import resolve_sites

FORMAT = "radapter-adapters"
FORMAT_VERSION = "1"
_RESERVED = {
    "format", "format_version", "base_model", "base_fingerprint", "base_dtype", "adapter_config", "default_alpha",
    "training",
}


def _tensor_shapes(path: str, config: RAdapterConfig, features: int) -> dict[str, tuple[int, ...]]:
    if config.is_low_rank(features):
        return {
            f"{path}.lora_A": (config.rank, features),
            f"{path}.lora_B": (features, config.rank),
            f"{path}.scale": (),
        }
    return {f"{path}.weight": (features, features), f"{path}.scale": ()}


def save_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    use_ema: bool = True,
    default_alpha: float | None = None,
    training: dict[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write the active set's adapters (EMA copy by default) of ``model`` to a safetensors file, atomically.

    ``default_alpha`` (default: the set's config) is stored in the saved adapter config, the
    one value ``load_adapters`` + ``merge_adapters()`` use.
    """
    state = require_state(model)
    try:
        config = replace(state.config, **({} if default_alpha is None else {"default_alpha": default_alpha}))
    except ValueError as e:
        raise ValueError(f"cannot save {path}: {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    for site, _, adapter in iter_adapters(model):
        for name, t in adapter.tensors(use_ema).items():
            tensors[f"{site}.{name}"] = t.detach().float().cpu().contiguous()
    bad = sorted(set(meta) & _RESERVED)
    if bad:
        raise ValueError(f"metadata keys {bad} are reserved; pass them as keyword arguments of save_adapters")
    info = model_info(model)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": info.name if info else type(model).__name__,
        "base_fingerprint": state.base_fingerprint,
        "base_dtype": float_dtype(model) or "",
        "adapter_config": config.to_json(),
        "default_alpha": str(config.default_alpha),  # a copy for readers of the metadata alone
        "training": json.dumps(training or {}, sort_keys=True, default=str),
        **{k: json.dumps(v, default=str) for k, v in meta.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read metadata and tensors of an adapter file, checking that it is one and that its values are sane."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a radapter adapter file (no '{FORMAT}' tag)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has adapter format version {metadata.get('format_version')!r}; "
                              f"this radapter reads version {FORMAT_VERSION}")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"{path} holds non-finite values (NaN or inf) in {bad[:3]}")
    return metadata, tensors


def adapter_file_info(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of an adapter file (config, base model, default alpha, training summary)."""
    return _decode(path, *read_adapter_file(path))


def _file_config(path: str | Path, metadata: dict[str, str]) -> RAdapterConfig:
    """The file's adapter config; its ``default_alpha`` is the metadata's where both exist (files
    written before the config carried it)."""
    try:
        data = json.loads(metadata["adapter_config"])
        if "default_alpha" in metadata:
            data["default_alpha"] = float(metadata["default_alpha"])
        return RAdapterConfig.from_dict(data)
    except KeyError:
        raise CheckpointError(f"{path} has no adapter_config") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} has an invalid adapter config ({e})") from None


def _decode(path: str | Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    config = _file_config(path, metadata)
    out: dict[str, Any] = dict(metadata)
    out["adapter_config"] = config.to_dict()
    try:
        out["training"] = json.loads(metadata.get("training", "{}"))
    except ValueError:
        raise CheckpointError(f"{path} has a 'training' field that is not JSON") from None
    out["default_alpha"] = config.default_alpha
    out["num_tensors"] = len(tensors)
    out["num_parameters"] = sum(t.numel() for t in tensors.values())
    return out


def _base_mismatch(path: str | Path, metadata: dict[str, str], model: nn.Module, fingerprint: str) -> str:
    msg = (f"{path} was trained on base model {metadata.get('base_model')!r} "
           f"(fingerprint {metadata.get('base_fingerprint', '?')[:12]}), not on this model ({fingerprint[:12]})")
    want, have = metadata.get("base_dtype") or "float32", float_dtype(model)
    if have is not None and have != want:
        msg += (f"; this model's weights are {have} and the adapters were trained on {want} weights: load the base "
                f"in {want}, load the adapters, then cast the model")
    return msg


def load_adapters(model: nn.Module, path: str | Path, *, check_base: bool = True,
                  adapter_name: str | None = None) -> dict[str, Any]:
    """Load an adapter file into ``model``.

    Into the active set by default (adding the adapters first if the model has none), or
    into the set ``adapter_name``, which is added beside the others if it is new (see
    :func:`radapter.set_adapter`). Checks the base-model fingerprint, the config and every
    tensor name, shape and value before touching the model: on any mismatch it raises
    :class:`CheckpointError` and the model is unchanged. A merged set is re-merged at the
    same alphas. Returns the decoded metadata.
    """
    metadata, tensors = read_adapter_file(path)
    info = _decode(path, metadata, tensors)
    config = _file_config(path, metadata)
    state = adapter_state(model)
    fingerprint = state.base_fingerprint if state else compute_fingerprint(model)
    if check_base and metadata.get("base_fingerprint") != fingerprint:
        raise CheckpointError(_base_mismatch(path, metadata, model, fingerprint))
    target = None
    if state is not None:
        name = state.active if adapter_name is None else adapter_name
        target = state.sets.get(name)
    if target is None:
        try:
            plans = resolve_sites(model, config)
            sites = [(p.path, p.features) for p in plans]
        except PlacementError as e:
            raise CheckpointError(f"{path} does not fit this model: {e}") from None
    else:
        if target.config.rank != config.rank:
            raise CheckpointError(
                f"{path} holds rank-{config.rank} adapters; this model's set {target.name!r} has "
                f"rank-{target.config.rank} ones"
            )
        sites = [(site.path, adapter.features) for site, adapter in target.adapters()]
    expected: dict[str, tuple[int, ...]] = {}
    for site, features in sites:
        expected.update(_tensor_shapes(site, config, features))
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(expected.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expected.keys())[:3]
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])[:3]
        raise CheckpointError(f"{path} does not fit this model's adapter sites "
                              f"(missing {missing}, unexpected {extra}, wrong shape {wrong})")
    if target is None:
        attach_adapters(model, config, plans, fingerprint, adapter_name=adapter_name or DEFAULT_ADAPTER)
        state = require_state(model)
        target = state.sets[adapter_name or DEFAULT_ADAPTER]
    else:
        target.config = replace(target.config, default_alpha=config.default_alpha)
    for site, adapter in target.adapters():
        adapter.load_tensors({n: tensors[f"{site.path}.{n}"] for n in adapter.param_names})
    if target.name == state.active and state.merged:
        merge_adapters(model, dict(state.merged))
    return info
