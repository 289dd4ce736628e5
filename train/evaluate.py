"""After training: choose alpha on ID validation, report ID / OOD, write the adapter, metrics and plot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import radapter
from radapter import evaluation as ev
from radapter.data.benchmarks import Benchmark
from radapter.data.sets import ClassificationSet

from .config import TrainConfig
from .data import TrainData, base_novel_split
from .objectives import dual_head

log = logging.getLogger("train")


def _subset_classes(cset: ClassificationSet, classes: list[int], names: list[str]) -> ClassificationSet:
    keep = np.isin(cset.labels, classes)
    remap = {c: k for k, c in enumerate(classes)}
    images = cset.images[keep] if isinstance(cset.images, np.ndarray) else [i for i, k in zip(cset.images, keep,
                                                                                              strict=True) if k]
    return ClassificationSet(cset.name, images, np.array([remap[int(c)] for c in cset.labels[keep]]), names)


def head_builder(tokenizer: Callable, names: list[str], templates: tuple[str, ...], descriptions: list[str],
                 cfg: TrainConfig) -> ev.HeadBuilder:
    """The classifier at test time: the zero-shot head of the (merged) text tower, or DRM's dual head."""
    if cfg.uses_drm:
        return lambda model: dual_head(model, tokenizer, names, descriptions, templates, cfg)
    return ev.default_head_builder(names, templates, tokenizer)


def _restricted(bench: Benchmark, classes: list[int], names: list[str]) -> Benchmark:
    b = Benchmark(spec=bench.spec)
    for split in ("val", "test"):
        if getattr(bench, split) is not None:
            setattr(b, split, _subset_classes(getattr(bench, split), classes, names))
    b.ood = {k: _subset_classes(v, classes, names) for k, v in bench.ood.items()}
    return b


def _benchmarks(data: TrainData) -> dict[str, tuple[Benchmark, list[str], list[str]]]:
    """Evaluation benchmarks: the full one, or its base and novel halves (base-to-novel)."""
    bench, spec = data.bench, data.bench.spec
    names = list(spec.prompt_names)
    desc = data.spec_descriptions
    if data.class_subset is None:
        return {"all": (bench, names, desc)}
    base, novel = base_novel_split(len(names))
    out = {}
    for part, classes in (("base", base), ("novel", novel)):
        part_names = [names[c] for c in classes]
        out[part] = (_restricted(bench, classes, part_names), part_names, [desc[c] for c in classes] if desc else [])
    return out


Setter = Callable[[float], None]


def validation_top1(tokenizer, preprocess, data: TrainData, cfg: TrainConfig) -> Callable[[nn.Module], float] | None:
    """``model -> ID validation top-1`` with the method's own head (``None`` without a val split or
    ``--val-every``): the training curve that shows whether the budget has plateaued."""
    if not cfg.val_every or cfg.task != "classification" or data.bench is None:
        return None
    bench, names, desc = next(iter(_benchmarks(data).values()))
    if bench.val is None:
        return None

    def score(model: nn.Module) -> float:
        builder = head_builder(tokenizer, names, data.templates, desc, cfg)
        res = ev.evaluate_benchmark_classification(model, tokenizer, preprocess, bench, split="val",
                                                   limit=cfg.eval_limit, head_builder=builder, progress=False)
        return res["id"]["top1"]
    return score


def _sweep(model, tokenizer, preprocess, bench, builder, set_alpha: Setter, alphas, split, cfg) -> list[dict]:
    """Scores at each alpha: ``val`` the ID validation split (to choose alpha), ``test`` ID and OOD."""
    points = []
    for alpha in tqdm(alphas, desc=f"{split} sweep", unit="alpha", leave=False):
        set_alpha(alpha)
        res = ev.evaluate_benchmark_classification(model, tokenizer, preprocess, bench, split=split,
                                                   limit=cfg.eval_limit, head_builder=builder)
        points.append({"alpha": alpha, **res})
    return points


def alpha_setter(model: nn.Module, cfg: TrainConfig, theta0: dict | None, theta1: dict | None) -> Setter | None:
    """How to move along alpha for this method: re-merge adapters, or WiSE-FT between two state dicts."""
    if cfg.uses_adapters:
        return lambda a: radapter.merge_adapters(model, a)
    if theta0 is not None and theta1 is not None:
        return lambda a: model.load_state_dict(radapter.interpolate_weights(theta0, theta1, a))
    return None


def test_alphas(alphas: list[float], chosen: float, cfg: TrainConfig) -> list[float]:
    """The test split's alphas: the whole grid, or just the chosen one and the fine-tuned end (alpha 1)."""
    return alphas if cfg.test_sweep else sorted({chosen, 1.0})


def final_evaluation(model: nn.Module, tokenizer, preprocess, data: TrainData, cfg: TrainConfig,
                     set_alpha: Setter | None) -> dict[str, Any]:
    """ID/OOD metrics; with an alpha (adapters, WiSE-FT), alpha is chosen on the ID validation split."""
    if data.bench is None or data.bench.test is None:
        return {}
    alphas = ev.alpha_grid(1 / (cfg.eval_alphas - 1)) if set_alpha else [1.0]
    results: dict[str, Any] = {"alphas": alphas}
    parts = _benchmarks(data)
    chosen = cfg.default_alpha
    if set_alpha and chosen is None:
        bench, names, desc = parts.get("base", parts.get("all"))
        if bench.val is None:
            chosen = radapter.RAdapterConfig().default_alpha
            log.warning("no validation split: using alpha = %s", chosen)
        else:
            val = _sweep(model, tokenizer, preprocess, bench, head_builder(tokenizer, names, data.templates, desc, cfg),
                         set_alpha, alphas, "val", cfg)
            best = max(val, key=lambda p: p["id"]["top1"])
            chosen = best["alpha"]
            results["val_sweep"] = [{"alpha": p["alpha"], "top1": p["id"]["top1"]} for p in val]
    chosen = 1.0 if chosen is None else chosen
    results["chosen_alpha"] = chosen
    for part, (bench, names, desc) in parts.items():
        builder = head_builder(tokenizer, names, data.templates, desc, cfg)
        if set_alpha:
            sweep = _sweep(model, tokenizer, preprocess, bench, builder, set_alpha, test_alphas(alphas, chosen, cfg),
                           "test", cfg)
            results[part] = {"sweep": sweep, "at_chosen_alpha": next(p for p in sweep if p["alpha"] == chosen)}
        else:
            res = ev.evaluate_benchmark_classification(model, tokenizer, preprocess, bench, limit=cfg.eval_limit,
                                                       head_builder=builder)
            results[part] = {"at_chosen_alpha": {"alpha": None, **res}}
    if "base" in results:
        b, n = results["base"]["at_chosen_alpha"]["id"]["top1"], results["novel"]["at_chosen_alpha"]["id"]["top1"]
        results["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    if set_alpha:
        set_alpha(chosen)
    return results


def evaluate_retrieval_task(model, tokenizer, preprocess, data: TrainData, cfg: TrainConfig,
                            set_alpha: Setter | None) -> dict[str, Any]:
    """Retrieval: ID (Google test) and OOD (Twitter test) recall; alpha chosen on Google val R@1."""
    bench = data.bench
    if bench is None:
        return {}
    template = bench.spec.extra.get("caption_template", "{}")

    def score(name: str) -> dict[str, float]:
        return ev.evaluate_retrieval(model, tokenizer, preprocess, bench.retrieval[name], caption_template=template)

    alphas = ev.alpha_grid(1 / (cfg.eval_alphas - 1)) if set_alpha else [1.0]
    out: dict[str, Any] = {"points": []}
    for alpha in alphas:
        if set_alpha:
            set_alpha(alpha)
        val = score("google-val")
        out["points"].append({"alpha": alpha, "val_r1": (val["i2t_r1"] + val["t2i_r1"]) / 2})
    best = max(out["points"], key=lambda p: p["val_r1"])
    out["chosen_alpha"] = cfg.default_alpha if cfg.default_alpha is not None else best["alpha"]
    for alpha in test_alphas(alphas, out["chosen_alpha"], cfg):
        point = next((p for p in out["points"] if p["alpha"] == alpha), None)
        if point is None:  # a --default-alpha off the grid
            point = {"alpha": alpha}
            out["points"].append(point)
        if set_alpha:
            set_alpha(alpha)
        point.update(id=score("google-test"), ood=score("twitter-test"))
    if set_alpha:
        set_alpha(out["chosen_alpha"])
    return out


def linear_probe(model: nn.Module, preprocess, data: TrainData, cfg: TrainConfig) -> dict[str, Any]:
    """Logistic regression on frozen image features; C chosen on ID validation."""
    from sklearn.linear_model import LogisticRegression

    bench = data.bench
    train_x = ev.embed_images(model, data.dataset(preprocess), desc="probe features").numpy()
    sets = {"val": bench.val.subset(cfg.eval_limit), "id": bench.test.subset(cfg.eval_limit),
            **{k: v.subset(cfg.eval_limit) for k, v in bench.ood.items()}}
    feats = {k: ev.embed_images(model, v.dataset(preprocess), desc=k).numpy() for k, v in sets.items()}
    best, best_acc = None, -1.0
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(train_x, data.labels)
        acc = float((clf.predict(feats["val"]) == sets["val"].labels).mean())
        if acc > best_acc:
            best, best_acc = clf, acc
    res = {k: ev.classification_metrics(torch.as_tensor(best.decision_function(feats[k])), sets[k].labels,
                                        sets[k].groups, sets[k].min_group_size)
           for k in sets if k != "val"}
    return {"all": {"at_chosen_alpha": {"alpha": None, **ev.summarise(res.pop("id"), res)}}, "probe_C": best.C,
            "val_top1": best_acc}
