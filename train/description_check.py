"""DRM's description sets, checked on ID validation before training.

DRM's worst-case-risk term trusts the frozen model's description head: if that head is
worse than the plain zero-shot head, the term pulls the fine-tuned model toward worse
predictions. So before a DRM run, every candidate set (see :func:`description_candidates`)
is scored on the ID validation split with the frozen model, and training uses the best
one. The scores go into ``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from radapter.data.benchmark_spec import BenchmarkSpec
from radapter.data.sets import ClassificationSet
from radapter.evaluation import embed_images
from radapter.evaluation.metrics import top1
from radapter.evaluation.zero_shot import encode_texts, zero_shot_classifier

log = logging.getLogger("train")


#: How candidate sets are written from each class's description (``description_patterns`` in a
#: spec overrides them): ``{description}``, the class's prompt ``{name}``, and ``{prompt}``, the
#: benchmark's first template filled with the name (no final full stop). The released DRM
#: descriptions name their class too ("<Name> is ...").
DEFAULT_PATTERNS = ("{prompt} with {description}.", "{prompt}: {description}.", "{name}: {description}.")


def description_candidates(spec: BenchmarkSpec) -> list[list[str]]:
    """Candidate description sets in class order (duplicates dropped): the spec's descriptions,
    each set in its ``description_candidates``, then each pattern applied to the descriptions."""
    sets = [spec.description_list()] if spec.descriptions else []
    for cand in spec.extra.get("description_candidates", []):
        missing = [n for n in spec.prompt_names if n not in cand]
        if missing:
            raise ValueError(f"{spec.name}: a description candidate has no entry for {missing}")
        sets.append([cand[n] for n in spec.prompt_names])
    if spec.descriptions:
        template = spec.templates[0] if spec.templates else "a photo of a {}."
        for pattern in spec.extra.get("description_patterns", DEFAULT_PATTERNS):
            sets.append([pattern.format(description=spec.descriptions[n].rstrip("."), name=n,
                                        prompt=template.format(n).rstrip("."))
                         for n in spec.prompt_names])
    unique: list[list[str]] = []
    for s in sets:
        if s not in unique:
            unique.append(s)
    return unique


@torch.no_grad()
def score_descriptions(model: nn.Module, tokenizer: Callable, preprocess: Callable, val: ClassificationSet,
                       templates: tuple[str, ...], candidates: list[list[str]]) -> dict[str, Any]:
    """Top-1 on ``val`` of the zero-shot head and of each description head; ``chosen`` = the best
    description set (the first on a tie)."""
    feats = embed_images(model, val.dataset(preprocess), desc="description check")
    device = next(model.parameters()).device
    head = zero_shot_classifier(model, tokenizer, val.classnames, templates)
    default = top1(head(feats.to(device)).argmax(1).cpu().numpy(), val.labels)
    scores = []
    for descriptions in candidates:
        t = encode_texts(model, tokenizer, descriptions).to(device)
        scores.append(top1((feats.to(device) @ t.t()).argmax(1).cpu().numpy(), val.labels))
    chosen = max(range(len(scores)), key=lambda k: (scores[k], -k))
    return {"split": "val", "images": len(val), "default_head_top1": default, "chosen": chosen,
            "candidates": [{"top1": s, "descriptions": dict(zip(val.classnames, d, strict=True))}
                           for s, d in zip(scores, candidates, strict=True)]}


def choose_descriptions(model: nn.Module, tokenizer: Callable, preprocess: Callable, spec: BenchmarkSpec,
                        val: ClassificationSet, templates: tuple[str, ...], limit: int | None) -> dict[str, Any]:
    """Score the spec's candidate sets on ID validation (at most ``limit`` images) and log the result."""
    report = score_descriptions(model, tokenizer, preprocess, val.subset(limit), templates,
                                description_candidates(spec))
    best = report["candidates"][report["chosen"]]["top1"]
    log.info("DRM descriptions on ID val: %s; zero-shot head %.1f%% -> set %d",
             ", ".join(f"set {k} {100 * c['top1']:.1f}%" for k, c in enumerate(report["candidates"])),
             100 * report["default_head_top1"], report["chosen"])
    if best < report["default_head_top1"]:
        log.warning("the best description head (%.1f%%) is below the zero-shot head (%.1f%%) on ID val: DRM's "
                    "worst-case term will pull toward worse predictions", 100 * best,
                    100 * report["default_head_top1"])
    return report
