"""Encode captions without their trailing padding, where that changes nothing.

open_clip's CLIP text transformer runs all 77 positions of every caption. Its attention is
causal and it pools the feature at each caption's end-of-text token (``argmax`` or ``eos``
pooling), so positions after the batch's last end-of-text token cannot reach any pooled
feature: the batch is cut there. A class caption of about ten tokens then costs about an
eighth of the text tower, in training, zero-shot heads, retrieval and the app alike. (The
offline default model trims its masked padding the same way: ``offline_model.build``.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn


def _is_causal(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def trimmed_length(model: CLIP, text: torch.Tensor) -> int:
    """Positions up to the batch's last pooled (end-of-text) position."""
    if model.text_pool_type == "argmax":
        ends = text.argmax(dim=-1)
    else:
        ends = (text == model.text_eos_id).int().argmax(dim=-1)
    return int(ends.max()) + 1 if text.numel() else text.shape[1]


def _encode_text_trimmed(model: CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    length = trimmed_length(model, text)
    if length >= text.shape[1]:
        return CLIP.encode_text(model, text, normalize=normalize)
    # open_clip's CLIP.encode_text with the positional embedding and mask cut to ``length``.
    text = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_padding(model: nn.Module) -> bool:
    """Have ``model.encode_text`` skip trailing padding when that is exact (an open_clip
    ``CLIP`` with a causal text mask and end-of-text pooling); returns whether it applies."""
    if type(model) is not CLIP or not _is_causal(getattr(model, "attn_mask", None)):
        return False
    pool = getattr(model, "text_pool_type", None)
    if pool not in ("argmax", "eos") or (pool == "eos" and getattr(model, "text_eos_id", None) is None):
        return False
    # A partial, not a bound method: it pickles, and pickle and copy.deepcopy bind it to the copy.
    model.encode_text = functools.partial(_encode_text_trimmed, model)
    return True
