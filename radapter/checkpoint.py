"""Adapter files: safetensors with the base model's fingerprint and the adapter config.

Only adapter tensors are stored (the EMA copy by default), with string metadata:
``format``, ``format_version``, ``base_model``, ``base_fingerprint``, ``adapter_config``
(JSON), ``default_alpha``, ``training`` (JSON) and any extra user metadata (JSON).
Files are never unpickled, and a file that does not fit the model changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path
from .config import RAdapterConfig
from .errors import CheckpointError, PlacementError
from .fingerprint import compute_fingerprint
from .inject import adapter_state, attach_adapters, iter_adapters, require_state
from .merge import merge_adapters, unmerge_adapters
from .models import model_info
from .placement import resolve_sites

FORMAT = "radapter-adapters"
FORMAT_VERSION = "1"
_RESERVED = {
    "format", "format_version", "base_model", "base_fingerprint", "adapter_config", "default_alpha", "training",
}


def _tensor_shapes(path: str, config: RAdapterConfig, features: int) -> dict[str, tuple[int, ...]]:
    low_rank = config.rank is not None and config.rank < features
    if low_rank:
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
    """Write the adapters (EMA copy by default) of ``model`` to a safetensors file, atomically."""
    state = require_state(model)
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
        "adapter_config": state.config.to_json(),
        "default_alpha": str(state.config.default_alpha if default_alpha is None else float(default_alpha)),
        "training": json.dumps(training or {}, sort_keys=True, default=str),
        **{k: json.dumps(v, default=str) for k, v in meta.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read metadata and tensors of an adapter file, checking that it is one."""
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
    return metadata, tensors


def adapter_file_info(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of an adapter file (config, base model, default alpha, training summary)."""
    return _decode(*read_adapter_file(path))


def _decode(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = dict(metadata)
    out["adapter_config"] = json.loads(metadata["adapter_config"])
    out["training"] = json.loads(metadata.get("training", "{}"))
    out["default_alpha"] = float(metadata.get("default_alpha", "nan"))
    out["num_tensors"] = len(tensors)
    out["num_parameters"] = sum(t.numel() for t in tensors.values())
    return out


def load_adapters(model: nn.Module, path: str | Path, *, check_base: bool = True) -> dict[str, Any]:
    """Load an adapter file into ``model`` (adding the adapters first if it has none).

    Checks the base-model fingerprint, the config and every tensor name and shape
    before touching the model: on any mismatch it raises :class:`CheckpointError` and
    the model is unchanged. A merged model is re-merged at the same alpha.
    Returns the decoded metadata.
    """
    metadata, tensors = read_adapter_file(path)
    try:
        config = RAdapterConfig.from_json(metadata["adapter_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has an invalid adapter_config ({e})") from None
    state = adapter_state(model)
    fingerprint = state.base_fingerprint if state else compute_fingerprint(model)
    if check_base and metadata.get("base_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was trained on base model {metadata.get('base_model')!r} "
            f"(fingerprint {metadata.get('base_fingerprint', '?')[:12]}), not on this model ({fingerprint[:12]})"
        )
    if state is None:
        try:
            plans = resolve_sites(model, config)
            sites = [(p.path, p.features) for p in plans]
        except PlacementError as e:
            raise CheckpointError(f"{path} does not fit this model: {e}") from None
    else:
        if state.config.rank != config.rank:
            raise CheckpointError(
                f"{path} holds rank-{config.rank} adapters; this model has rank-{state.config.rank} ones"
            )
        sites = [(p, a.features) for p, _, a in iter_adapters(model)]
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
    if state is None:
        attach_adapters(model, config, plans, fingerprint)
    alpha = require_state(model).merged_alpha
    if alpha is not None:
        unmerge_adapters(model)
    for site, _, adapter in iter_adapters(model):
        adapter.load_tensors({n: tensors[f"{site}.{n}"] for n in adapter.param_names})
    if alpha is not None:
        merge_adapters(model, alpha)
    return _decode(metadata, tensors)
