"""DRM's inference rule: two zero-shot heads of the same text tower, mixed by beta.

``p = beta * softmax(s * f . t_df) + (1 - beta) * softmax(s * f . t_cd)`` with t_df the
default-prompt embeddings and t_cd the core-feature description embeddings of each class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation.zero_shot import encode_texts


class DRMHead:
    """Callable head returning log-probabilities (so argmax and softmax act as on logits)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str], descriptions: Sequence[str],
                 *, default_template: str = "a photo of a {}.", beta: float = 0.5) -> None:
        if len(descriptions) != len(classnames) or not classnames:
            raise ValueError("DRMHead needs one description per class")
        t = encode_texts(model, tokenizer, [default_template.format(c) for c in classnames] + list(descriptions))
        c = len(classnames)
        self.default, self.description = t[:c], t[c:]
        scale = getattr(model, "logit_scale", None)
        self.scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.beta = float(beta)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=-1)
        df, cd = self.default.to(f.device), self.description.to(f.device)
        p = (self.beta * torch.softmax(self.scale * f @ df.t(), 1)
             + (1 - self.beta) * torch.softmax(self.scale * f @ cd.t(), 1))
        return p.clamp(min=1e-12).log()
