"""Readers for the formats real users bring: image folders, caption tables, COCO, ImageNet family.

All readers return :mod:`radapter.data.sets` objects holding file paths (images are
opened lazily, with one-line errors for missing or corrupt files).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from ..errors import RAdapterError
from .sets import ClassificationSet, RetrievalSet

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jpe"}


class DatasetFormatError(RAdapterError):
    """A dataset folder or file does not have the expected layout."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_classnames(path: Path, folders: list[str]) -> list[str]:
    """One name per line in sorted-folder order, or ``folder<TAB or comma>name`` lines."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    pairs = [ln.split("\t", 1) if "\t" in ln else ln.split(",", 1) for ln in lines]
    if all(len(p) == 2 for p in pairs) and {p[0].strip() for p in pairs} >= set(folders):
        mapping = {p[0].strip(): p[1].strip() for p in pairs}
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise DatasetFormatError(f"{path} has {len(lines)} names for {len(folders)} class folders")
    return lines


def image_folder(root: str | Path, classnames_file: str | Path | None = None, name: str | None = None,
                 class_folders: list[str] | None = None) -> ClassificationSet:
    """An ImageFolder tree ``root/<class>/<image>``; class order = sorted folder names
    (or ``class_folders``, e.g. to align an OOD set with the ID classes)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"image folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    folders = class_folders or found
    missing = sorted(set(folders) - set(found))
    if not folders or (class_folders is None and missing):
        raise DatasetFormatError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    classnames = _read_classnames(Path(classnames_file), folders) if classnames_file else list(folders)
    images, labels = [], []
    for k, folder in enumerate(folders):
        if folder in missing:
            continue
        files = _images_in(root / folder)
        images += [str(f) for f in files]
        labels += [k] * len(files)
    if not images:
        raise DatasetFormatError(f"{root} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ClassificationSet(name or root.name, images, np.array(labels), classnames)


_IMAGE_KEYS = ("image", "filepath", "file", "path", "image_path")
_CAPTION_KEYS = ("caption", "text", "title", "sentence")
_GROUP_KEYS = ("group", "group_id", "image_id")


def _pick(row: dict, keys: Iterable[str], what: str, source: Path) -> str | None:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return str(row[k])
    if what:
        raise DatasetFormatError(f"{source}: a row has no {what} column (one of {', '.join(keys)})")
    return None


def image_text_table(path: str | Path, image_root: str | Path | None = None, name: str | None = None) -> RetrievalSet:
    """CSV (with a header) or JSONL of ``image, caption[, group]``.

    Rows naming the same image (or the same group id) share one image: several captions
    per image are all positives. Relative image paths are resolved against ``image_root``
    (default: the table's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"caption table not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}: not JSON lines ({e.msg} at line {e.lineno})") from None
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise DatasetFormatError(f"{path} has no rows")
    base = Path(image_root) if image_root else path.parent
    keys: dict[str, int] = {}
    images, captions, owner = [], [], []
    for row in rows:
        image = _pick(row, _IMAGE_KEYS, "image", path)
        caption = _pick(row, _CAPTION_KEYS, "caption", path)
        group = _pick(row, _GROUP_KEYS, "", path) or image
        if group not in keys:
            keys[group] = len(images)
            images.append(str(image if Path(image).is_absolute() else base / image))
        captions.append(caption)
        owner.append(keys[group])
    return RetrievalSet(name or path.stem, images, captions, np.array(owner))


def coco_captions(annotations: str | Path, image_dir: str | Path, name: str | None = None) -> RetrievalSet:
    """COCO captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``)."""
    annotations = Path(annotations)
    try:
        data = json.loads(annotations.read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = [(a["image_id"], a["caption"].strip()) for a in data["annotations"]]
    except FileNotFoundError:
        raise DatasetFormatError(f"COCO captions file not found: {annotations}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetFormatError(f"{annotations} is not a COCO captions file ({type(e).__name__}: {e})") from None
    ids = sorted(files)
    row = {i: k for k, i in enumerate(ids)}
    kept = [(i, c) for i, c in anns if i in row]
    return RetrievalSet(name or annotations.stem, [str(Path(image_dir) / files[i]) for i in ids],
                        [c for _, c in kept], np.array([row[i] for i, _ in kept]))


# ---------------------------------------------------------------- ImageNet family
def _timm_info(name: str) -> list[str]:
    """Non-empty lines of one of timm's ImageNet metadata files."""
    from importlib import resources

    text = resources.files("timm.data._info").joinpath(name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (from timm's metadata)."""
    return _timm_info("imagenet_synsets.txt")


def _wnid_folder_set(root: Path, wnids: list[str], name: str) -> ClassificationSet:
    """Folders named by WordNet id, labelled in ImageNet-1k index space, restricted to ``wnids``."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise DatasetFormatError(f"{name}: unknown WordNet ids {unknown[:3]}")
    subset = [index[w] for w in wnids]
    images, labels = [], []
    for k, w in enumerate(wnids):
        files = _images_in(root / w) if (root / w).is_dir() else []
        images += [str(f) for f in files]
        labels += [k] * len(files)
    if not images:
        raise DatasetFormatError(f"{root} has no <wnid>/<image> folders for {name}")
    return ClassificationSet(name, images, np.array(labels), [IMAGENET_CLASSNAMES[i] for i in subset],
                             None if len(subset) == 1000 else [[i] for i in subset])


def imagenet_family(kind: str, root: str | Path, objectnet_mapping: str | Path | None = None) -> ClassificationSet:
    """An ImageNet evaluation set from its published folder layout, labelled for a 1000-class head.

    kinds: ``imagenet`` (val, ``<wnid>/`` folders), ``imagenet-v2`` (``0/`` .. ``999/``),
    ``imagenet-sketch`` (``<wnid>/``), ``imagenet-r`` / ``imagenet-a`` (their 200 ``<wnid>/``
    folders), ``objectnet`` (``images/<label>/`` + ``mappings/``: 113 classes mapped to ImageNet).
    Sets on a subset carry ``class_index`` so a 1000-class zero-shot head scores them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{kind} folder not found: {root}")
    if kind in ("imagenet", "imagenet-sketch"):
        return _wnid_folder_set(root, imagenet_wnids(), kind)
    if kind == "imagenet-r":
        return _wnid_folder_set(root, _timm_info("imagenet_r_synsets.txt"), kind)
    if kind == "imagenet-a":
        return _wnid_folder_set(root, _timm_info("imagenet_a_synsets.txt"), kind)
    if kind == "imagenet-v2":
        images, labels = [], []
        for k in range(1000):
            files = _images_in(root / str(k)) if (root / str(k)).is_dir() else []
            images += [str(f) for f in files]
            labels += [k] * len(files)
        if not images:
            raise DatasetFormatError(f"{root} has no 0/ .. 999/ class folders (ImageNetV2 layout)")
        return ClassificationSet(kind, images, np.array(labels), list(IMAGENET_CLASSNAMES))
    if kind == "objectnet":
        return _objectnet(root, objectnet_mapping)
    raise DatasetFormatError(f"unknown ImageNet-family kind {kind!r}")


def _objectnet(root: Path, mapping: str | Path | None) -> ClassificationSet:
    """ObjectNet 1.0: ``mappings/objectnet_to_imagenet_1k.json`` maps an ObjectNet label to
    ImageNet class names separated by '; ' (matched against ImageNet lemmas), and
    ``mappings/folder_to_objectnet_label.json`` maps image folders to labels."""
    mapping = Path(mapping) if mapping else root / "mappings" / "objectnet_to_imagenet_1k.json"
    folders_file = root / "mappings" / "folder_to_objectnet_label.json"
    try:
        to_imagenet = json.loads(mapping.read_text())
        folder_label = json.loads(folders_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"ObjectNet mappings missing or unreadable under {root}/mappings ({e})") from None
    lemma_of = dict(ln.split("\t", 1) for ln in _timm_info("imagenet_synset_to_lemma.txt"))
    wnids = imagenet_wnids()
    by_name: dict[str, int] = {}
    for i, w in enumerate(wnids):
        by_name[lemma_of[w].lower()] = i
        by_name.setdefault(lemma_of[w].split(",")[0].strip().lower(), i)
        by_name.setdefault(IMAGENET_CLASSNAMES[i].lower(), i)
    labels_sorted = sorted(to_imagenet)
    groups = []
    for label in labels_sorted:
        names = [n.strip().lower() for n in to_imagenet[label].split(";") if n.strip()]
        idx = sorted({by_name[n] for n in names if n in by_name})
        if not idx:
            raise DatasetFormatError(f"ObjectNet label {label!r}: none of {names[:3]} is an ImageNet class name")
        groups.append(idx)
    label_index = {label: k for k, label in enumerate(labels_sorted)}
    images, labels = [], []
    base = root / "images" if (root / "images").is_dir() else root
    for folder, label in sorted(folder_label.items()):
        if label in label_index and (base / folder).is_dir():
            files = _images_in(base / folder)
            images += [str(f) for f in files]
            labels += [label_index[label]] * len(files)
    if not images:
        raise DatasetFormatError(f"{root} has no images in the mapped ObjectNet folders")
    return ClassificationSet("objectnet", images, np.array(labels), labels_sorted, groups)

