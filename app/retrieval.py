"""Retrieval for the app: indexes over one collection, built for a grid of alphas in the background.

A query at alpha a is answered from the built index nearest to a, with the query embedded
by the model merged at *that* index's alpha (the index refuses anything else); the answer
says which alpha the index was built at. Nothing is re-embedded while a user waits.

Indexes are built on a private copy of the model, one adapter at a time, and the builder
steps aside between batches while a user request runs: building never holds a lock a
classification, segmentation or search needs. ``progress`` says live how far it is.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import radapter
from indexes import Collection, Embedder, IndexCache, build_alpha_grid, get_or_build
from indexes.keys import file_sha256
from radapter.errors import first_line

from .service import NO_ADAPTER, InputError, ModelService

log = logging.getLogger(__name__)

# Items per forward while building: small, so a visitor's request waits for at most one batch.
BUILD_BATCH = 16


class IndexNotReady(InputError):
    """No index of the chosen adapter is built yet (a search can wait: :meth:`RetrievalService.wait_for_index`)."""


@dataclass
class Answer:
    items: list[tuple[Any, str]]  # (image or text, caption with score)
    index_alpha: float | None
    message: str


@dataclass
class BuildProgress:
    """How far one adapter's index build is (updated by the build thread, read by the page)."""

    alphas: list[float | None]
    built: list[float | None] = field(default_factory=list)
    started: bool = False
    current: float | None = None
    part: str | None = None
    done: int = 0
    total: int = 0
    error: str | None = None
    finished: bool = False

    def describe(self) -> str:
        if self.error is not None:
            return f"index build failed: {self.error}"
        if self.finished:
            n = len(self.built)
            return "index ready" if self.alphas == [None] else f"indexes ready ({n} alphas)"
        if not self.started:
            return "indexes queued (another adapter's are being built first)"
        grid = "" if self.alphas == [None] else f"{len(self.built)}/{len(self.alphas)} alphas ready; "
        at = "" if self.current is None else f" at alpha {self.current:g}"
        what = f"embedding {self.part}s{at}: {self.done}/{self.total}" if self.part else f"starting{at}"
        return f"building indexes: {grid}{what}"


class RetrievalService:
    def __init__(self, service: ModelService, collection: Collection, cache_dir: str | Path,
                 alphas: list[float] | None = None) -> None:
        self.service, self.collection, self.cache_dir = service, collection, Path(cache_dir)
        self.alphas = alphas or [round(0.1 * i, 1) for i in range(11)]
        self._progress: dict[str, BuildProgress] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._one_build = threading.Lock()  # builds run one after another: on a small CPU, two are no faster
        self._stop = threading.Event()
        self._sha: dict[str, str] = {}

    def describe(self) -> str:
        """The collection in a few words, for the page."""
        c = self.collection
        return f"{c.name} ({c.count('image')} images, {c.count('text')} captions)"

    def _adapter_sha(self, adapter: str) -> str:
        if adapter not in self._sha:
            self._sha[adapter] = file_sha256(self.service.adapters[adapter].path)
        return self._sha[adapter]

    def _embedder(self, model, adapter: str | None, alpha: float | None = None) -> Embedder:
        sha = self._adapter_sha(adapter) if adapter and adapter != NO_ADAPTER else None
        return Embedder(model, self.service.preprocess, self.service.tokenizer, adapter_sha256=sha, alpha=alpha,
                        model_name=self.service.model_name, batch_size=BUILD_BATCH)

    def warm(self, adapter: str | None) -> None:
        """Start building this adapter's alpha grid (or the base model's single index) in the background."""
        name = adapter or NO_ADAPTER
        if name != NO_ADAPTER and name not in self.service.adapters:
            raise InputError(f"Unknown adapter {name!r}; choose one of {self.service.adapter_names()}.")
        with self._lock:
            if name in self._threads:
                return
            self._progress[name] = BuildProgress([None] if name == NO_ADAPTER else list(self.alphas))
            thread = threading.Thread(target=self._build, args=(name,), daemon=True, name=f"index-{name}")
            self._threads[name] = thread
            thread.start()

    def _build(self, name: str) -> None:
        progress = self._progress[name]
        try:
            with self._one_build:
                if self._stop.is_set():
                    return
                progress.started = True
                # A private copy: the page's models keep answering (at their own alphas) meanwhile.
                # The base's lock is held only for the copy (a zero-shot segmentation dilates its convs).
                with self.service.at_alpha(None, 0.0) as base:
                    model = copy.deepcopy(base)
                if name == NO_ADAPTER:
                    embedder = self._embedder(model, None)
                    embedder.on_batch = self._on_batch(progress)
                    get_or_build(self.cache_dir, embedder, self.collection)
                    progress.built.append(None)
                    return
                entry = self.service.adapters[name]
                radapter.load_adapters(model, entry.path)
                embedder = self._embedder(model, name, alpha=entry.default_alpha)
                embedder.on_batch = self._on_batch(progress)

                def on_built(a: float, _res: Any) -> None:
                    progress.built.append(a)
                    progress.part = None

                def on_start(a: float) -> None:
                    progress.current = a

                build_alpha_grid(self.cache_dir, embedder, self.collection, self.alphas, stop=self._stop,
                                 on_start=on_start, on_built=on_built)
        except Exception as e:  # shown on the page; the app keeps serving the other tabs
            log.warning("building %s's retrieval indexes failed: %s", name, e)
            progress.error = first_line(e)
        finally:
            progress.finished = True

    def _on_batch(self, progress: BuildProgress):
        def on_batch(part: str, done: int, total: int) -> None:
            progress.part, progress.done, progress.total = part, done, total
            self.service.wait_for_requests()  # a visitor's request gets the CPU first
        return on_batch

    def wait(self, adapter: str | None, timeout: float | None = None) -> bool:
        """Wait for ``adapter``'s build to end (for tests and scripts); ``True`` when it has."""
        thread = self._threads.get(adapter or NO_ADAPTER)
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def stop(self) -> None:
        """Stop every build after the alpha it is on (the app calls it at shutdown)."""
        self._stop.set()

    def progress(self, adapter: str | None) -> BuildProgress | None:
        return self._progress.get(adapter or NO_ADAPTER)

    def status(self, adapter: str | None) -> str:
        progress = self.progress(adapter)
        return "indexes not started" if progress is None else progress.describe()

    def building(self, adapter: str | None) -> bool:
        progress = self.progress(adapter)
        return progress is not None and not progress.finished

    def _identity(self, adapter: str | None) -> tuple[str, str | None]:
        """(base-model fingerprint, adapter file hash) that the adapter's indexes are keyed by."""
        if adapter in (None, NO_ADAPTER):
            if NO_ADAPTER not in self._sha:
                self._sha[NO_ADAPTER] = radapter.compute_fingerprint(self.service.base_model)
            return self._sha[NO_ADAPTER], None
        return self.service.base_fingerprint(adapter), self._adapter_sha(adapter)

    def _nearest(self, adapter: str | None, alpha: float):
        no_adapter = adapter in (None, NO_ADAPTER)
        return IndexCache(self.cache_dir).nearest(*self._identity(adapter), self.collection.hash(),
                                                  None if no_adapter else alpha)

    def wait_for_index(self, adapter: str | None, timeout: float = 900.0, every: float = 0.5) -> Iterator[str]:
        """Yield the build's progress every ``every`` seconds until an index of ``adapter`` exists.

        Yields nothing when one is already built; raises :class:`IndexNotReady` when the build
        failed or ``timeout`` passes first.
        """
        self.warm(adapter)
        deadline = time.monotonic() + timeout
        while self._nearest(adapter, 0.5) is None:
            progress = self.progress(adapter)
            if progress is not None and progress.finished:
                raise IndexNotReady(f"No retrieval index could be built ({progress.describe()}).")
            if time.monotonic() > deadline:
                raise IndexNotReady(f"The retrieval index is still being built ({self.status(adapter)}).")
            yield self.status(adapter)
            time.sleep(every)

    def search(self, query: Any, mode: str, adapter: str | None, alpha: float, k: int = 8) -> Answer:
        """``mode``: text->image, image->image or image->text. Raises :class:`IndexNotReady` before
        the first index of ``adapter`` is built (see :meth:`wait_for_index`)."""
        self.warm(adapter)
        found = self._nearest(adapter, alpha)
        if found is None:
            raise IndexNotReady(f"The retrieval index is still being built ({self.status(adapter)}).")
        index_alpha = found.alpha
        with self.service.user_request(), \
                self.service.at_alpha(adapter, index_alpha if index_alpha is not None else 0.0) as model:
            embedder = self._embedder(model, adapter)
            if mode == "text->image":
                hits = found.index.text_to_image(embedder, query, k)
            elif mode == "image->image":
                hits = found.index.image_to_image(embedder, query, k)
            elif mode == "image->text":
                hits = found.index.image_to_text(embedder, query, k)
            else:
                raise InputError(f"unknown retrieval mode {mode!r}")
        items = []
        for hit in hits:
            if mode == "image->text":
                items.append((hit.meta.get("caption", ""), f"{hit.score:.3f}"))
            else:
                image = self.collection.images[hit.id]
                caption = hit.meta.get("caption") or Path(hit.meta.get("path", "")).name  # not server paths
                items.append((np.asarray(image) if not isinstance(image, str) else image,
                              f"cos {hit.score:.2f} · {caption}"))  # first: a gallery cuts long captions
        note = (f"answered from the index built at alpha = {index_alpha:g}" if index_alpha is not None
                else "answered from the zero-shot model's index")
        if index_alpha is not None and abs(index_alpha - alpha) > 1e-6:
            note += f" (nearest built to your alpha {alpha:g}"
            note += f"; {self.status(adapter)})" if self.building(adapter) else ")"
        return Answer(items, index_alpha, note)

