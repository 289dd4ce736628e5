"""In-memory evaluation sets: images (arrays or files) with labels or captions.

An image source is either a uint8 array ``(N, H, W)`` / ``(N, H, W, 3)`` or a list of
file paths. Sets hand out torch Datasets that apply a model's preprocess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import RAdapterError

ImageSource = np.ndarray | Sequence[str | Path]

#: Refuse decompression bombs (one clip-art PNG in the wild has 231 Mpx).
MAX_PIXELS = 50_000_000


class ImageLoadError(RAdapterError):
    """An image file is missing, corrupt, or too large."""


def open_image(source: str | Path | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path or a uint8 array, with one-line errors."""
    if isinstance(source, np.ndarray):
        img = Image.fromarray(source)
        if img.mode == "RGBA":  # emoji keep their alpha channel: show them on white
            return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
        return img.convert("RGB")
    path = Path(source)
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageLoadError(f"{path}: {img.width}x{img.height} pixels is more than the {MAX_PIXELS:,} allowed")
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, img).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path} is not a readable image ({type(e).__name__})") from None


class ImageDataset(torch.utils.data.Dataset):
    """``(preprocessed image, target)`` pairs for a DataLoader."""

    def __init__(self, images: ImageSource, targets: Sequence[Any] | np.ndarray, transform: Callable) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return self.transform(open_image(self.images[i])), self.targets[i]


def _take(images: ImageSource, idx: np.ndarray) -> ImageSource:
    return images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]


@dataclass
class ClassificationSet:
    """Images with integer labels into ``classnames``."""

    name: str
    images: ImageSource
    labels: np.ndarray
    classnames: list[str]
    #: For sets labelled in a subset or grouping of a larger head (ImageNet-R/-A: 200 of the
    #: 1000 classes; ObjectNet: 113 groups): class k here = head classes ``class_index[k]``
    #: (logits are max-pooled over a group). ``None``: the head's classes are this set's.
    class_index: list[list[int]] | None = None
    #: Optional group of each image (spurious-correlation benchmarks: class x background), for
    #: worst-group accuracy over groups of at least ``min_group_size`` images.
    groups: np.ndarray | None = None
    min_group_size: int = 1

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if len(self.groups) != len(self.labels):
                raise ValueError(f"{self.name}: {len(self.labels)} labels but {len(self.groups)} groups")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise ValueError(f"{self.name}: labels outside 0..{len(self.classnames) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, transform: Callable) -> ImageDataset:
        return ImageDataset(self.images, self.labels, transform)

    def subset(self, n: int | None, seed: int = 0) -> ClassificationSet:
        """A fixed random subset of ``n`` images (all when ``n`` is None or large)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ClassificationSet(self.name, _take(self.images, idx), self.labels[idx], self.classnames,
                                 self.class_index, None if self.groups is None else self.groups[idx],
                                 self.min_group_size)

    def restrict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Map head logits onto this set's classes (identity unless ``class_index`` is set)."""
        if self.class_index is None:
            return logits
        return torch.stack([logits[:, idx].max(dim=1).values for idx in self.class_index], dim=1)


@dataclass
class RetrievalSet:
    """Images and captions; ``caption_image[j]`` is the image caption j describes.

    Several captions may describe one image (all count as positives).
    """

    name: str
    images: ImageSource
    captions: list[str]
    caption_image: np.ndarray
    image_meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.captions) != len(self.caption_image):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but {len(self.caption_image)} links")
        if len(self.caption_image) and self.caption_image.max() >= len(self.images):
            raise ValueError(f"{self.name}: a caption points past the last image")

    def dataset(self, transform: Callable) -> ImageDataset:
        return ImageDataset(self.images, np.arange(len(self.images)), transform)


@dataclass
class SegmentationSet:
    """Images with per-pixel object ids (0 = background) and each object's class name."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8, k = k-th object of the image
    object_names: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)
