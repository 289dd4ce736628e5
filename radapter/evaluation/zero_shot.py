"""Zero-shot heads: class names x prompt templates -> normalised text weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn
from tqdm.auto import tqdm

Template = str | Callable[[str], str]

#: The 80 prompt templates OpenAI used for ImageNet, as format strings.
OPENAI_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
#: One plain template, e.g. DRM's default head.
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def read_templates(arg: str) -> tuple[str, ...]:
    """``"openai"`` (the 80 ImageNet prompts), ``"simple"``, or a file with one template per line."""
    if arg == "openai":
        return OPENAI_TEMPLATES
    if arg == "simple":
        return SIMPLE_TEMPLATES
    path = Path(arg)
    if not path.is_file():
        raise ValueError(f"templates: {arg!r} is not 'openai', 'simple' or a file")
    lines = tuple(ln.strip() for ln in path.read_text().splitlines() if ln.strip())
    if not lines or not all("{}" in t for t in lines):
        raise ValueError(f"{path}: give one template per line, each with a '{{}}' for the class name")
    return lines


def render(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


class ZeroShotHead(nn.Module):
    """Linear head ``logits = logit_scale * normalize(f) @ weight.T`` with one row per class."""

    def __init__(self, weight: torch.Tensor, classnames: Sequence[str], logit_scale: float = 100.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.classnames = list(classnames)
        self.logit_scale = float(logit_scale)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(image_features, dim=-1) @ self.weight.t().to(image_features.dtype)


def _model_logit_scale(model: nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    return float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """L2-normalised text embeddings, batched, in eval mode (restores the previous mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(texts), batch_size)
        out = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device), normalize=True).float()
               for i in tqdm(starts, desc="encoding prompts", disable=not progress)]
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template] = OPENAI_TEMPLATES,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> ZeroShotHead:
    """Build a zero-shot head: per class, the normalised mean of its normalised template embeddings."""
    classnames = [str(c).strip() for c in classnames]
    if not classnames or any(not c for c in classnames):
        raise ValueError("zero_shot_classifier needs a non-empty list of non-empty class names")
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"class names must be unique, got duplicates in {classnames}")
    if not templates:
        raise ValueError("zero_shot_classifier needs at least one template")
    texts = [render(t, name) for name in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts, batch_size, progress)
    weight = F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)
    return ZeroShotHead(weight, classnames, _model_logit_scale(model))
