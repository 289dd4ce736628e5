"""Recall@K image->text and text->image through an index, and the same from the full cosine matrix.

The stored embeddings of one part query the FAISS index of the other; the ground truth is
each caption's ``image_id``. For an exact (flat) index both functions give the same numbers
(and equal :func:`radapter.evaluation.evaluate_retrieval` on the same set and model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from radapter.evaluation.metrics import recall_at_k

from .errors import IndexStoreError
from .index import RetrievalIndex

KS = (1, 5, 10)


def _owners(index: RetrievalIndex) -> np.ndarray:
    if not {"image", "text"} <= set(index.parts):
        raise IndexStoreError(f"index {index.path} needs both an image and a text part for retrieval recall")
    owner = np.array([-1 if r.get("image_id") is None else r["image_id"] for r in index.rows("text")], np.int64)
    if (owner < 0).all():
        raise IndexStoreError(f"index {index.path}: no caption is linked to an image (no ground truth)")
    return owner


def retrieval_recall(index: RetrievalIndex, ks: Sequence[int] = KS, **search_params: Any) -> dict[str, Any]:
    """Recall@k both ways, computed by searching the index (``search_params``: ``ef_search``/``nprobe``).

    image->text: an image counts when any of its captions is in its top k; text->image: a
    caption counts when its image is in its top k. Captions without an image are left out.
    """
    owner = _owners(index)
    kmax = max(ks)
    linked = owner >= 0
    txt = np.asarray(index.embeddings("text"))[linked]
    img = np.asarray(index.embeddings("image"))
    _, img_ids = index.search("image", txt, kmax, key=index.key, **search_params)
    _, txt_ids = index.search("text", img, kmax, key=index.key, **search_params)
    found_owner = np.where(txt_ids >= 0, owner[np.clip(txt_ids, 0, None)], -1)
    out: dict[str, Any] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((found_owner[:, :k] == np.arange(len(img))[:, None]).any(1).mean())
        out[f"t2i_r{k}"] = float((img_ids[:, :k] == owner[linked][:, None]).any(1).mean())
    types = {p: index.manifest["parts"][p]["index"]["type"] for p in index.parts}
    return {**out, "images": len(img), "captions": int(linked.sum()), "index_types": types,
            "alpha": index.alpha}


def brute_force_recall(index: RetrievalIndex, ks: Sequence[int] = KS) -> dict[str, float]:
    """The same recalls from the full cosine matrix of the stored embeddings (no FAISS)."""
    owner = _owners(index)
    linked = owner >= 0
    img = np.asarray(index.embeddings("image"), dtype=np.float32)
    txt = np.asarray(index.embeddings("text"), dtype=np.float32)[linked]
    return recall_at_k(img @ txt.T, owner[linked], ks)
