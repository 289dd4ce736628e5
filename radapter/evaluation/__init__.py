"""Evaluation: the harness (benchmarks, alpha sweeps, retrieval), metrics, zero-shot heads, segmentation."""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "harness": [
        "alpha_grid", "alpha_sweep", "classification_metrics", "default_head_builder", "embed_images",
        "evaluate_benchmark", "evaluate_benchmark_classification", "evaluate_classification", "evaluate_retrieval",
        "plot_alpha_sweep", "summarise",
    ],
})
