"""FAISS index types for L2-normalised embeddings (cosine = inner product), chosen by flag or size.

- ``flat``: exact search (``IndexFlatIP``), the default for small collections;
- ``hnsw``: a graph (``IndexHNSWFlat``, inner product): fast, no training, keeps the raw vectors;
- ``ivf``: inverted lists over k-means cells (``IVF{nlist},Flat``), searched ``nprobe`` cells at a time;
- ``ivfpq``: IVF with product-quantised codes (``IVF{nlist},PQ{m}x{bits}``): a fraction of the memory,
  approximate scores;
- ``factory``: any ``faiss.index_factory`` string (``params["factory"]``), metric inner product.

Every spec is a kind plus its parameters; both are recorded in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lazy_loader
import numpy as np

from .errors import IndexBuildError

# Loaded on first use, so that the command lines' --help and option defaults do not import FAISS.
faiss = lazy_loader.load("faiss")

KINDS = ("flat", "hnsw", "ivf", "ivfpq", "factory")
#: ``auto`` picks flat up to this many vectors (exact search stays in the tens of ms) ...
AUTO_FLAT_MAX = 100_000
#: ... HNSW up to this many (it keeps the float vectors plus a graph in memory), IVF-PQ beyond.
AUTO_HNSW_MAX = 5_000_000

DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"m": 32, "ef_construction": 40, "ef_search": 128},
    "ivf": {"nlist": None, "nprobe": None},
    # rerank: fetch rerank * k candidates by PQ score, re-score them exactly from the stored embeddings
    "ivfpq": {"nlist": None, "nprobe": None, "pq_m": None, "pq_bits": None, "rerank": 10},
    "factory": {"factory": None},
}


def default_nlist(n: int) -> int:
    """A power of two near ``4 * sqrt(n)`` with at least 39 training points per cell (faiss's minimum)."""
    if n < 2 * 39:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, 2 ** math.floor(math.log2(n // 39)))))


def default_nprobe(nlist: int) -> int:
    """Cells searched per query: 1/64 of the cells, at least 8 (all of them when there are fewer)."""
    return int(min(nlist, max(8, nlist // 64)))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers: one per 8 dimensions (dim/8 bytes per vector at 8 bits), dividing ``dim``."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


@dataclass
class IndexSpec:
    """An index type and its parameters (build-time and default search-time)."""

    kind: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IndexBuildError(f"unknown index type {self.kind!r}; choose from auto, {', '.join(KINDS)}")

    def factory(self) -> str:
        """The ``faiss.index_factory`` string."""
        p = self.params
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{p['m']},Flat"
        if self.kind == "ivf":
            return f"IVF{p['nlist']},Flat"
        if self.kind == "ivfpq":  # np: no polysemous training (slow, and only for Hamming-filtered search)
            return f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_bits']}np"
        if not p.get("factory"):
            raise IndexBuildError("index type 'factory' needs a factory string (--factory)")
        return str(p["factory"])

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "factory": self.factory(), "params": dict(self.params),
                "metric": "inner_product"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(data["type"], dict(data.get("params", {})))


def choose_spec(n: int, dim: int, kind: str = "auto", **overrides: Any) -> IndexSpec:
    """The spec for ``n`` vectors of width ``dim``: ``kind`` (or by size for ``auto``) with defaults
    filled in for ``n`` and ``dim``; ``overrides`` (``None`` values ignored) win."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if kind == "auto":  # parameters of the types not chosen are ignored
        kind = "flat" if n <= AUTO_FLAT_MAX else "hnsw" if n <= AUTO_HNSW_MAX else "ivfpq"
        overrides = {k: v for k, v in overrides.items() if k in DEFAULTS[kind]}
    if kind not in KINDS:
        raise IndexBuildError(f"unknown index type {kind!r}; choose from auto, {', '.join(KINDS)}")
    params = {**DEFAULTS[kind], **{k: v for k, v in overrides.items() if k in DEFAULTS[kind]}}
    unknown = sorted(set(overrides) - set(DEFAULTS[kind]))
    if unknown:
        raise IndexBuildError(f"index type {kind!r} takes no parameter(s) {unknown}")
    if kind in ("ivf", "ivfpq"):
        params["nlist"] = int(params["nlist"] or default_nlist(n))
        params["nprobe"] = int(params["nprobe"] or default_nprobe(params["nlist"]))
    if kind == "ivfpq":
        params["pq_m"] = int(params["pq_m"] or default_pq_m(dim))
        # 8-bit codes need 256 training points per sub-quantiser; small sets get 4-bit codes.
        params["pq_bits"] = int(params["pq_bits"] or (8 if n >= 39 * 256 else 4))
        if dim % params["pq_m"]:
            raise IndexBuildError(f"pq_m={params['pq_m']} does not divide the embedding width {dim}")
    return IndexSpec(kind, params)


def create_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An empty index of ``spec`` for vectors of width ``dim`` (metric: inner product)."""
    try:
        index = faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise IndexBuildError(f"faiss cannot make {spec.factory()!r}: {msg}") from None
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = int(spec.params["ef_construction"])
    apply_search_params(index, spec.params)
    return index


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set the stored default ``ef_search`` / ``nprobe`` on an index."""
    if params.get("ef_search") is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params["ef_search"])
    if params.get("nprobe") is not None:
        ivf = _ivf(index)
        if ivf is not None:
            ivf.nprobe = int(params["nprobe"])


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def search_parameters(index: faiss.Index, *, ef_search: int | None = None, nprobe: int | None = None) -> Any:
    """Per-call search parameters (thread-safe: the index is not modified), or ``None``."""
    if ef_search is not None and hasattr(index, "hnsw"):
        return faiss.SearchParametersHNSW(efSearch=int(ef_search))
    if nprobe is not None and _ivf(index) is not None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    return None


def train_sample_size(spec: IndexSpec) -> int:
    """How many vectors training needs: 64 per IVF cell (at least 256 per PQ centroid)."""
    if spec.kind not in ("ivf", "ivfpq", "factory"):
        return 0
    n = 64 * int(spec.params.get("nlist") or 1024)
    if spec.kind == "ivfpq":
        n = max(n, 64 * 2 ** int(spec.params["pq_bits"]))
    return n


def train(index: faiss.Index, vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> int:
    """Train ``index`` if it needs it, on a seeded random sample; returns the sample size (0: none)."""
    if index.is_trained:
        return 0
    n = len(vectors)
    size = min(n, train_sample_size(spec) or n)
    if size < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        sample = np.ascontiguousarray(vectors[idx], dtype=np.float32)
    else:
        sample = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index.train(sample)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "failed"
        raise IndexBuildError(f"training {spec.factory()} on {size} vectors failed: {msg}") from None
    return size


def build(vectors: np.ndarray, spec: IndexSpec, chunk: int = 65536) -> tuple[faiss.Index, int]:
    """Create, train and fill an index with ``vectors`` (ids = row numbers); returns it and the
    training sample size."""
    index = create_index(spec, vectors.shape[1])
    trained_on = train(index, vectors, spec)
    add(index, vectors, chunk)
    return index, trained_on


def add(index: faiss.Index, vectors: np.ndarray, chunk: int = 65536) -> None:
    """Append vectors (ids continue from ``index.ntotal``), a chunk at a time (memory-mapped input is fine).

    HNSW gets them in one call: faiss inserts a batch level by level, and the graph built
    from 64k-vector batches is measurably worse (clustered 256-d data, recall@10: 0.93 vs 0.95
    at 200k with the same ``ef_search``; 0.88 at ``ef_search`` 1024 vs 0.955 at 384 at 1M).
    """
    if hasattr(index, "hnsw"):
        chunk = max(len(vectors), 1)
    for i in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[i:i + chunk], dtype=np.float32))


def index_bytes(index: faiss.Index) -> int:
    """Serialised size of an index: its memory footprint, give or take the allocator."""
    return int(faiss.serialize_index(index).nbytes)


def search(index: faiss.Index, queries: np.ndarray, k: int, *, ef_search: int | None = None,
           nprobe: int | None = None, rerank: int | None = None, vectors: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores, ids)``; with ``rerank`` > 1 and the exact ``vectors`` (row = id, a memory
    map is fine), fetch ``rerank * k`` candidates and re-score them exactly (for PQ codes)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    params = search_parameters(index, ef_search=ef_search, nprobe=nprobe)
    if not rerank or rerank <= 1 or vectors is None:
        return index.search(q, k, params=params)
    _, cand = index.search(q, min(index.ntotal, k * int(rerank)), params=params)
    safe = np.clip(cand, 0, None)
    flat = np.unique(safe)
    lookup = np.searchsorted(flat, safe)
    exact = np.einsum("qcd,qd->qc", np.asarray(vectors[flat], dtype=np.float32)[lookup], q)
    exact[cand < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand, order, 1)
    scores = np.take_along_axis(exact, order, 1).astype(np.float32)
    scores[ids < 0] = -np.inf
    return scores, ids


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the true top ``k`` ids found among the returned top ``k``."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k) if hits else float("nan")


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *, k: int = 10, target: float = 0.95,
         values: tuple[int, ...] | None = None, rerank: int | None = None, vectors: np.ndarray | None = None
         ) -> dict[str, Any]:
    """Smallest ``ef_search`` (HNSW) or ``nprobe`` (IVF) whose recall@k on ``queries`` reaches ``target``.

    ``truth``: exact top-``k`` ids of ``queries``. Returns the parameter name, the chosen value
    (the best one tried when none reaches the target), and the recall at each value tried.
    Tune on queries held out from the ones you report on.
    """
    if hasattr(index, "hnsw"):
        name, values = "ef_search", values or (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    elif _ivf(index) is not None:
        nlist = _ivf(index).nlist
        name = "nprobe"
        values = values or tuple(v for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
                                 if v <= nlist)
    else:
        return {"param": None, "value": None, "curve": {}}
    curve: dict[int, float] = {}
    for v in values:
        _, ids = search(index, queries, k, rerank=rerank, vectors=vectors, **{name: v})
        curve[v] = recall_at_k(ids, truth, k)
        if curve[v] >= target:
            return {"param": name, "value": v, "curve": curve, "reached": True}
    best = max(curve, key=lambda v: (curve[v], -v))
    return {"param": name, "value": best, "curve": curve, "reached": False}
