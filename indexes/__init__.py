"""indexes: FAISS indexes of image and text embeddings, one per (base model, adapter file, alpha).

An index never answers a query embedded by another model, adapter or alpha. Build with
``python -m indexes.build`` or :func:`build_index`; query through :class:`RetrievalIndex`;
the app gets indexes from an :class:`IndexCache` (:func:`get_or_build`,
:func:`nearest_alpha_index`, :func:`start_alpha_grid`). See docs/indexes.md.

Layering: ``indexes`` imports ``radapter``; ``radapter`` never imports ``indexes``.
"""

import lazy_loader as _lazy

# Submodules load on first attribute access too (``indexes.store`` without an import), as they did
# when the package imported them all; __all__ lists the public names only.
_SUBMODULES = [
    "ann", "build", "cache", "cli", "collection", "embedder", "errors", "evaluate", "export", "index", "keys",
    "recall", "store",
]
__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, submod_attrs={
    "ann": ["IndexSpec", "choose_spec"],
    "cache": [
        "CacheResult", "GridJob", "IndexCache", "NearestIndex", "build_alpha_grid", "get_or_build",
        "nearest_alpha_index", "start_alpha_grid",
    ],
    "collection": ["Collection", "load_collections", "parse_collection"],
    "embedder": ["Embedder"],
    "errors": ["CollectionError", "IndexBuildError", "IndexMismatchError", "IndexNotFoundError", "IndexStoreError"],
    "export": ["export_qdrant"],
    "index": ["Hit", "RetrievalIndex", "open_index"],
    "keys": ["IndexKey", "ModelKey"],
    "recall": ["brute_force_recall", "retrieval_recall"],
    "store": ["BuildResult", "add_to_index", "build_index", "read_manifest", "reindex"],
})
__all__ = [name for name in __all__ if name not in _SUBMODULES]
