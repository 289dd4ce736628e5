"""What a loaded model carries about how it was loaded (for export and adapter files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class ModelInfo:
    """How a model was loaded; kept on the model as ``radapter_model_info`` for export."""

    name: str
    pretrained: str | None = None
    model_cfg: dict[str, Any] | None = None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None


def model_info(model: nn.Module) -> ModelInfo | None:
    return getattr(model, "radapter_model_info", None)
