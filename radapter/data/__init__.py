"""Benchmarks (prepared offline from registry data), dataset readers and evaluation sets."""

import lazy_loader as _lazy

# Submodules load on first attribute access too (``radapter.data.sets`` without an import), as they did
# when the package imported them all; __all__ lists the public names only.
_SUBMODULES = [
    "benchmark_spec", "benchmarks", "cache", "composite", "formats", "prepare", "sets",
]
__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, submod_attrs={
    "benchmark_spec": ["BenchmarkSpec", "get_spec", "list_benchmarks"],
    "benchmarks": ["Benchmark", "BenchmarkNotPrepared", "load_benchmark"],
    "cache": ["data_dir"],
    "composite": ["background_crop", "paste_object", "sample_photo"],
    "formats": ["DatasetFormatError", "coco_captions", "image_folder", "image_text_table", "imagenet_family"],
    "sets": ["ClassificationSet", "ImageDataset", "ImageLoadError", "RetrievalSet", "SegmentationSet", "open_image"],
})
__all__ = [name for name in __all__ if name not in _SUBMODULES]
