"""Retrieval for the app: indexes over one collection, built for a grid of alphas in the background.

A query at alpha a is answered from the built index nearest to a, with the query embedded
by the model merged at *that* index's alpha (the index refuses anything else); the answer
says which alpha the index was built at. Nothing is re-embedded while a user waits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import radapter
from indexes import Collection, Embedder, GridJob, IndexCache, get_or_build, start_alpha_grid
from indexes.keys import file_sha256

from .service import NO_ADAPTER, InputError, ModelService

log = logging.getLogger(__name__)


@dataclass
class Answer:
    items: list[tuple[Any, str]]  # (image or text, caption with score)
    index_alpha: float | None
    message: str


class RetrievalService:
    def __init__(self, service: ModelService, collection: Collection, cache_dir: str | Path,
                 alphas: list[float] | None = None) -> None:
        self.service, self.collection, self.cache_dir = service, collection, Path(cache_dir)
        self.alphas = alphas or [round(0.1 * i, 1) for i in range(11)]
        self._jobs: dict[str, GridJob] = {}
        self._lock = threading.Lock()
        self._sha: dict[str, str] = {}

    def _adapter_sha(self, adapter: str) -> str:
        if adapter not in self._sha:
            self._sha[adapter] = file_sha256(self.service.adapters[adapter].path)
        return self._sha[adapter]

    def _embedder(self, model, adapter: str | None) -> Embedder:
        sha = self._adapter_sha(adapter) if adapter and adapter != NO_ADAPTER else None
        return Embedder(model, self.service.preprocess, self.service.tokenizer, adapter_sha256=sha,
                        model_name=self.service.model_name)

    def warm(self, adapter: str | None) -> None:
        """Start building this adapter's alpha grid (or the base model's single index) in the background."""
        name = adapter or NO_ADAPTER
        with self._lock:
            if name in self._jobs:
                return
            if name == NO_ADAPTER:
                def build_base() -> None:
                    with self.service.at_alpha(None, 0.0) as model:
                        get_or_build(self.cache_dir, self._embedder(model, None), self.collection)
                thread = threading.Thread(target=build_base, daemon=True, name="index-base")
                thread.start()
                self._jobs[name] = GridJob(thread, threading.Event(), [])
                return
            entry = self.service.adapters[name]
            with self.service.at_alpha(name, entry.default_alpha) as model:
                embedder = self._embedder(model, name)
                self._jobs[name] = start_alpha_grid(self.cache_dir, embedder, self.collection, self.alphas)

    def status(self, adapter: str | None) -> str:
        job = self._jobs.get(adapter or NO_ADAPTER)
        if job is None:
            return "indexes not started"
        if job.error is not None:
            return f"index build failed: {job.error}"
        return "indexes ready" if job.done else f"building indexes: {len(job.built)}/{len(job.alphas)} alphas done"

    def _identity(self, adapter: str | None) -> tuple[str, str | None]:
        """(base-model fingerprint, adapter file hash) that the adapter's indexes are keyed by."""
        if adapter in (None, NO_ADAPTER):
            if NO_ADAPTER not in self._sha:
                self._sha[NO_ADAPTER] = radapter.compute_fingerprint(self.service.base_model)
            return self._sha[NO_ADAPTER], None
        return self.service.base_fingerprint(adapter), self._adapter_sha(adapter)

    def search(self, query: Any, mode: str, adapter: str | None, alpha: float, k: int = 8) -> Answer:
        """``mode``: text->image, image->image or image->text."""
        self.warm(adapter)
        no_adapter = adapter in (None, NO_ADAPTER)
        found = IndexCache(self.cache_dir).nearest(*self._identity(adapter), self.collection.hash(),
                                                   None if no_adapter else alpha)
        if found is None:
            raise InputError(f"The retrieval index is still being built ({self.status(adapter)}); try again shortly.")
        index_alpha = found.alpha
        with self.service.at_alpha(adapter, index_alpha if index_alpha is not None else 0.0) as model:
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
                              f"{caption} ({hit.score:.3f})"))
        note = (f"answered from the index built at alpha = {index_alpha:g}" if index_alpha is not None
                else "answered from the zero-shot model's index")
        if index_alpha is not None and abs(index_alpha - alpha) > 1e-6:
            note += f" (nearest built to your alpha {alpha:g})"
        return Answer(items, index_alpha, note)
