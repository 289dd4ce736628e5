"""Objects pasted by their alpha masks onto crops of real photographs (scikit-image's samples).

What the segmentation and emoji-backgrounds benchmarks are made of, and what the app's
OOD tab does to one image: the same crop and paste, so a visitor sees the benchmark's shift.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=32)
def sample_photo(name: str) -> np.ndarray:
    """One of scikit-image's sample images as uint8 RGB."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype != np.uint8:
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def background_crop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (half to all of the short side) of a sample photo, at ``size`` px."""
    img = sample_photo(name)
    side = int(min(img.shape[:2]) * rng.uniform(0.5, 1.0))
    r, c = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
    crop = Image.fromarray(img[r:r + side, c:c + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def paste_object(rgba: np.ndarray, background: np.ndarray, size: int, spot: tuple[int, int]) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """``rgba`` resized to ``size`` px and pasted by its alpha at ``spot``: (image, object mask)."""
    obj = np.asarray(Image.fromarray(rgba).resize((size, size), Image.LANCZOS)).astype(np.float32)
    r, c = spot
    canvas = background.astype(np.float32).copy()
    a = obj[:, :, 3:] / 255.0
    canvas[r:r + size, c:c + size] = a * obj[:, :, :3] + (1 - a) * canvas[r:r + size, c:c + size]
    mask = np.zeros(background.shape[:2], bool)
    mask[r:r + size, c:c + size] = obj[:, :, 3] >= 128
    return canvas.round().astype(np.uint8), mask
