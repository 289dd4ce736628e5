"""The FAISS scale benchmark runs end to end at a tiny size and writes the documented keys (not timings)."""

import json
import sys

import numpy as np

from benchmarks import faiss_scale


def test_faiss_scale_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "faiss_scale.json"
    monkeypatch.setattr(sys, "argv", [
        "faiss_scale", "--n", "3000", "--dim", "32", "--queries", "40", "--tune-queries", "30",
        "--latency-queries", "10", "--flat-latency-queries", "5", "--out", str(out),
    ])
    faiss_scale.main()
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["command"].startswith("python -m benchmarks.faiss_scale --n 3000")
    assert {"machine", "date", "data", "goal", "results"} <= res.keys()
    assert set(res["results"]) == {"flat", "hnsw", "ivf", "ivfpq"}
    for kind, r in res["results"].items():
        assert {"speedup_vs_flat", "recall_at_10", "build_s", "memory_mb"} <= r.keys(), kind
        assert 0.0 <= r["recall_at_10"] <= 1.0 and r["latency"]["p99_ms"] >= r["latency"]["p50_ms"] > 0
    assert res["results"]["flat"]["recall_at_10"] == 1.0
    assert res["results"]["ivf"]["tuning"]["param"] == "nprobe"
    assert res["goal"]["met"] is False  # never claimed below 1M vectors


def test_clustered_generator_looks_like_embeddings():
    x = faiss_scale.clustered_embeddings(4000, 64, seed=1)
    assert x.shape == (4000, 64) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = x[:200] @ x[200:].T
    assert 0.1 < sims.mean() < 0.4  # the shared "cone" of CLIP-like embeddings
    assert np.sort(sims, axis=1)[:, -1].mean() > 0.7  # near neighbours exist
