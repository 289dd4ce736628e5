"""Quick sanity numbers for the offline default model, on sample photos and *train* data only.

    python -m radapter.models.offline.sanity                 # build time, fingerprint, photos, speed
    python -m radapter.models.offline.sanity --fmnist 2000   # + zero-shot on Fashion-MNIST train images

Fashion-MNIST images are white-on-black 28 x 28; they are inverted to dark-on-white (like
product photos) and read from the Debian ``dataset-fashion-mnist`` files. Only the train
split is read: these numbers choose nothing that a test set should judge.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from ...adapters.fingerprint import compute_fingerprint
from ...evaluation.zero_shot import OPENAI_TEMPLATES, SIMPLE_TEMPLATES, render
from ..registry import DEFAULT_MODEL, load_model

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_NAMES = {
    "pullover": ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "handbag",
                 "ankle boot"),
    "sweater": ("t-shirt", "trousers", "sweater", "dress", "coat", "sandal", "shirt", "sneaker", "handbag",
                "ankle boot"),
}
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_train(n: int, seed: int = 0) -> tuple[list[Image.Image], torch.Tensor]:
    """``n`` random Fashion-MNIST *train* images (inverted to dark-on-white, RGB) and labels."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"no Fashion-MNIST in {FMNIST_DIR}: apt-get install dataset-fashion-mnist")
    images = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    pick = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return ([Image.fromarray(255 - images[i]).convert("RGB") for i in pick],
            torch.from_numpy(labels[pick].astype(np.int64)))


@torch.inference_mode()
def encode_images(model: torch.nn.Module, preprocess, images: list[Image.Image], batch: int = 64) -> torch.Tensor:
    return torch.cat([model.encode_image(torch.stack([preprocess(im) for im in images[i:i + batch]]))
                      for i in range(0, len(images), batch)])


def class_rows(model, tokenizer, names, templates) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: CLIP-style weights (mean of normalised embeddings, normalised) and raw bridge rows (mean)."""
    texts = [render(t, n) for n in names for t in templates]
    with torch.inference_mode():
        raw = torch.cat([model.encode_text(tokenizer(texts[i:i + 256])) for i in range(0, len(texts), 256)])
    raw = raw.view(len(names), len(templates), -1).float()
    return F.normalize(F.normalize(raw, dim=-1).mean(1), dim=-1), raw.mean(1)


def images_per_second(model, channels_last: bool, batch: int = 32, reps: int = 3) -> float:
    model.visual.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = torch.randn(batch, 3, 224, 224)
    times = []
    with torch.inference_mode():
        model.encode_image(x)
        for _ in range(reps):
            start = time.perf_counter()
            model.encode_image(x)
            times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmnist", type=int, default=0, help="how many Fashion-MNIST train images to classify")
    parser.add_argument("--no-speed", action="store_true", help="skip the image throughput measurement")
    args = parser.parse_args(argv)

    times = []
    for _ in range(2):  # the first build also loads timm's and transformers' lazy modules
        start = time.perf_counter()
        model, preprocess, tokenizer = load_model()
        times.append(time.perf_counter() - start)
    print(f"model {DEFAULT_MODEL}: build {times[0]:.1f} s (first in the process), {times[1]:.1f} s (again); "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"fingerprint {compute_fingerprint(model)}")

    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in PHOTOS]
    weights, _ = class_rows(model, tokenizer, IMAGENET_CLASSNAMES, SIMPLE_TEMPLATES)
    scores = F.normalize(encode_images(model, preprocess, photos), dim=-1) @ weights.T
    for name, row in zip(PHOTOS, scores, strict=True):
        print(f"  {name:>9}: " + ", ".join(IMAGENET_CLASSNAMES[i] for i in row.topk(3).indices))

    if not args.no_speed:
        for cl in (False, True):
            print(f"encode_image, batch 32, 224 px, channels_last={cl}: {images_per_second(model, cl):.1f} img/s")
        model.visual.to(memory_format=torch.channels_last)

    if args.fmnist:
        images, labels = fmnist_train(args.fmnist)
        feats = encode_images(model, preprocess, images).float()
        chance = float(torch.bincount(labels).max()) / len(labels)
        print(f"Fashion-MNIST train, {len(labels)} images (majority class {100 * chance:.1f}%):")
        for templates, tname in ((OPENAI_TEMPLATES, "80 OpenAI templates"), (SIMPLE_TEMPLATES, "'a photo of a {}.'")):
            for key, names in FMNIST_NAMES.items():
                weights, raw = class_rows(model, tokenizer, names, templates)
                cos = (F.normalize(feats, dim=-1) @ weights.T).argmax(1).eq(labels).float().mean()
                dot = (feats @ raw.T).argmax(1).eq(labels).float().mean()
                print(f"  {tname:>20}, '{key}': cosine (the model) {100 * cos:.1f}%, raw bridge dot {100 * dot:.1f}%")


if __name__ == "__main__":
    main()
