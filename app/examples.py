"""Example inputs available offline: scikit-image photos, benchmark images and emoji pairs."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from radapter.data.benchmark_spec import get_spec
from radapter.data.cache import data_dir
from radapter.data.prepare import is_prepared

PHOTOS = {"chelsea": "cat, dog, coffee cup, rocket", "coffee": "cat, coffee cup, rocket, astronaut",
          "rocket": "rocket, cat, coffee cup, car", "astronaut": "astronaut, cat, rocket, flag"}


class Examples:
    """Writes example images to a temporary folder once and lists them for ``gr.Examples``."""

    def __init__(self, root: str | Path | None = None, data: str | Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="radapter-examples-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = data_dir(data)
        self._emoji = None

    def _save(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """The example's file, written from ``make()`` the first time (decoding is the cost)."""
        path = self.root / f"{name}.png"
        if not path.exists():
            Image.fromarray(make()).convert("RGB").save(path)
        return str(path)

    def classify_examples(self) -> list[list[str]]:
        import skimage.data

        out = self.background_examples()
        out += [[self._save(n, getattr(skimage.data, n)), classes] for n, classes in PHOTOS.items()]
        fmnist = self.data / "fmnist"
        if is_prepared(fmnist):
            with np.load(fmnist / "test.npz") as z:
                names = ", ".join(get_spec("fmnist").prompt_names)
                out += [[self._save(f"fmnist-{i}", lambda i=i: np.asarray(Image.fromarray(z["images"][i]).resize(
                    (128, 128)))), names] for i in range(3)]
        return out

    def background_examples(self, per_set: int = 2) -> list[list[str]]:
        """emoji-backgrounds test images: on their class's background (ID), then on another (OOD)."""
        folder = self.data / "emoji-backgrounds"
        if not is_prepared(folder):
            return []
        names = ", ".join(get_spec("emoji-backgrounds").prompt_names)
        out = []
        for split in ("test", "ood_conflict"):
            with np.load(folder / f"{split}.npz") as z:
                picks = np.random.default_rng(0).permutation(len(z["labels"]))[:per_set]
                out += [[self._save(f"bg-{split}-{i}", lambda i=i: np.asarray(Image.fromarray(z["images"][i]).resize(
                    (192, 192), Image.BICUBIC))), names] for i in picks]
        return out

    def segment_examples(self) -> list[list[str]]:
        seg = self.data / "segmentation"
        if not is_prepared(seg):
            import skimage.data

            return [[self._save("chelsea", skimage.data.chelsea), "cat, coffee cup"]]
        objects = json.loads((seg / "objects.json").read_text())
        with np.load(seg / "google.npz") as z:
            return [[self._save(f"seg-{i}", lambda i=i: z["images"][i]), ", ".join(o["name"] for o in objects[i])]
                    for i in range(4)]

    def _emoji_data(self):
        if self._emoji is None:
            folder = self.data / "emoji"
            if not is_prepared(folder):
                self._emoji = ({}, None, None)
            else:
                meta = json.loads((folder / "emoji_meta.json").read_text())
                names = {m["name"]: i for i, m in enumerate(meta) if m["split"] == "test"}
                with np.load(folder / "google.npz") as g, np.load(folder / "twitter.npz") as t:
                    self._emoji = (names, g["images"], t["images"])
        return self._emoji

    def emoji_names(self) -> list[str]:
        return sorted(self._emoji_data()[0])

    def emoji_pair(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        names, google, twitter = self._emoji_data()
        if name not in names:
            return None
        i = names[name]

        def on_white(rgba: np.ndarray) -> np.ndarray:
            img = Image.fromarray(rgba)
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(bg, img).convert("RGB").resize((128, 128), Image.NEAREST))

        return on_white(google[i]), on_white(twitter[i])
