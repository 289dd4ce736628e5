"""Training objectives: contrastive (MPM-NCE or CLIP/FLYP) and DRM.

DRM (our reading; the authors' training loss is not public), for a batch of images x
with labels y, C classes, image features f, caption features t and description text
features t_cd (all L2-normalised, s = the frozen logit scale):

    ERM = the method's own contrastive loss on (f, t): MPM-NCE for adapters, CLIP (FLYP)
          for full fine-tuning, exactly as without DRM (same captions and templates)
    WRM = - sum_c q_c(x) log softmax_c(s * f . t_cd)
    loss = ERM + lambda * WRM

q is the frozen pretrained model's core-based prediction on x (its description head):
``softmax`` normalisation q = softmax(s * a), or ``minmax`` q = (a - min a) / (max a - min a),
renormalised to sum to 1, with a = f0(x) . t0_cd the image-description affinities;
optionally mixed with the label, q <- (1 - m) q + m onehot(y). At inference the two heads
are mixed: p = beta * softmax(df) + (1 - beta) * softmax(cd), df being the zero-shot head over
the caption templates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import radapter
from radapter.drm import DRMHead

from .config import TrainConfig


class DualEncoder(nn.Module):
    """``forward(images, texts) -> (image features, text features)``: one call DDP can wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(images), self.model.encode_text(texts)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over processes, keeping gradients (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t))


def logit_scale(model: nn.Module) -> float:
    scale = getattr(model, "logit_scale", None)
    return float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                     scale: float) -> torch.Tensor:
    """Loss over the global batch (features gathered from every process).

    Every process computes the same global loss; the gather's backward sums each
    process's share, and DDP's gradient averaging then gives exactly the one-process
    gradient of the global batch.
    """
    img, txt, labels = gather(img), gather(txt), gather(labels)
    if cfg.loss_name == "mpm-nce":
        temperature = cfg.temperature if cfg.temperature is not None else 1.0 / scale
        return radapter.mpm_nce_loss(img, txt, labels, eps=cfg.eps, margin=cfg.margin, temperature=temperature)
    return radapter.clip_loss(img, txt, scale)


def drm_loss(img: torch.Tensor, txt: torch.Tensor, desc_txt: torch.Tensor, labels: torch.Tensor, q: torch.Tensor,
             cfg: TrainConfig, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's contrastive loss on captions + lambda * WRM proxy on the description head (module doc).

    ``txt`` are the batch's caption features, ``desc_txt`` the C description features. WRM is
    per example, so each process's local mean is averaged by DDP, as the contrastive loss is.
    """
    erm = contrastive_loss(img, txt, labels, cfg, scale)
    logits_cd = scale * F.normalize(img, dim=-1) @ F.normalize(desc_txt, dim=-1).t()
    wrm = -(q * F.log_softmax(logits_cd, dim=1)).sum(1).mean()
    return erm + cfg.drm_lambda * wrm, {"erm": erm.item(), "wrm": wrm.item()}


def normalise_core(affinity: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, scale: float) -> torch.Tensor:
    """Turn image-description affinities of the frozen model into targets q (rows sum to 1)."""
    if cfg.drm_norm == "softmax":
        q = torch.softmax(scale * affinity, dim=1)
    else:
        lo, hi = affinity.min(1, keepdim=True).values, affinity.max(1, keepdim=True).values
        q = (affinity - lo) / (hi - lo).clamp(min=1e-8)
        q = q / q.sum(1, keepdim=True).clamp(min=1e-8)
    if cfg.drm_label_mix > 0:
        q = (1 - cfg.drm_label_mix) * q + cfg.drm_label_mix * F.one_hot(labels, q.shape[1]).float()
    return q


def check_descriptions(classnames: list[str], descriptions: list[str]) -> list[str]:
    """DRM's description prompts, one per class, or a one-line error saying how to get them."""
    if len(descriptions) != len(classnames):
        raise radapter.RAdapterError("DRM needs one core-feature description per class; for your own classes "
                                     "run `python -m train.describe` first")
    return list(descriptions)


def default_templates(cfg: TrainConfig, templates: Sequence[str]) -> tuple[str, ...]:
    """The templates of DRM's default head: ``--drm-default-template`` or the caption templates."""
    return (cfg.drm_default_template,) if cfg.drm_default_template else tuple(templates)


def dual_head(model: nn.Module, tokenizer: Callable, classnames: list[str], descriptions: list[str],
              templates: Sequence[str], cfg: TrainConfig) -> DRMHead:
    """DRM inference head of the (merged) text tower: ``beta`` mixes the two heads' probabilities."""
    check_descriptions(classnames, descriptions)
    return DRMHead(model, tokenizer, classnames, descriptions, default_template=default_templates(cfg, templates),
                   beta=cfg.drm_beta)
