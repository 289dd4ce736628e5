"""Collections to index: images and captions with their metadata rows and a content hash.

A collection is read from a spec string:

- ``BENCH:SET``: a prepared benchmark's retrieval set, e.g. ``emoji:google-test`` (images
  and captions; the benchmark's caption template);
- ``folder:PATH`` or an existing folder: every image below it (label = its sub-folder);
- ``table:PATH[,IMAGE_ROOT]`` or a ``.csv``/``.tsv``/``.jsonl`` file: image-caption pairs;
- ``coco:CAPTIONS.json,IMAGE_DIR``: COCO captions;
- ``captions:PATH`` or a ``.txt`` file: one caption per line (text only).

Every item has a digest; the collection hash is the SHA-256 of the sorted digests, so it
names the *set* of items (a folder indexed incrementally and the same folder indexed from
scratch share it). Image files are identified by absolute path, size and modification
time (content is not read); in-memory images by their bytes; captions by the rendered text
and the image they describe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radapter.errors import first_line

from .errors import CollectionError

if TYPE_CHECKING:
    from radapter.data.sets import RetrievalSet

PARTS = ("image", "text")
ImageRef = str | np.ndarray


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_digest(image: ImageRef) -> str:
    """Identity of an image: bytes of an array, or absolute path + size + mtime of a file."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        return _sha(f"array|{arr.dtype}|{arr.shape}|".encode() + arr.tobytes())
    path = Path(image).absolute()
    try:
        st = path.stat()
        stamp = f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return _sha(f"file|{path}|{stamp}".encode())


def text_digest(text: str, image: str | None) -> str:
    """Identity of a caption: the rendered text and the digest of the image it describes."""
    return _sha(f"text|{text}|{image or ''}".encode())


def render(template: str, caption: str) -> str:
    return template.format(caption) if "{}" in template else caption


@dataclass
class Collection:
    """Images and captions to embed, with one metadata row per item.

    ``images[i]`` is a file path or a uint8 array; ``image_rows[i]`` its metadata
    (``path``, ``caption``, ``label``, ``source``). ``texts[j]`` is the text embedded for
    caption j (the caption through the template); ``text_rows[j]`` has ``caption``,
    ``image_id`` (row of the image it describes, or ``None``), ``path``, ``label``, ``source``.
    """

    name: str
    images: list[ImageRef] = field(default_factory=list)
    image_rows: list[dict[str, Any]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_rows: list[dict[str, Any]] = field(default_factory=list)
    caption_template: str = "{}"
    sources: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.image_rows) or len(self.texts) != len(self.text_rows):
            raise ValueError(f"{self.name}: items and metadata rows differ in number")

    def count(self, part: str) -> int:
        return len(self.images) if part == "image" else len(self.texts)

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts with at least one item."""
        return tuple(p for p in PARTS if self.count(p))

    def digests(self, part: str) -> list[str]:
        """Per-item digests, computed once and stored in the rows (``digest``)."""
        rows = self.image_rows if part == "image" else self.text_rows
        if part == "image":
            for img, row in zip(self.images, rows, strict=True):
                if "digest" not in row:
                    row["digest"] = image_digest(img)
        else:
            image_digests = self.digests("image") if self.images else []
            for text, row in zip(self.texts, rows, strict=True):
                if "digest" not in row:
                    i = row.get("image_id")
                    owner = image_digests[i] if i is not None and i < len(image_digests) else row.get("path")
                    row["digest"] = text_digest(text, owner)
        return [r["digest"] for r in rows]

    def hash(self) -> str:
        """Order-independent hash of the items of every part (and so of the caption template)."""
        return collection_hash({p: self.digests(p) for p in PARTS})

    def select(self, parts: Sequence[str]) -> Collection:
        """The same collection with only ``parts`` (caption rows keep their image links)."""
        bad = set(parts) - set(PARTS)
        if bad:
            raise CollectionError(f"unknown part(s) {sorted(bad)}; choose from {PARTS}")
        self.digests("image")
        self.digests("text")
        keep_img, keep_txt = "image" in parts, "text" in parts
        text_rows = self.text_rows if keep_img else [{**r, "image_id": None} for r in self.text_rows]
        return Collection(self.name, self.images if keep_img else [], self.image_rows if keep_img else [],
                          self.texts if keep_txt else [], text_rows if keep_txt else [],
                          self.caption_template, self.sources)

    def subset(self, part: str, keep: Sequence[int]) -> tuple[list[ImageRef] | list[str], list[dict[str, Any]]]:
        """Items and rows of ``part`` at positions ``keep``."""
        items = self.images if part == "image" else self.texts
        rows = self.image_rows if part == "image" else self.text_rows
        return [items[i] for i in keep], [rows[i] for i in keep]


def collection_hash(digests: dict[str, Sequence[str]]) -> str:
    """SHA-256 over the sorted digests of each part."""
    h = hashlib.sha256()
    for part in PARTS:
        h.update(f"{part}:{len(digests.get(part, ()))}\n".encode())
        for d in sorted(digests.get(part, ())):
            h.update(d.encode())
    return h.hexdigest()


def concat(collections: Sequence[Collection], name: str | None = None) -> Collection:
    """One collection holding several (caption rows re-pointed at the shifted image rows)."""
    if len(collections) == 1:
        return collections[0]
    templates = {c.caption_template for c in collections}
    out = Collection(name or "+".join(c.name for c in collections),
                     caption_template=templates.pop() if len(templates) == 1 else "(per source)")
    for c in collections:
        c.digests("image")
        c.digests("text")
        offset = len(out.images)
        out.images += c.images
        out.image_rows += c.image_rows
        out.texts += c.texts
        out.text_rows += [{**r, "image_id": None if r.get("image_id") is None else r["image_id"] + offset}
                          for r in c.text_rows]
        out.sources += c.sources
    return out


# ----------------------------------------------------------------------------- readers
def from_retrieval_set(rset: RetrievalSet, source: str, caption_template: str = "{}",
                       label_key: str = "category") -> Collection:
    """A collection from a :class:`radapter.data.RetrievalSet` (images, captions, caption->image links)."""
    n = len(rset.images)
    first_caption: dict[int, str] = {}
    for cap, owner in zip(rset.captions, rset.caption_image, strict=True):
        first_caption.setdefault(int(owner), cap)
    images: list[ImageRef] = [rset.images[i] for i in range(n)]
    paths = [img if isinstance(img, str) else str(img) if isinstance(img, Path) else f"{source}#{i}"
             for i, img in enumerate(images)]
    images = [str(img) if isinstance(img, Path) else img for img in images]
    meta = rset.image_meta or [{} for _ in range(n)]
    image_rows = [{"path": paths[i], "caption": first_caption.get(i), "label": meta[i].get(label_key),
                   "source": source} for i in range(n)]
    texts = [render(caption_template, c) for c in rset.captions]
    text_rows = [{"caption": c, "image_id": int(o), "path": paths[int(o)], "label": image_rows[int(o)]["label"],
                  "source": source} for c, o in zip(rset.captions, rset.caption_image, strict=True)]
    coll = Collection(source, images, image_rows, texts, text_rows, caption_template)
    coll.sources = [{"spec": source, "images": n, "captions": len(texts)}]
    return coll


def from_folder(root: str | Path, source: str | None = None) -> Collection:
    """Every image below ``root`` (sorted); the label is the image's sub-folder, if any."""
    from radapter.data.formats import IMAGE_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise CollectionError(f"{root} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    source = source or f"folder:{root}"
    rows = [{"path": str(f), "caption": None,
             "label": f.parent.name if f.parent != root else None, "source": source} for f in files]
    coll = Collection(source, [str(f) for f in files], rows)
    coll.sources = [{"spec": source, "images": len(files), "captions": 0}]
    return coll


def from_caption_file(path: str | Path, caption_template: str = "{}", source: str | None = None) -> Collection:
    """One caption per non-empty line (text only)."""
    path = Path(path)
    if not path.is_file():
        raise CollectionError(f"caption file not found: {path}")
    captions = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not captions:
        raise CollectionError(f"{path} has no captions")
    source = source or f"captions:{path}"
    rows = [{"caption": c, "image_id": None, "path": None, "label": None, "source": source} for c in captions]
    coll = Collection(source, texts=[render(caption_template, c) for c in captions], text_rows=rows,
                      caption_template=caption_template)
    coll.sources = [{"spec": source, "images": 0, "captions": len(captions)}]
    return coll


def _benchmark_names() -> list[str]:
    from radapter.data import list_benchmarks

    return list_benchmarks()


def parse_collection(spec: str, *, caption_template: str | None = None, data_dir: str | Path | None = None
                     ) -> Collection:
    """Read a collection from a spec string (see the module docstring)."""
    from radapter.data import formats
    from radapter.data.benchmarks import load_benchmark

    kind, sep, rest = spec.partition(":")
    template = caption_template or "{}"
    try:
        if sep and kind in _benchmark_names():
            bench = load_benchmark(kind, data_dir)
            if rest not in bench.retrieval:
                raise CollectionError(f"{kind} has no retrieval set {rest!r}; choose from {sorted(bench.retrieval)}")
            template = caption_template or bench.spec.extra.get("caption_template", "{}")
            return from_retrieval_set(bench.retrieval[rest], spec, template)
        if kind == "folder" and sep:
            return from_folder(rest, spec)
        if kind == "table" and sep:
            table, _, root = rest.partition(",")
            return from_retrieval_set(formats.image_text_table(table, root or None), spec, template)
        if kind == "coco" and sep:
            ann, _, image_dir = rest.partition(",")
            return from_retrieval_set(formats.coco_captions(ann, image_dir or Path(ann).parent), spec, template)
        if kind == "captions" and sep:
            return from_caption_file(rest, template, spec)
        path = Path(spec)
        if path.is_dir():
            return from_folder(path, f"folder:{path}")
        suffix = path.suffix.lower()
        if path.is_file() and suffix in (".csv", ".tsv", ".jsonl", ".json"):
            return from_retrieval_set(formats.image_text_table(path), f"table:{path}", template)
        if path.is_file() and suffix == ".txt":
            return from_caption_file(path, template, f"captions:{path}")
    except CollectionError:
        raise
    except Exception as e:  # reader errors (RAdapterError and OSError) become one line
        msg = first_line(e)
        raise CollectionError(f"cannot read collection {spec!r}: {msg}") from None
    raise CollectionError(
        f"cannot read collection {spec!r}: expected BENCH:SET (e.g. emoji:google-test), folder:PATH, "
        "table:PATH[,IMAGE_ROOT], coco:CAPTIONS.json,IMAGE_DIR, captions:PATH, or an existing folder or table"
    )


def load_collections(specs: Sequence[str], *, caption_template: str | None = None,
                     data_dir: str | Path | None = None, parts: Sequence[str] | None = None) -> Collection:
    """Read and join several specs; keep only ``parts`` (default: every part they have)."""
    if not specs:
        raise CollectionError("no collection given")
    coll = concat([parse_collection(s, caption_template=caption_template, data_dir=data_dir) for s in specs])
    if parts is not None:
        coll = coll.select(parts)
    if not coll.parts:
        raise CollectionError(f"collection {coll.name!r} has nothing to index for parts {tuple(parts or PARTS)}")
    return coll


def describe(coll: Collection) -> str:
    return f"{coll.name}: {len(coll.images)} images, {len(coll.texts)} captions"
