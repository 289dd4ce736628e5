"""A cache of index folders keyed by (model fingerprint, adapter hash, alpha, collection hash).

The app asks for the index of its model and collection: :meth:`IndexCache.get_or_build`
returns the cached one or builds it. Alpha is continuous, so the app builds a grid of
alphas ahead of time (:func:`build_alpha_grid`, or :func:`start_alpha_grid` in a background
thread) and answers from the nearest built one (:func:`nearest_alpha_index`), which says
which alpha that is: queries must then be embedded with the model merged at *that* alpha
(the index refuses any other).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radapter.atomic import leftovers
from radapter.evaluation import alpha_grid

from .collection import Collection
from .embedder import Embedder
from .errors import IndexStoreError
from .index import RetrievalIndex
from .keys import IndexKey, ModelKey, normalize_alpha
from .store import (
    DEFAULT_CHUNK,
    BuildResult,
    build_index,
    drop_work,
    locked,
    manifest_key,
    read_manifest,
    recover,
    spec_matches,
    work_dir,
)


@dataclass
class CacheResult:
    """An index from the cache; ``hit`` is False when it was built (or re-indexed) for this call."""

    index: RetrievalIndex
    hit: bool
    build: BuildResult | None = None


@dataclass
class NearestIndex:
    """The cached index nearest to a requested alpha, and the alpha it was built at."""

    index: RetrievalIndex
    alpha: float | None
    requested: float | None

    @property
    def exact(self) -> bool:
        return self.alpha == normalize_alpha(self.requested)


class IndexCache:
    """Index folders under ``root``, one per key (``<model>-<adapter>-a<alpha>-<collection>-<digest>``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, key: IndexKey) -> Path:
        return self.root / key.folder_name()

    def get(self, key: IndexKey) -> RetrievalIndex | None:
        """The cached index of ``key``, or ``None``."""
        path = self.path_for(key)
        try:
            manifest = read_manifest(path)
        except IndexStoreError:
            return None
        return RetrievalIndex(path) if manifest_key(manifest) == key else None

    def entries(self) -> list[tuple[IndexKey, Path]]:
        """Every complete index in the cache with its key."""
        out = []
        for path in sorted(self.root.glob("*")):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                out.append((manifest_key(read_manifest(path)), path))
            except IndexStoreError:
                continue
        return out

    def alphas(self, base_fingerprint: str, adapter_sha256: str | None, collection_hash: str
               ) -> dict[float | None, Path]:
        """Built alphas (and their folders) for one model, adapter and collection."""
        return {k.model.alpha: p for k, p in self.entries()
                if k.model.base_fingerprint == base_fingerprint and k.model.adapter_sha256 == adapter_sha256
                and k.collection_hash == collection_hash}

    def get_or_build(self, embedder: Embedder, collection: Collection, *, index_type: str = "auto",
                     index_params: dict[str, Any] | None = None, chunk_size: int = DEFAULT_CHUNK,
                     progress: bool = False) -> CacheResult:
        """The index of ``(embedder.key, collection)``: cached, re-indexed from the cached embeddings
        when another index type or parameter is asked for (``build.status == "re-indexed"``), or built."""
        key = IndexKey(embedder.key, collection.hash())
        cached = self.get(key)
        if cached is not None and spec_matches(cached.manifest, index_type, index_params):
            _tidy(cached.path)
            return CacheResult(cached, True)
        result = build_index(self.path_for(key), embedder, collection, index_type=index_type,
                             index_params=index_params, chunk_size=chunk_size, progress=progress)
        return CacheResult(RetrievalIndex(result.path), False, result)

    def nearest(self, base_fingerprint: str, adapter_sha256: str | None, collection_hash: str,
                alpha: float | None, *, max_distance: float | None = None) -> NearestIndex | None:
        """The cached index nearest to ``alpha`` (ties: the smaller alpha), or ``None`` when none is
        built or the nearest is farther than ``max_distance``."""
        built = self.alphas(base_fingerprint, adapter_sha256, collection_hash)
        if not built:
            return None
        best: float | None = None
        if adapter_sha256 is not None:  # then every built alpha is a number
            if alpha is None:
                raise IndexStoreError("the model has an adapter: say which alpha to look near")
            best = min(built, key=lambda a: (abs(a - alpha), a))  # type: ignore[operator]
            if max_distance is not None and abs(best - alpha) > max_distance + 1e-12:
                return None
        return NearestIndex(RetrievalIndex(built[best]), best, alpha)


def _tidy(path: Path) -> None:
    """Clean up beside a cached, up-to-date index what killed runs left (their work folder is stale: the
    folder is named by its key); skipped while a run of that folder holds its lock (it cleans up itself)."""
    if not (leftovers(path) or work_dir(path).exists()):
        return
    with contextlib.suppress(TimeoutError), locked(path, timeout=0):
        recover(path)
        drop_work(path)


def get_or_build(cache: IndexCache | str | Path, embedder: Embedder, collection: Collection,
                 **kwargs: Any) -> CacheResult:
    """:meth:`IndexCache.get_or_build` on a cache (or a cache folder)."""
    return _cache(cache).get_or_build(embedder, collection, **kwargs)


def nearest_alpha_index(cache: IndexCache | str | Path, model: Embedder | ModelKey, collection: Collection | str,
                        alpha: float | None, *, max_distance: float | None = None) -> NearestIndex | None:
    """The cached index of ``model``'s base and adapter on ``collection`` (or its hash) built at the
    alpha nearest to ``alpha``; ``.alpha`` says which. Embed queries at that alpha."""
    key = model.key if isinstance(model, Embedder) else model
    coll_hash = collection.hash() if isinstance(collection, Collection) else collection
    return _cache(cache).nearest(key.base_fingerprint, key.adapter_sha256, coll_hash, alpha,
                                 max_distance=max_distance)


def _cache(cache: IndexCache | str | Path) -> IndexCache:
    return cache if isinstance(cache, IndexCache) else IndexCache(cache)


# ----------------------------------------------------------------------------- alpha grid
def grid_order(alphas: Sequence[float], center: float | None) -> list[float]:
    """``alphas`` (rounded, unique) sorted by distance to ``center`` (the alpha the app shows first)."""
    unique = sorted({normalize_alpha(a) for a in alphas})  # type: ignore[type-var]
    return unique if center is None else sorted(unique, key=lambda a: (abs(a - center), a))


def build_alpha_grid(cache: IndexCache | str | Path, embedder: Embedder, collection: Collection,
                     alphas: Sequence[float] | None = None, *, index_type: str = "auto",
                     index_params: dict[str, Any] | None = None, stop: threading.Event | None = None,
                     on_built: Callable[[float, CacheResult], None] | None = None,
                     on_start: Callable[[float], None] | None = None, progress: bool = False,
                     ) -> dict[float, CacheResult]:
    """Build (or find cached) the index of ``collection`` at each alpha, nearest to the
    embedder's current alpha first. Re-merges ``embedder``'s model at each alpha and merges it
    back at its starting alpha at the end, so give it an embedder no one queries meanwhile
    (:meth:`GridJob` copies one). ``stop`` ends it between alphas; ``on_start(alpha)`` is called
    before each and ``on_built(alpha, result)`` after each."""
    start = embedder.alpha
    if start is None:
        raise IndexStoreError("an alpha grid needs a model with adapters")
    collection.hash()  # digests once, cached on the collection for every alpha
    out: dict[float, CacheResult] = {}
    try:
        for a in grid_order(alphas if alphas is not None else alpha_grid(), start):
            if stop is not None and stop.is_set():
                break
            if on_start is not None:
                on_start(a)
            embedder.set_alpha(a)
            res = _cache(cache).get_or_build(embedder, collection, index_type=index_type, index_params=index_params,
                                             progress=progress)
            out[a] = res
            if on_built is not None:
                on_built(a, res)
    finally:
        embedder.set_alpha(start)
    return out


@dataclass
class GridJob:
    """A background alpha-grid build (see :func:`start_alpha_grid`)."""

    thread: threading.Thread
    stop: threading.Event
    alphas: list[float]
    built: list[float] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def cancel(self) -> None:
        """Stop after the alpha being built."""
        self.stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job; True when it has finished. Re-raises an error it hit."""
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.done


def start_alpha_grid(cache: IndexCache | str | Path, embedder: Embedder, collection: Collection,
                     alphas: Sequence[float] | None = None, *, copy_model: bool = True, **kwargs: Any) -> GridJob:
    """Run :func:`build_alpha_grid` in a daemon thread and return at once.

    ``copy_model``: build with a deep copy of the embedder's model, so the caller can keep
    querying with its own (at its own alpha) while the grid builds.
    """
    worker = copy.deepcopy(embedder) if copy_model else embedder
    stop = threading.Event()
    order = grid_order(alphas if alphas is not None else alpha_grid(), worker.alpha)
    user_cb = kwargs.pop("on_built", None)

    def on_built(a: float, res: CacheResult) -> None:
        job.built.append(a)
        if user_cb is not None:
            user_cb(a, res)

    def run() -> None:
        try:
            build_alpha_grid(cache, worker, collection, order, stop=stop, on_built=on_built, **kwargs)
        except BaseException as e:  # reported through wait()
            job.error = e

    job = GridJob(threading.Thread(target=run, daemon=True, name="alpha-grid"), stop, order)
    job.thread.start()
    return job
