"""Evaluation: the harness (benchmarks, alpha sweeps, retrieval), metrics, zero-shot heads, segmentation."""

import lazy_loader as _lazy

# Submodules load on first attribute access too (``radapter.evaluation.harness`` without an import), as they did
# when the package imported them all; __all__ lists the public names only.
_SUBMODULES = [
    "cli", "harness", "metrics", "segmentation", "zero_shot",
]
__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, submod_attrs={
    "harness": [
        "alpha_grid", "alpha_sweep", "classification_metrics", "default_head_builder", "embed_images",
        "evaluate_benchmark", "evaluate_benchmark_classification", "evaluate_classification", "evaluate_retrieval",
        "plot_alpha_sweep", "summarise",
    ],
})
__all__ = [name for name in __all__ if name not in _SUBMODULES]
