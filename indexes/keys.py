"""What an index belongs to: (base model fingerprint, adapter file hash, alpha) plus the collection.

Embeddings depend on the merged model, so an index built at one alpha must never answer a
query embedded at another. :class:`ModelKey` is what a query carries; :class:`IndexKey`
adds the collection hash and is what the cache is keyed by.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import IndexMismatchError

#: Alphas are compared after rounding to this many decimals (0.30000000000000004 == 0.3).
ALPHA_DECIMALS = 6


def normalize_alpha(alpha: float | None) -> float | None:
    """``alpha`` rounded to :data:`ALPHA_DECIMALS` (``None`` stays ``None``: no adapter)."""
    return None if alpha is None else round(float(alpha), ALPHA_DECIMALS)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short(value: str | None, n: int = 12) -> str:
    return "none" if value is None else value[:n]


def format_alpha(alpha: float | None) -> str:
    return "none" if alpha is None else f"{alpha:g}"


@dataclass(frozen=True)
class ModelKey:
    """The merged model an embedding came from: base weights, adapter file and alpha.

    ``adapter_sha256`` and ``alpha`` are ``None`` for a model without adapters.
    """

    base_fingerprint: str
    adapter_sha256: str | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", normalize_alpha(self.alpha))
        if (self.adapter_sha256 is None) != (self.alpha is None):
            raise ValueError("a ModelKey has both an adapter hash and an alpha, or neither")

    def describe(self) -> str:
        """Short human form: ``model 1a2b3c4d5e6f, adapter 9f8e7d6c5b4a, alpha 0.3``."""
        return (f"model {short(self.base_fingerprint)}, adapter {short(self.adapter_sha256)}, "
                f"alpha {format_alpha(self.alpha)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelKey:
        return cls(data["base_fingerprint"], data.get("adapter_sha256"), data.get("alpha"))


def check_key(index_key: ModelKey, query_key: ModelKey, where: str = "index") -> None:
    """Raise :class:`IndexMismatchError` (one line) unless the query's model is the index's model."""
    if query_key == index_key:
        return
    if query_key.base_fingerprint != index_key.base_fingerprint:
        what = (f"base model {short(index_key.base_fingerprint)}, "
                f"not {short(query_key.base_fingerprint)}")
    elif query_key.adapter_sha256 != index_key.adapter_sha256:
        what = f"adapter {short(index_key.adapter_sha256)}, not {short(query_key.adapter_sha256)}"
    else:
        what = f"alpha {format_alpha(index_key.alpha)}, not {format_alpha(query_key.alpha)}"
    raise IndexMismatchError(
        f"{where} was built with {what}: refusing the query (embed it with the index's model: {index_key.describe()})"
    )


@dataclass(frozen=True)
class IndexKey:
    """Cache key: the model key plus the hash of the collection (items and caption template)."""

    model: ModelKey
    collection_hash: str

    def folder_name(self) -> str:
        """A readable, unique folder name for the cache: ``<model>-<adapter>-a<alpha>-<collection>``."""
        digest = hashlib.sha256(repr((self.model.to_json(), self.collection_hash)).encode()).hexdigest()
        return (f"{short(self.model.base_fingerprint)}-{short(self.model.adapter_sha256)}-"
                f"a{format_alpha(self.model.alpha)}-{short(self.collection_hash)}-{digest[:8]}")
