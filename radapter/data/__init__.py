"""Benchmarks (prepared offline from registry data), dataset readers and evaluation sets."""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "benchmark_spec": ["BenchmarkSpec", "get_spec", "list_benchmarks"],
    "benchmarks": ["Benchmark", "BenchmarkNotPrepared", "load_benchmark"],
    "cache": ["data_dir"],
    "formats": ["DatasetFormatError", "coco_captions", "image_folder", "image_text_table", "imagenet_family"],
    "sets": ["ClassificationSet", "ImageDataset", "ImageLoadError", "RetrievalSet", "SegmentationSet", "open_image"],
})
