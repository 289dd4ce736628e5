"""Benchmarks (prepared offline from registry data), dataset readers and evaluation sets."""

from .benchmark_spec import BenchmarkSpec, get_spec, list_benchmarks
from .benchmarks import Benchmark, BenchmarkNotPrepared, load_benchmark
from .cache import data_dir
from .formats import DatasetFormatError, coco_captions, image_folder, image_text_table, imagenet_family
from .sets import ClassificationSet, ImageDataset, ImageLoadError, RetrievalSet, SegmentationSet, open_image

__all__ = [
    "Benchmark", "BenchmarkNotPrepared", "BenchmarkSpec", "ClassificationSet", "DatasetFormatError", "ImageDataset",
    "ImageLoadError", "RetrievalSet", "SegmentationSet", "coco_captions", "data_dir", "get_spec", "image_folder",
    "image_text_table", "imagenet_family", "list_benchmarks", "load_benchmark", "open_image",
]
