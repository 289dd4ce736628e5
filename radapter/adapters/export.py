"""Export a model merged at alpha as a plain open_clip folder (peft's ``merge_and_unload``).

The folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors`` and loads
with ``open_clip.create_model_and_transforms('local-dir:/path')``, no radapter needed.
The offline model is rewritten with stock open_clip modules first
(:mod:`radapter.models.offline.export`), which is possible only for some text heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import open_clip
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_dir
from ..errors import RAdapterError
from ..models.info import model_info
from ..models.offline import export as offline_export
from .fingerprint import base_state_dict
from .inject import require_state
from .merge import AlphaSpec, merge_adapters, merged_alphas, unmerge_adapters


def export_merged(
    model: nn.Module,
    out_dir: str | Path,
    alpha: AlphaSpec = None,
    *,
    model_cfg: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` merged at ``alpha`` (default: the config's; per tower as in
    :func:`radapter.merge_adapters`) as an open_clip folder.

    The model is left in the merge state it was in. ``model_cfg`` is needed only when
    the model was not loaded by :func:`radapter.load_model`.
    """
    state = require_state(model)
    offline = offline_export.is_offline_model(model)
    if offline:
        offline_export.check_exportable(model)  # before merging: a refusal leaves the model untouched
    elif type(model) not in (open_clip.CLIP, open_clip.CustomTextCLIP):
        raise RAdapterError(f"export writes plain open_clip checkpoints, and a {type(model).__name__} has modules "
                            "open_clip cannot build; ship the adapter file (save_adapters) instead")
    info = model_info(model)
    model_cfg = model_cfg or (info.model_cfg if info else None)
    if model_cfg is None:
        raise RAdapterError("the model's open_clip config is unknown; pass model_cfg=... to export_merged")
    previous = {t: a for t, a in merged_alphas(model).items() if a is not None}
    alpha = state.config.default_alpha if alpha is None else alpha
    merge_adapters(model, alpha)
    try:
        # Clone: safetensors refuses tensors that share storage.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in base_state_dict(model).items()}
    finally:
        unmerge_adapters(model)
        if previous:
            merge_adapters(model, previous)
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    if offline:
        model_cfg, tensors, files = offline_export.open_clip_parts(tensors, out_dir)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": dict(info.preprocess_cfg) if info else {},
        "radapter": {"alpha": alpha, "base_model": info.name if info else None,
                     "base_fingerprint": state.base_fingerprint, **(extra or {})},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2, default=str))
        for name, source in files.items():
            shutil.copyfile(source, tmp / name)
    return out_dir
