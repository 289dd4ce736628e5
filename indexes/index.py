"""Query an index folder: text -> image, image -> image, image -> text, and a batch API.

Every query carries the key of the model that embedded it (an :class:`~indexes.embedder.Embedder`,
or an explicit :class:`~indexes.keys.ModelKey` for raw vectors); a key other than the
index's (another base model, adapter file or alpha) is refused with
:class:`~indexes.errors.IndexMismatchError` before anything is searched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import ann
from .embedder import Embedder, QueryImage
from .errors import IndexStoreError
from .keys import IndexKey, ModelKey, check_key
from .store import RowTable, ShardedRows, manifest_key, read_embeddings, read_manifest, read_rows, row_table


@dataclass(frozen=True)
class Hit:
    """One search result: FAISS id, cosine score, rank (0 = best) and the item's metadata row."""

    id: int
    score: float
    rank: int
    meta: dict[str, Any]


class RetrievalIndex:
    """An opened index folder. FAISS indexes and metadata load lazily, once (thread-safe)."""

    def __init__(self, path: str | Path, *, mmap: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.mmap = mmap
        self._indexes: dict[str, faiss.Index] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._emb: dict[str, np.ndarray | ShardedRows] = {}
        self._tables: dict[str, RowTable] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = False) -> RetrievalIndex:
        """Open an index folder (``mmap``: map the FAISS files instead of reading them, for large flat/IVF)."""
        return cls(path, mmap=mmap)

    def __repr__(self) -> str:
        counts = ", ".join(f"{p}={v['count']}" for p, v in self.manifest["parts"].items())
        return f"RetrievalIndex({str(self.path)!r}, {self.key.describe()}, {counts})"

    # ------------------------------------------------------------------ facts
    @property
    def key(self) -> ModelKey:
        return ModelKey.from_json(self.manifest["key"])

    @property
    def alpha(self) -> float | None:
        return self.key.alpha

    @property
    def collection_hash(self) -> str:
        return self.manifest["collection"]["hash"]

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.manifest["parts"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def count(self, part: str) -> int:
        return int(self.manifest["parts"].get(part, {}).get("count", 0))

    @property
    def index_key(self) -> IndexKey:
        """The cache key: model key plus collection hash."""
        return manifest_key(self.manifest)

    def check(self, key: ModelKey) -> None:
        """Raise :class:`IndexMismatchError` unless ``key`` is the index's model."""
        check_key(self.key, key, f"index {self.path}")

    # ------------------------------------------------------------------ lazy parts
    def _part(self, part: str) -> dict[str, Any]:
        if part not in self.manifest["parts"]:
            raise IndexStoreError(f"index {self.path} has no {part} part (it has: {', '.join(self.parts)})")
        return self.manifest["parts"][part]

    def faiss_index(self, part: str) -> faiss.Index:
        """The FAISS index of a part (``image`` or ``text``), with its stored search parameters."""
        info = self._part(part)
        with self._lock:
            if part not in self._indexes:
                flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if self.mmap else 0
                index = faiss.read_index(str(self.path / info["index"]["file"]), flags)
                if index.ntotal != info["count"] or index.d != self.dim:
                    raise IndexStoreError(f"{self.path}: {part} index holds {index.ntotal}x{index.d}, "
                                          f"the manifest says {info['count']}x{self.dim}")
                ann.apply_search_params(index, info["index"]["params"])
                self._indexes[part] = index
            return self._indexes[part]

    def rows(self, part: str) -> list[dict[str, Any]]:
        """All metadata rows of a part, loaded once; ``rows(part)[id]`` is the row of FAISS id ``id``."""
        self._part(part)
        with self._lock:
            if part not in self._rows:
                self._rows[part] = read_rows(self.path, self.manifest, part)
            return self._rows[part]

    def row(self, part: str, id: int) -> dict[str, Any]:
        """One metadata row (a copy), read from disk unless all rows are loaded already."""
        self._part(part)
        with self._lock:
            if part in self._rows:
                return dict(self._rows[part][id])
            if part not in self._tables:
                self._tables[part] = row_table(self.path, self.manifest, part)
            table = self._tables[part]
        return table[id]

    def embeddings(self, part: str) -> np.ndarray | ShardedRows:
        """Stored embeddings of a part, row = id: memory-mapped, read on demand (``np.asarray`` for all)."""
        self._part(part)
        with self._lock:
            if part not in self._emb:
                self._emb[part] = read_embeddings(self.path, self.manifest, part)
            return self._emb[part]

    # ------------------------------------------------------------------ search
    def search(self, part: str, queries: np.ndarray, k: int = 10, *, key: ModelKey,
               ef_search: int | None = None, nprobe: int | None = None, rerank: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Batch API: top-``k`` ``(scores, ids)`` of ``part`` for each row of ``queries`` (``(n, dim)``,
        L2-normalised, embedded by the model ``key``). Missing results have id -1.
        ``ef_search`` / ``nprobe`` / ``rerank`` override the stored search parameters for this call
        (``rerank``: re-score ``rerank * k`` PQ candidates exactly from the stored embeddings)."""
        self.check(key)
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise IndexStoreError(f"queries are {q.shape[1]}-d, index {self.path} is {self.dim}-d")
        index = self.faiss_index(part)
        k = max(1, min(int(k), index.ntotal))
        rerank = rerank if rerank is not None else self.manifest["parts"][part]["index"]["params"].get("rerank")
        vectors = self.embeddings(part) if rerank and rerank > 1 else None
        return ann.search(index, q, k, ef_search=ef_search, nprobe=nprobe, rerank=rerank, vectors=vectors)

    def hits(self, part: str, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results as :class:`Hit` lists with metadata."""
        return [[Hit(int(i), float(s), r, self.row(part, int(i)))
                 for r, (s, i) in enumerate(zip(srow, irow, strict=True)) if i >= 0]
                for srow, irow in zip(scores, ids, strict=True)]

    def _query(self, part: str, embedder: Embedder, embed: Callable[[Sequence[Any]], np.ndarray],
               items: Sequence[Any], k: int, **params: Any) -> list[list[Hit]]:
        self.check(embedder.key)  # before spending time on embedding
        return self.hits(part, *self.search(part, embed(items), k, key=embedder.key, **params))

    def text_to_image(self, embedder: Embedder, texts: str | Sequence[str], k: int = 10, **params: Any
                      ) -> list[Hit] | list[list[Hit]]:
        """Images for each text (one list for a single string)."""
        single = isinstance(texts, str)
        out = self._query("image", embedder, lambda t: embedder.embed("text", t), [texts] if single else texts, k,
                          **params)
        return out[0] if single else out

    def image_to_image(self, embedder: Embedder, images: QueryImage | Sequence[QueryImage], k: int = 10,
                       **params: Any) -> list[Hit] | list[list[Hit]]:
        """Similar images for each query image (path, array, PIL image or preprocessed tensor)."""
        single, items = _one_or_many(images)
        out = self._query("image", embedder, embedder.embed_queries, items, k, **params)
        return out[0] if single else out

    def image_to_text(self, embedder: Embedder, images: QueryImage | Sequence[QueryImage], k: int = 10,
                      **params: Any) -> list[Hit] | list[list[Hit]]:
        """Captions for each query image."""
        single, items = _one_or_many(images)
        out = self._query("text", embedder, embedder.embed_queries, items, k, **params)
        return out[0] if single else out

    def text_to_text(self, embedder: Embedder, texts: str | Sequence[str], k: int = 10, **params: Any
                     ) -> list[Hit] | list[list[Hit]]:
        """Similar captions for each text."""
        single = isinstance(texts, str)
        out = self._query("text", embedder, lambda t: embedder.embed("text", t), [texts] if single else texts, k,
                          **params)
        return out[0] if single else out


def _one_or_many(images: Any) -> tuple[bool, list[Any]]:
    """(single?, list): a list/tuple or a 4-d tensor is a batch; anything else one image."""
    if isinstance(images, (list, tuple)) or (hasattr(images, "dim") and images.dim() == 4):
        return False, list(images)
    return True, [images]


def open_index(path: str | Path, *, mmap: bool = False) -> RetrievalIndex:
    """Open an index folder for querying."""
    return RetrievalIndex.open(path, mmap=mmap)
