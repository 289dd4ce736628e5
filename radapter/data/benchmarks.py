"""Load prepared benchmarks as evaluation sets: ID splits, named OOD sets, retrieval, segmentation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RAdapterError
from .benchmark_spec import BenchmarkSpec, get_spec
from .cache import data_dir
from .prepare import is_prepared
from .sets import ClassificationSet, RetrievalSet, SegmentationSet


class BenchmarkNotPrepared(RAdapterError):
    """The benchmark's prepared data is missing from the data folder."""


@dataclass
class Benchmark:
    """A benchmark: its spec, ID splits, named OOD sets, and optional retrieval/segmentation sets."""

    spec: BenchmarkSpec
    train: ClassificationSet | None = None
    val: ClassificationSet | None = None
    test: ClassificationSet | None = None
    ood: dict[str, ClassificationSet] = field(default_factory=dict)
    retrieval: dict[str, RetrievalSet] = field(default_factory=dict)
    segmentation: dict[str, SegmentationSet] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


def _folder(name: str, root: str | Path | None) -> Path:
    folder = data_dir(root) / name
    if not is_prepared(folder):
        raise BenchmarkNotPrepared(f"benchmark {name!r} is not prepared in {folder.parent}: "
                                   f"run `python -m radapter.data.prepare {name}`")
    return folder


def _classification(folder: Path, file: str, name: str, spec: BenchmarkSpec) -> ClassificationSet:
    """One split; where the file has each image's background group, groups = class x background."""
    with np.load(folder / file) as z:
        groups = None
        if "backgrounds" in z.files:
            groups = z["labels"] * len(spec.extra["backgrounds"]) + z["backgrounds"]
        return ClassificationSet(name, z["images"], z["labels"], list(spec.prompt_names), groups=groups,
                                 min_group_size=int(spec.extra.get("min_group_images", 1)))


def _load_array_benchmark(name: str, root: str | Path | None) -> Benchmark:
    spec, folder = get_spec(name), _folder(name, root)
    b = Benchmark(spec=spec)
    b.train, b.val, b.test = (
        _classification(folder, f"{s}.npz", f"{name}-{s}", spec) for s in ("train", "val", "test")
    )
    for path in sorted(folder.glob("ood_*.npz")):
        ood = path.stem[len("ood_"):]
        b.ood[ood] = _classification(folder, path.name, f"{name}-{ood}", spec)
    return b


def _load_emoji(root: str | Path | None) -> Benchmark:
    spec, folder = get_spec("emoji"), _folder("emoji", root)
    meta = json.loads((folder / "emoji_meta.json").read_text())
    labels = np.array([spec.classnames.index(m["category"]) for m in meta])
    splits = np.array([m["split"] for m in meta])
    b = Benchmark(spec=spec)
    for style in ("google", "twitter"):
        with np.load(folder / f"{style}.npz") as z:
            images = z["images"]
        for split in ("train", "val", "test", "all"):
            idx = np.arange(len(meta)) if split == "all" else np.flatnonzero(splits == split)
            cls = ClassificationSet(f"emoji-{style}-{split}", images[idx], labels[idx], list(spec.prompt_names))
            captions, owner = [], []
            for row, i in enumerate(idx):
                captions += meta[i]["captions"]
                owner += [row] * len(meta[i]["captions"])
            b.retrieval[f"{style}-{split}"] = RetrievalSet(f"emoji-{style}-{split}", images[idx], captions,
                                                           np.array(owner), [meta[i] for i in idx])
            if style == "google" and split != "all":
                setattr(b, split, cls)
            elif style == "twitter" and split == "test":
                b.ood["twitter"] = cls
    return b


def _load_segmentation(root: str | Path | None) -> Benchmark:
    spec, folder = get_spec("segmentation"), _folder("segmentation", root)
    objects = json.loads((folder / "objects.json").read_text())
    names = [[o["name"] for o in objs] for objs in objects]
    b = Benchmark(spec=spec)
    for style in ("google", "twitter"):
        with np.load(folder / f"{style}.npz") as z:
            b.segmentation[style] = SegmentationSet(f"segmentation-{style}", z["images"], z["masks"], names)
    return b


def load_benchmark(name: str, root: str | Path | None = None) -> Benchmark:
    """Load a prepared benchmark (``fmnist``, ``digits``, ``emoji``, ``segmentation`` or ``emoji-backgrounds``).

    ``root`` overrides the data folder (default ``$RADAPTER_DATA`` or ``~/.cache/radapter/data``).
    """
    if name in ("fmnist", "digits", "emoji-backgrounds"):
        return _load_array_benchmark(name, root)
    if name == "emoji":
        return _load_emoji(root)
    if name == "segmentation":
        return _load_segmentation(root)
    raise RAdapterError(f"unknown benchmark {name!r}; choose from fmnist, digits, emoji, segmentation, "
                        "emoji-backgrounds")
