"""The emoji-backgrounds shift for one image: the same emoji on its class's training background
and on another one, cropped and pasted exactly as the benchmark does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from radapter.data import background_crop, get_spec, paste_object
from radapter.data.cache import data_dir
from radapter.data.prepare import is_prepared

from .service import InputError

BENCHMARK = "emoji-backgrounds"
SHOWN = 192  # px: the benchmark's 96 px composite, enlarged for the page (the model resizes it anyway)


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "little")


class BackgroundShift:
    """Test-split emoji of the prepared emoji benchmark, placed on the emoji-backgrounds backgrounds."""

    def __init__(self, data: str | Path | None = None) -> None:
        self.spec = get_spec(BENCHMARK)
        cfg = self.spec.extra
        self.backgrounds = dict(zip(cfg["background_names"], cfg["backgrounds"], strict=True))
        self.classnames = list(self.spec.prompt_names)
        self._root = data_dir(data)
        self._emoji: dict[str, tuple[int, int]] | None = None  # name -> (row in google.npz, class)
        self._images: np.ndarray | None = None

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._emoji is None:
            folder = self._root / "emoji"
            self._emoji = {}
            if is_prepared(folder):
                owner = {sub: k for k, name in enumerate(self.spec.classnames)
                         for sub in self.spec.extra["subcategories"][name]}
                meta = json.loads((folder / "emoji_meta.json").read_text())
                self._emoji = {m["name"]: (i, owner[m["subcategory"]]) for i, m in enumerate(meta)
                               if m["split"] == "test" and m["subcategory"] in owner}
                with np.load(folder / "google.npz") as z:
                    self._images = z["images"]
        return self._emoji

    def emoji_names(self) -> list[str]:
        return sorted(self._load())

    def training_background(self, label: int) -> str:
        """The background name tied to class ``label`` in training."""
        return self.spec.extra["background_names"][self.spec.extra["class_background"][label]]

    def _composite(self, rgba: np.ndarray, background: str, key: str) -> np.ndarray:
        cfg = self.spec.extra
        size = cfg["image_size"]
        lo, hi = cfg["object_size"]
        place = np.random.default_rng(_seed(key))  # the same size and spot on every background
        s = int(place.integers(lo, hi + 1))
        spot = (int(place.integers(0, size - s + 1)), int(place.integers(0, size - s + 1)))
        bg = background_crop(self.backgrounds[background], size, np.random.default_rng(_seed(key, background)))
        image, _ = paste_object(rgba, bg, s, spot)
        return np.asarray(Image.fromarray(image).resize((SHOWN, SHOWN), Image.BICUBIC))

    def emoji_pair(self, name: str, background: str) -> tuple[np.ndarray, np.ndarray, str, str]:
        """``(on its training background, on background, its class, its training background)``."""
        emoji = self._load()
        if not emoji:
            raise InputError("The background shift needs the prepared emoji benchmark: "
                             "python -m radapter.data.prepare emoji")
        if name not in emoji:
            raise InputError(f"Unknown emoji {name!r}: pick one from the list.")
        if background not in self.backgrounds:
            raise InputError(f"Unknown background {background!r}: pick one from the list.")
        row, label = emoji[name]
        own = self.training_background(label)
        rgba = self._images[row]
        return self._composite(rgba, own, name), self._composite(rgba, background, name), self.classnames[label], own

    def paste(self, image: np.ndarray, background: str) -> np.ndarray:
        """A user's RGB image pasted, whole, onto ``background`` as the benchmark pastes an emoji."""
        if background not in self.backgrounds:
            raise InputError(f"Unknown background {background!r}: pick one from the list.")
        side = max(image.shape[:2])
        square = np.full((side, side, 4), 0, np.uint8)  # letterboxed: the padding stays transparent
        r, c = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
        square[r:r + image.shape[0], c:c + image.shape[1], :3] = image
        square[r:r + image.shape[0], c:c + image.shape[1], 3] = 255
        small = np.asarray(Image.fromarray(square).resize((64, 64), Image.LANCZOS))
        return self._composite(small, background, f"upload/{image.shape}")

    def conflicting(self, name: str | None) -> str:
        """A background other than emoji ``name``'s training one (the first such; any if unknown)."""
        names = list(self.backgrounds)
        emoji = self._load()
        if name not in emoji:
            return names[0]
        own = self.training_background(emoji[name][1])
        return next(b for b in names if b != own)

    def available(self) -> bool:
        return bool(self._load())
