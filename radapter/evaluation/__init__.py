"""Evaluation: the harness (benchmarks, alpha sweeps, retrieval), metrics, zero-shot heads, segmentation."""

from .harness import (
    alpha_grid,
    alpha_sweep,
    classification_metrics,
    default_head_builder,
    embed_images,
    evaluate_benchmark,
    evaluate_benchmark_classification,
    evaluate_classification,
    evaluate_retrieval,
    plot_alpha_sweep,
    summarise,
)

__all__ = [
    "alpha_grid", "alpha_sweep", "classification_metrics", "default_head_builder", "embed_images",
    "evaluate_benchmark", "evaluate_benchmark_classification", "evaluate_classification", "evaluate_retrieval",
    "plot_alpha_sweep", "summarise",
]
