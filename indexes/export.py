"""Export an index part as Qdrant points (JSON lines), for when a collection outgrows one machine.

Writes, per part, ``<part>.points.jsonl`` (one ``{"id", "vector", "payload"}`` per line, the
body of Qdrant's ``PUT /collections/{name}/points`` split into lines: send them in batches as
``{"points": [...]}``) and ``<part>.collection.json`` (the collection to create first:
vector size and cosine distance). The payload is the metadata row plus the index's key, so
a query can filter on the model, adapter and alpha it was embedded with.

    python -m indexes export runs/indexes/photos --out exports/photos --part image
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radapter.atomic import atomic_path

from .index import RetrievalIndex


def qdrant_collection_config(index: RetrievalIndex) -> dict[str, Any]:
    """Body of ``PUT /collections/{name}``: one unnamed cosine vector of the index's width."""
    return {"vectors": {"size": index.dim, "distance": "Cosine"}}


def export_qdrant(index: RetrievalIndex | str | Path, out: str | Path, parts: Sequence[str] | None = None,
                  chunk: int = 4096, decimals: int = 6) -> list[Path]:
    """Write Qdrant points and collection config for ``parts`` (default: all) under ``out``."""
    index = index if isinstance(index, RetrievalIndex) else RetrievalIndex(index)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = index.key.to_json()
    written = []
    for part in parts or index.parts:
        rows, vectors = index.rows(part), index.embeddings(part)
        points = out / f"{part}.points.jsonl"
        with atomic_path(points) as tmp, open(tmp, "w") as f:
            for start in range(0, len(rows), chunk):
                block = np.round(np.asarray(vectors[start:start + chunk], dtype=np.float64), decimals)
                for row, vec in zip(rows[start:start + chunk], block, strict=True):
                    payload = {k: v for k, v in row.items() if k != "id"} | {"part": part, **key}
                    f.write(json.dumps({"id": row["id"], "vector": vec.tolist(), "payload": payload}) + "\n")
        config = out / f"{part}.collection.json"
        with atomic_path(config) as tmp:
            tmp.write_text(json.dumps(qdrant_collection_config(index), indent=2) + "\n")
        written += [points, config]
    return written
