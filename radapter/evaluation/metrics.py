"""Evaluation metrics as small pure functions over numpy arrays."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def top1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the label."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(labels) else float("nan")


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in labels or predictions (as scikit-learn)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    scores = []
    for c in np.union1d(preds, labels):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def group_accuracies(preds: np.ndarray, labels: np.ndarray, groups: np.ndarray, min_size: int = 1) -> dict[int, float]:
    """Top-1 within each group that has at least ``min_size`` examples (Sagawa et al. 2020)."""
    preds, labels, groups = np.asarray(preds), np.asarray(labels), np.asarray(groups)
    return {int(g): top1(preds[groups == g], labels[groups == g])
            for g in np.unique(groups) if np.sum(groups == g) >= min_size}


def worst_group_accuracy(preds: np.ndarray, labels: np.ndarray, groups: np.ndarray, min_size: int = 1) -> float:
    """The lowest per-group top-1 over groups of at least ``min_size`` examples (NaN if none)."""
    accs = group_accuracies(preds, labels, groups, min_size)
    return min(accs.values()) if accs else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: confidence-vs-accuracy gap, averaged over equal-width confidence bins, weighted by bin size."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, preds = probs.max(1), probs.argmax(1)
    correct = preds == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def recall_at_k(
    similarity: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Retrieval recall both ways from an ``(images, captions)`` similarity matrix.

    image->text: an image counts when any of its captions is in its top k;
    text->image: a caption counts when its image is in its top k.
    """
    sim = np.asarray(similarity)
    owner = np.asarray(caption_image)
    out = {}
    img_rank = np.argsort(-sim, axis=1)  # captions ranked per image
    txt_rank = np.argsort(-sim.T, axis=1)  # images ranked per caption
    for k in ks:
        hit_i2t = (owner[img_rank[:, :k]] == np.arange(sim.shape[0])[:, None]).any(1)
        hit_t2i = (txt_rank[:, :k] == owner[:, None]).any(1)
        out[f"i2t_r{k}"] = float(hit_i2t.mean())
        out[f"t2i_r{k}"] = float(hit_t2i.mean())
    return out


class IoUAccumulator:
    """Per-class intersection and union summed over a dataset; mIoU over classes seen.

    Open-vocabulary: each image has its own class list, so classes are keyed by name.
    Masks hold indices into that image's list, 0 meaning background / unlabelled.
    """

    def __init__(self) -> None:
        self.inter: dict[str, int] = {}
        self.union: dict[str, int] = {}

    def add(self, pred: np.ndarray, target: np.ndarray, names: Sequence[str]) -> None:
        for k, name in enumerate(names, start=1):
            p, t = pred == k, target == k
            self.inter[name] = self.inter.get(name, 0) + int(np.sum(p & t))
            self.union[name] = self.union.get(name, 0) + int(np.sum(p | t))

    def add_binary(self, name: str, pred: np.ndarray, target: np.ndarray) -> None:
        """One class's predicted and true masks (for predictions that may overlap across classes)."""
        self.inter[name] = self.inter.get(name, 0) + int(np.sum(pred & target))
        self.union[name] = self.union.get(name, 0) + int(np.sum(pred | target))

    def per_class(self) -> dict[str, float]:
        return {n: self.inter[n] / self.union[n] for n in self.union if self.union[n] > 0}

    def miou(self) -> float:
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else float("nan")
