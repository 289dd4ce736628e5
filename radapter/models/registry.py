"""Model loading: `load_model(name_or_path) -> (model, preprocess, tokenizer)`.

Accepted names, in the order they are tried:
- nothing: the offline default model :data:`DEFAULT_MODEL` (EfficientNet-Lite0 + MiniLM
  joined by an ImageNet bridge aligned on clip art; not OpenAI CLIP, see ``docs/offline_model.md``);
- a name registered with :func:`register_model` (a custom builder, e.g. the offline default);
- ``"local-dir:/path"`` or a folder path: an open_clip folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``), read offline;
- ``"hf-hub:org/repo"``: an open_clip model on the Hugging Face Hub (needs network);
- ``"ARCH"`` or ``"ARCH:TAG"`` (or ``pretrained=TAG_OR_FILE``): an open_clip architecture with
  a pretrained tag (needs network) or a local weights file; no tag means random init.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from ..errors import ModelLoadError, first_line
from .info import ModelInfo
from .text_padding import trim_text_padding

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")

#: The tiny ViT CLIP used by fast tests: 2 layers, width 64, 32 px images.
TINY_MODEL = "radapter-tiny-vit"
#: The model ``load_model()`` returns: real pretrained towers that ship offline (see radapter.models.offline).
DEFAULT_MODEL = "effnet-lite0-minilm-lit"
#: The same towers joined by the ImageNet bridge alone (before alignment), for comparisons.
BRIDGE_MODEL = "effnet-lite0-minilm-bridge"

LoadedModel = tuple[nn.Module, Callable, Callable]
Builder = Callable[..., LoadedModel]
_BUILDERS: dict[str, Builder] = {}


def register_model(name: str, builder: Builder) -> None:
    """Register ``builder(**kwargs) -> (model, preprocess, tokenizer)`` under ``name``."""
    _BUILDERS[name] = builder


def list_models() -> list[str]:
    """Registered names plus every open_clip architecture."""
    return sorted(_BUILDERS) + open_clip.list_models()


def _offline_hint(arch: str) -> str:
    return (f"point at a local checkpoint instead: load_model('{arch}', pretrained='/path/to/weights.safetensors') "
            "or load_model('local-dir:/path/to/open_clip_folder')")


def _parse(name: str, pretrained: str | None) -> tuple[str, str | None]:
    if name.startswith(("local-dir:", "hf-hub:")):
        return name, None
    if os.path.isdir(name):
        return f"local-dir:{name}", None
    if os.path.isfile(name):
        raise ModelLoadError(
            f"{name!r} is a weights file; say which architecture it is: load_model('ARCH', pretrained={name!r})"
        )
    if ":" in name and pretrained is None:
        arch, tag = name.split(":", 1)
        return arch, tag
    return name, pretrained


def _model_cfg(name: str, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        cfg = open_clip.get_model_config(name)
    except Exception:
        return None
    if cfg is not None and kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    return cfg


def load_model(
    name_or_path: str | None = None,
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> LoadedModel:
    """Load a model and return ``(model, preprocess, tokenizer)``, model in eval mode.

    No name loads :data:`DEFAULT_MODEL`. ``preprocess`` is the evaluation transform.
    Offline, a hub tag fails with a :class:`ModelLoadError` that says how to point at a
    local checkpoint.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if not name_or_path:
        raise ModelLoadError("load_model needs a model name or path")
    if name_or_path in _BUILDERS:
        return _BUILDERS[name_or_path](device=device, precision=precision, pretrained=pretrained, **open_clip_kwargs)
    name, pretrained = _parse(name_or_path, pretrained)
    if not name.startswith(("local-dir:", "hf-hub:")) and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {close}?" if close else "; see radapter.list_models()"
        raise ModelLoadError(f"unknown model {name!r}{hint}")
    if pretrained and not open_clip.get_pretrained_cfg(name, pretrained) and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(f"pretrained {pretrained!r} is neither a tag of {name} ({tags}) nor an existing file")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision, **open_clip_kwargs
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        msg = first_line(e)
        if "download" in msg.lower() or "hub" in msg.lower() or "connection" in msg.lower():
            raise ModelLoadError(f"cannot fetch {name_or_path!r} (no network?); {_offline_hint(name)}") from None
        raise ModelLoadError(f"cannot load {name_or_path!r}: {msg}") from None
    if pretrained is None and not name.startswith(("local-dir:", "hf-hub:")):
        log.warning("radapter: %s has no pretrained weights (random init)", name)
    model.eval()
    trim_text_padding(model)
    model.radapter_model_info = ModelInfo(
        name=name_or_path,
        pretrained=pretrained,
        model_cfg=_model_cfg(name, model, open_clip_kwargs),
        preprocess_cfg=dict(getattr(model.visual, "preprocess_cfg", {})),
        tokenizer=name,
    )
    return model, preprocess, tokenizer


def _offline_builder(name: str) -> Builder:
    def build(**kwargs: Any) -> LoadedModel:
        from .offline.build import build_offline_model  # lazy: `import radapter` stays fast

        return build_offline_model(name=name, **kwargs)

    return build


register_model(DEFAULT_MODEL, _offline_builder(DEFAULT_MODEL))
register_model(BRIDGE_MODEL, _offline_builder(BRIDGE_MODEL))


def read_local_dir_config(path: str | Path) -> dict[str, Any]:
    """The ``open_clip_config.json`` of an open_clip folder."""
    return json.loads((Path(path) / "open_clip_config.json").read_text())
