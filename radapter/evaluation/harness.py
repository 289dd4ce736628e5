"""The evaluation harness: zero-shot / merged-model metrics on ID and OOD sets, and alpha sweeps.

Classification uses the zero-shot head built from the (merged) text tower, as R-Adapter
does; retrieval ranks captions and images by cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters.merge import merge_adapters
from ..data.benchmarks import Benchmark
from ..data.sets import ClassificationSet, RetrievalSet
from .metrics import expected_calibration_error, group_accuracies, macro_f1, recall_at_k, top1
from .zero_shot import Template, ZeroShotHead, encode_texts, render, zero_shot_classifier

HeadBuilder = Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def embed_images(
    model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int = 64, num_workers: int = 0,
    progress: bool = True, desc: str = "embedding images",
) -> torch.Tensor:
    """L2-normalised image embeddings (float32, on CPU) of a dataset, in order."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for images, _ in loader:
            out.append(model.encode_image(images.to(_device(model)), normalize=True).float().cpu())
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def classification_metrics(logits: torch.Tensor, labels: np.ndarray, groups: np.ndarray | None = None,
                           min_group_size: int = 1) -> dict[str, Any]:
    """Top-1, macro-F1 and ECE (from softmax probabilities) of a set of logits.

    With ``groups`` (e.g. class x background), also ``worst_group`` (the lowest per-group top-1
    over groups of at least ``min_group_size`` images) and ``group_top1`` (each such group's).
    """
    probs = torch.softmax(logits.float(), dim=1).numpy()
    preds = probs.argmax(1)
    out: dict[str, Any] = {"top1": top1(preds, labels), "macro_f1": macro_f1(preds, labels),
                           "ece": expected_calibration_error(probs, labels)}
    if groups is not None:
        per_group = group_accuracies(preds, labels, groups, min_group_size)
        out["worst_group"] = min(per_group.values()) if per_group else float("nan")
        out["group_top1"] = {str(g): v for g, v in per_group.items()}
    out["n"] = len(labels)
    return out


def default_head_builder(classnames: Sequence[str], templates: Sequence[Template], tokenizer: Callable) -> HeadBuilder:
    """Build the zero-shot head from the model as it is now (merged at the current alpha)."""
    def build(model: nn.Module) -> ZeroShotHead:
        return zero_shot_classifier(model, tokenizer, classnames, templates)
    return build


def evaluate_classification(
    model: nn.Module, preprocess: Callable, sets: dict[str, ClassificationSet], head: Callable,
    *, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of ``head(image_features)`` on each named set."""
    results = {}
    for name, cset in sets.items():
        feats = embed_images(model, cset.dataset(preprocess), batch_size=batch_size, num_workers=num_workers,
                             progress=progress, desc=name)
        with torch.inference_mode():
            logits = cset.restrict_logits(head(feats.to(_device(model))).cpu())
        results[name] = classification_metrics(logits, cset.labels, cset.groups, cset.min_group_size)
    return results


def summarise(id_result: dict[str, float], ood_results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """ID metrics, each OOD set, and the unweighted mean over OOD sets (as the papers report)."""
    keys = [k for k, v in id_result.items() if k != "n" and isinstance(v, float)
            and all(isinstance(r.get(k), float) for r in ood_results.values())]
    avg = {k: float(np.mean([r[k] for r in ood_results.values()])) for k in keys} if ood_results else {}
    return {"id": id_result, "ood": ood_results, "ood_avg": avg}


def evaluate_benchmark_classification(
    model: nn.Module, tokenizer: Callable, preprocess: Callable, bench: Benchmark, *,
    split: str = "test", limit: int | None = None, head_builder: HeadBuilder | None = None,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """ID (``split``) and every OOD set of a classification benchmark, with the OOD average.

    The OOD sets are test sets: ``split="val"`` (choosing alpha or hyper-parameters) scores the
    ID validation split alone, so a choice never looks at them (and costs one set, not all).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', not {split!r}")
    spec = bench.spec
    head_builder = head_builder or default_head_builder(spec.prompt_names, spec.templates, tokenizer)
    head = head_builder(model)
    id_set = getattr(bench, split)
    if id_set is None:
        raise ValueError(f"benchmark {bench.name!r} has no {split} split")
    ood = bench.ood.items() if split == "test" else ()
    sets = {"id": id_set.subset(limit), **{k: v.subset(limit) for k, v in ood}}
    res = evaluate_classification(model, preprocess, sets, head, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress)
    return summarise(res.pop("id"), res)


def evaluate_retrieval(
    model: nn.Module, tokenizer: Callable, preprocess: Callable, rset: RetrievalSet, *,
    caption_template: Template = "{}", batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image on one retrieval set."""
    img = embed_images(model, rset.dataset(preprocess), batch_size=batch_size, num_workers=num_workers,
                       progress=progress, desc=rset.name)
    txt = encode_texts(model, tokenizer, [render(caption_template, c) for c in rset.captions]).cpu()
    sim = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()).numpy()
    return {**recall_at_k(sim, rset.caption_image), "images": len(rset.images), "captions": len(rset.captions)}


def evaluate_benchmark(
    model: nn.Module, tokenizer: Callable, preprocess: Callable, bench: Benchmark, *,
    limit: int | None = None, head_builder: HeadBuilder | None = None, retrieval_sets: Sequence[str] | None = None,
    batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Everything a benchmark measures: classification (ID/OOD) and, where it has them, retrieval."""
    out: dict[str, Any] = {"benchmark": bench.name}
    if bench.test is not None:
        out["classification"] = evaluate_benchmark_classification(
            model, tokenizer, preprocess, bench, limit=limit, head_builder=head_builder, batch_size=batch_size,
            num_workers=num_workers, progress=progress)
    if retrieval_sets is None:
        retrieval_sets = bench.spec.extra.get("eval_retrieval", list(bench.retrieval))
    names = list(retrieval_sets)
    if names:
        template = bench.spec.extra.get("caption_template", "{}")
        out["retrieval"] = {n: evaluate_retrieval(model, tokenizer, preprocess, bench.retrieval[n],
                                                  caption_template=template, batch_size=batch_size,
                                                  num_workers=num_workers, progress=progress) for n in names}
    return out


def alpha_grid(step: float = 0.1) -> list[float]:
    n = round(1 / step)
    return [round(i * step, 6) for i in range(n + 1)]


def alpha_sweep(
    model: nn.Module, tokenizer: Callable, preprocess: Callable, bench: Benchmark, *,
    alphas: Sequence[float] | None = None, limit: int | None = None, split: str = "test",
    head_builder: HeadBuilder | None = None, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Classification metrics at each alpha, re-merging the adapters in place (no reload).

    Evaluate on ``split="val"`` to choose alpha (ID validation only); the test split (ID and
    every OOD set) is for reporting only. The model is left merged at the last alpha.
    """
    alphas = list(alphas) if alphas is not None else alpha_grid()
    points = []
    for alpha in tqdm(alphas, desc="alpha sweep", unit="alpha", disable=not progress):
        merge_adapters(model, alpha)
        res = evaluate_benchmark_classification(model, tokenizer, preprocess, bench, split=split, limit=limit,
                                                head_builder=head_builder, batch_size=batch_size,
                                                num_workers=num_workers, progress=progress)
        points.append({"alpha": alpha, **res})
    best = max(points, key=lambda p: p["id"]["top1"])
    return {"benchmark": bench.name, "split": split, "limit": limit, "points": points,
            "best_id_alpha": best["alpha"]}


def plot_alpha_sweep(sweep: dict[str, Any], path: str | Path, *, current_alpha: float | None = None,
                     title: str | None = None) -> Path:
    """ID and average-OOD score (and the OOD worst group, where given) against alpha, optionally
    marking the alpha in use.

    ``sweep["points"]`` hold ``{"alpha", "id": {key: v}, "ood_avg": {key: v}}`` with ``key =
    sweep.get("key", "top1")``; ``sweep.get("metric")`` names it on the axis (retrieval: R@1).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    key = sweep.get("key", "top1")
    alphas = [p["alpha"] for p in sweep["points"]]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(alphas, [100 * p["id"][key] for p in sweep["points"]], "o-", label="ID")
    ood = [p["ood_avg"].get(key, math.nan) * 100 for p in sweep["points"]]
    if not all(math.isnan(v) for v in ood):
        ax.plot(alphas, ood, "s-", label="OOD (average)")
    if key == "top1" and all("worst_group" in p["ood_avg"] for p in sweep["points"]):
        ax.plot(alphas, [100 * p["ood_avg"]["worst_group"] for p in sweep["points"]], "v--",
                label="OOD worst group")
    if current_alpha is not None:
        ax.axvline(current_alpha, color="grey", linestyle="--", label=f"alpha = {current_alpha:g}")
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    metric = sweep.get("metric", "top-1 accuracy")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or f"{sweep['benchmark']}: {metric} vs alpha ({sweep['split']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
