"""Training losses: CLIP's InfoNCE, R-Adapter's MPM-NCE, and cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with one positive per row (the diagonal), on L2-normalised features."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale * img @ txt.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def mpm_nce_targets(labels: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive mask and soft targets of MPM-NCE for a batch of labels.

    Row i puts ``(1 - eps) / |P(i)|`` on each positive (same label) and
    ``eps / (B - |P(i)|)`` on each negative; with no negatives, positives share 1.
    """
    pos = labels[:, None] == labels[None, :]
    n_pos = pos.sum(1, keepdim=True).float()
    n_neg = pos.shape[1] - n_pos
    pos_w = torch.where(n_neg > 0, (1.0 - eps) / n_pos, 1.0 / n_pos)
    neg_w = torch.where(n_neg > 0, eps / n_neg.clamp(min=1), torch.zeros_like(n_neg))
    return pos, torch.where(pos, pos_w, neg_w)


def mpm_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 0.02,
    margin: float = 0.05,
    temperature: float = 0.01,
) -> torch.Tensor:
    """Multi-positive margin NCE (R-Adapter, ECCV 2024).

    Row i of both matrices is a pair; every pair with an equal label is a positive.
    Logits are ``(cos_ij + margin * [j negative]) / temperature``; targets are the soft
    labels of :func:`mpm_nce_targets`; the loss is the mean of the image->text and
    text->image soft cross-entropies. Defaults are the paper's ImageNet values.
    """
    if image_features.shape != text_features.shape or image_features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected matching (B, d) features and (B,) labels, got {tuple(image_features.shape)}, "
            f"{tuple(text_features.shape)}, {tuple(labels.shape)}"
        )
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    pos, target = mpm_nce_targets(labels, eps)
    cos = img @ txt.t()
    logits = (cos + margin * (~pos).to(cos.dtype)) / temperature
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    # Row j of the transposed logits is text j, whose label is labels[j]: same target rows.
    t2i = -(target * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Plain classification cross-entropy (for heads and linear probes)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
