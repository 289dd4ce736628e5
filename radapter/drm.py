"""DRM's inference rule: two zero-shot heads of the same text tower, mixed by beta.

``p = beta * softmax(s * f . t_df) + (1 - beta) * softmax(s * f . t_cd)`` with t_df the
default-prompt embeddings and t_cd the core-feature description embeddings of each class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation.zero_shot import encode_texts, zero_shot_classifier


class DRMHead:
    """Callable head returning log-probabilities (so argmax and softmax act as on logits).

    ``default_template`` is one template or several (averaged as a zero-shot head is).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str], descriptions: Sequence[str],
                 *, default_template: str | Sequence[str] = "a photo of a {}.", beta: float = 0.5) -> None:
        if len(descriptions) != len(classnames) or not classnames:
            raise ValueError("DRMHead needs one description per class")
        templates = [default_template] if isinstance(default_template, str) else list(default_template)
        if not templates:
            raise ValueError("DRMHead needs at least one default template")
        self.default = zero_shot_classifier(model, tokenizer, classnames, templates, progress=False).weight
        self.description = encode_texts(model, tokenizer, list(descriptions))
        scale = getattr(model, "logit_scale", None)
        self.scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.beta = float(beta)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=-1)
        df, cd = self.default.to(f.device), self.description.to(f.device)
        p = (self.beta * torch.softmax(self.scale * f @ df.t(), 1)
             + (1 - self.beta) * torch.softmax(self.scale * f @ cd.t(), 1))
        return p.clamp(min=1e-12).log()
