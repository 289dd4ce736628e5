"""Training data: images with FLYP-style class captions (classification) or their own captions (retrieval).

Batches are drawn by a step-indexed sampler: batch ``s`` is a pure function of
``(seed, s)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from radapter.data import formats
from radapter.data.benchmark_spec import BenchmarkSpec
from radapter.data.benchmarks import Benchmark, load_benchmark
from radapter.data.sets import ClassificationSet, ImageDataset, ImageSource, RetrievalSet
from radapter.errors import RAdapterError
from radapter.evaluation.zero_shot import read_templates, render

from .config import TrainConfig


@dataclass
class TrainData:
    """What the loop trains on, plus what the final evaluation needs."""

    images: ImageSource
    labels: np.ndarray  # positives share a label: the class, or the image for retrieval
    captions: list[list[str]]  # candidate captions, indexed by ``caption_key``
    caption_key: np.ndarray
    classnames: list[str] = field(default_factory=list)  # prompt names of the trained classes
    templates: tuple[str, ...] = ()
    descriptions: list[str] = field(default_factory=list)  # per trained class (DRM)
    spec_descriptions: list[str] = field(default_factory=list)  # per benchmark class: what evaluation uses
    bench: Benchmark | None = None
    class_subset: list[int] | None = None  # base-to-novel: the trained classes (indices into the spec)

    def __len__(self) -> int:
        return len(self.labels)

    def set_descriptions(self, per_class: list[str]) -> None:
        """DRM's descriptions, one per benchmark class; the trained classes (base-to-novel) get theirs."""
        self.spec_descriptions = list(per_class)
        self.descriptions = list(per_class) if self.class_subset is None else [per_class[c] for c in self.class_subset]

    def dataset(self, transform) -> ImageDataset:
        return ImageDataset(self.images, np.arange(len(self.labels)), transform)

    def pick_captions(self, index: Sequence[int], seed: int, step: int) -> list[str]:
        """One caption per example, drawn deterministically from ``(seed, step)``."""
        g = np.random.default_rng([seed, step, 7])
        return [self.captions[k][int(g.integers(len(self.captions[k])))] for k in self.caption_key[list(index)]]


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the index lists of global batches ``start_step, ..., total_steps - 1``.

    Each epoch is a permutation seeded by ``(seed, epoch)``; a partial last batch is dropped.
    With several processes, each takes its contiguous slice of the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if n < batch_size:
            raise RAdapterError(f"{n} training examples is fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise RAdapterError(f"batch size {batch_size} does not split over {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // batch_size

    def global_batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.total_steps):
            yield self.global_batch(step)[self.rank * local:(self.rank + 1) * local]

    def __len__(self) -> int:
        return self.total_steps - self.start_step


def _few_shot(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]))


def _limit(n: int, limit: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n)
    return idx if limit is None or limit >= n else np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _templates(cfg: TrainConfig, spec: BenchmarkSpec | None) -> tuple[str, ...]:
    if cfg.templates:
        return read_templates(cfg.templates)
    return spec.templates if spec and spec.templates else read_templates("openai")


def base_novel_split(n_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first half of the classes (in the benchmark's order), novel = the rest."""
    half = (n_classes + 1) // 2
    return list(range(half)), list(range(half, n_classes))


def _classification_data(cfg: TrainConfig, train: ClassificationSet, spec: BenchmarkSpec | None,
                         bench: Benchmark | None, descriptions: list[str]) -> TrainData:
    idx = np.arange(len(train))
    subset = None
    if cfg.base_to_novel:
        subset, _ = base_novel_split(len(train.classnames))
        idx = idx[np.isin(train.labels, subset)]
    labels = train.labels[idx]
    if cfg.shots:
        idx = idx[_few_shot(labels, cfg.shots, cfg.seed)]
    idx = idx[_limit(len(idx), cfg.train_limit, cfg.seed)]
    templates = _templates(cfg, spec)
    names = list(train.classnames)
    labels = train.labels[idx]
    all_descriptions = list(descriptions)
    if subset is not None:  # relabel into the trained classes only
        remap = {c: k for k, c in enumerate(subset)}
        labels = np.array([remap[int(c)] for c in labels])
        names = [names[c] for c in subset]
        descriptions = [descriptions[c] for c in subset] if descriptions else []
    captions = [[render(t, n) for t in templates] for n in names]
    images = train.images[idx] if isinstance(train.images, np.ndarray) else [train.images[i] for i in idx]
    return TrainData(images, labels, captions, labels.copy(), names, templates, descriptions, all_descriptions,
                     bench, subset)


def _retrieval_data(cfg: TrainConfig, rset: RetrievalSet, bench: Benchmark | None, template: str) -> TrainData:
    owner = rset.caption_image
    captions = [[render(template, c) for c, o in zip(rset.captions, owner, strict=True) if o == i]
                for i in range(len(rset.images))]
    keep = _limit(len(rset.images), cfg.train_limit, cfg.seed)
    images = rset.images[keep] if isinstance(rset.images, np.ndarray) else [rset.images[i] for i in keep]
    return TrainData(images, np.arange(len(keep)), [captions[i] for i in keep], np.arange(len(keep)),
                     bench=bench)


def build_train_data(cfg: TrainConfig) -> TrainData:
    """Training data for a config: a prepared benchmark, an image folder, or a caption table."""
    if cfg.train_table:
        return _retrieval_data(cfg, formats.image_text_table(cfg.train_table), None, "{}")
    if cfg.train_folder:
        imagenet = cfg.classnames == "imagenet"
        train = formats.image_folder(cfg.train_folder, None if imagenet else cfg.classnames)
        if imagenet:  # ImageNet train folders are the 1000 WordNet ids, in class-index order
            if len(train.classnames) != 1000:
                raise RAdapterError(f"--classnames imagenet needs 1000 <wnid> folders, found {len(train.classnames)}")
            train.classnames = list(IMAGENET_CLASSNAMES)
        descriptions = _user_descriptions(Path(cfg.train_folder), train.classnames)
        spec = BenchmarkSpec("user", "classification", "", tuple(train.classnames), tuple(train.classnames),
                             _templates(cfg, None), dict(zip(train.classnames, descriptions, strict=False)))
        bench = Benchmark(spec=spec, train=train)
        for split, folder in (("val", cfg.val_folder), ("test", cfg.test_folder)):
            if folder:
                held_out = formats.image_folder(folder, None if imagenet else cfg.classnames)
                setattr(bench, split, ClassificationSet(held_out.name, held_out.images, held_out.labels,
                                                        train.classnames))
        return _classification_data(cfg, train, spec, bench, descriptions)
    if not cfg.benchmark:
        raise RAdapterError("no training data: give --benchmark, --train-folder or --train-table")
    bench = load_benchmark(cfg.benchmark, cfg.data_dir)
    if cfg.task == "retrieval":
        if "google-train" not in bench.retrieval:
            raise RAdapterError(f"benchmark {cfg.benchmark!r} has no retrieval training set")
        return _retrieval_data(cfg, bench.retrieval["google-train"], bench,
                               bench.spec.extra.get("caption_template", "{}"))
    descriptions = bench.spec.description_list() if bench.spec.descriptions else []
    return _classification_data(cfg, bench.train, bench.spec, bench, descriptions)


def _user_descriptions(folder: Path, classnames: list[str]) -> list[str]:
    """Descriptions cached next to the dataset by ``python -m train.describe`` (empty if none)."""
    from .describe import cache_path, load_cached

    cached = load_cached(cache_path(folder))
    return [cached[c] for c in classnames] if cached and all(c in cached for c in classnames) else []
