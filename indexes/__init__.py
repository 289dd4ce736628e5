"""indexes: FAISS indexes of image and text embeddings, one per (base model, adapter file, alpha).

An index never answers a query embedded by another model, adapter or alpha. Build with
``python -m indexes.build`` or :func:`build_index`; query through :class:`RetrievalIndex`;
the app gets indexes from an :class:`IndexCache` (:func:`get_or_build`,
:func:`nearest_alpha_index`, :func:`start_alpha_grid`). See docs/indexes.md.

Layering: ``indexes`` imports ``radapter``; ``radapter`` never imports ``indexes``.
"""

from .ann import IndexSpec, choose_spec
from .cache import (
    CacheResult,
    GridJob,
    IndexCache,
    NearestIndex,
    build_alpha_grid,
    get_or_build,
    nearest_alpha_index,
    start_alpha_grid,
)
from .collection import Collection, load_collections, parse_collection
from .embedder import Embedder
from .errors import CollectionError, IndexBuildError, IndexMismatchError, IndexNotFoundError, IndexStoreError
from .export import export_qdrant
from .index import Hit, RetrievalIndex, open_index
from .keys import IndexKey, ModelKey
from .recall import brute_force_recall, retrieval_recall
from .store import BuildResult, add_to_index, build_index, read_manifest, reindex

__all__ = [
    "BuildResult", "CacheResult", "Collection", "CollectionError", "Embedder", "GridJob", "Hit", "IndexBuildError",
    "IndexCache", "IndexKey", "IndexMismatchError", "IndexNotFoundError", "IndexSpec", "IndexStoreError",
    "ModelKey", "NearestIndex", "RetrievalIndex", "add_to_index", "brute_force_recall", "build_alpha_grid",
    "build_index", "choose_spec", "export_qdrant", "get_or_build", "load_collections", "nearest_alpha_index",
    "open_index", "parse_collection", "read_manifest", "reindex", "retrieval_recall", "start_alpha_grid",
]
