"""indexes/: build, query, atomic rebuilds, keys, cache, alpha grid, incremental adds, index types, recall.

Fast: the tiny random-init ViT CLIP on a few dozen generated PNGs and captions.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import indexes
import radapter
from indexes import ann
from indexes.collection import from_folder, from_retrieval_set, load_collections
from indexes.keys import ModelKey, file_sha256
from indexes.store import CRASH_STEPS
from radapter import atomic
from radapter.data.sets import RetrievalSet
from tests.conftest import randomize_adapters

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _png(path, rgb, seed):
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


@pytest.fixture
def photos(tmp_path):
    """A folder of 16 PNGs in 4 colour sub-folders and a CSV of two captions per image."""
    root = tmp_path / "photos"
    rows = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(4):
            rel = f"{name}/{i}.png"
            _png(root / rel, rgb, seed=10 * c + i)
            rows += [{"image": rel, "caption": f"a {name} square number {i}"},
                     {"image": rel, "caption": f"{name} noise {i}"}]
    table = root / "captions.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    return root, table


@pytest.fixture
def adapted(tiny, tmp_path):
    """The tiny model with trained-looking adapters saved to a file, merged at 0.5."""
    model, preprocess, tok = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig())
    randomize_adapters(model, std=0.2)
    path = radapter.save_adapters(model, tmp_path / "a.safetensors", default_alpha=0.5)
    return indexes.Embedder(model, preprocess, tok, adapter_sha256=file_sha256(path), alpha=0.5,
                            adapter_path=str(path)), path


def _table_collection(table):
    return load_collections([f"table:{table}"])


# ----------------------------------------------------------------------------- build and query
def test_build_query_round_trip(adapted, photos, tmp_path):
    emb, _ = adapted
    coll = _table_collection(photos[1])
    res = indexes.build_index(tmp_path / "idx", emb, coll, progress=False)
    assert res.status == "built" and res.embedded == {"image": 16, "text": 32}
    idx = indexes.open_index(tmp_path / "idx")
    m = idx.manifest
    assert m["key"] == emb.key.to_json() and m["alpha"] == 0.5 and m["dim"] == emb.dim
    assert m["count"] == {"image": 16, "text": 32} and m["collection"]["hash"] == coll.hash()
    assert m["model"]["fingerprint"] == emb.base_fingerprint and m["model"]["adapter_sha256"] == emb.adapter_sha256
    assert m["parts"]["image"]["index"]["type"] == "flat" and m["parts"]["image"]["index"]["metric"] == "inner_product"
    assert {"created", "updated", "versions", "history"} <= m.keys()

    # image -> image: an indexed image finds itself first, with cosine 1
    path = coll.images[5]
    hits = idx.image_to_image(emb, path, k=3)
    assert hits[0].id == 5 and hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].meta["path"] == path
    assert [h.rank for h in hits] == [0, 1, 2] and hits[0].score >= hits[1].score >= hits[2].score
    # text -> image and image -> text carry metadata; scores are the cosines of the stored embeddings
    t2i = idx.text_to_image(emb, ["a red square number 0", "blue noise 3"], k=4)
    assert len(t2i) == 2 and all(len(h) == 4 for h in t2i)
    q = emb.embed("text", ["a red square number 0"])[0]
    assert t2i[0][0].score == pytest.approx(float(idx.embeddings("image")[t2i[0][0].id] @ q), abs=1e-5)
    i2t = idx.image_to_text(emb, [Image.open(path)], k=2)[0]
    assert {"caption", "image_id", "path", "label", "source"} <= i2t[0].meta.keys()
    # batch API: raw vectors need the model key
    scores, ids = idx.search("image", idx.embeddings("image")[:4], k=1, key=emb.key)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and scores.shape == (4, 1)


def test_metadata_rows_and_ids(adapted, photos, tmp_path):
    emb, _ = adapted
    coll = _table_collection(photos[1])
    indexes.build_index(tmp_path / "idx", emb, coll, progress=False)
    idx = indexes.open_index(tmp_path / "idx")
    images, texts = idx.rows("image"), idx.rows("text")
    assert [r["id"] for r in images] == list(range(16)) and [r["id"] for r in texts] == list(range(32))
    assert [r["path"] for r in images] == coll.images
    assert images[0]["label"] is None and images[0]["caption"] == "a red square number 0"
    for r in texts:  # each caption points at its image
        assert images[r["image_id"]]["path"] == r["path"]
        assert r["caption"].split()[-1] == images[r["image_id"]]["path"].split("/")[-1][0]
    # embeddings: row = id, L2-normalised, the embedder's own
    vec = idx.embeddings("image")
    assert vec.dtype == np.float32 and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
    assert np.allclose(vec[7], emb.embed("image", [coll.images[7]])[0], atol=1e-5)
    # folder collections label by sub-folder; array images get pseudo-paths
    assert from_folder(photos[0]).image_rows[0]["label"] == "blue"
    rset = RetrievalSet("arr", np.zeros((2, 8, 8, 3), np.uint8), ["x", "y"], np.array([0, 1]))
    assert from_retrieval_set(rset, "arr").image_rows[1]["path"] == "arr#1"


def test_failed_build_keeps_previous_index_and_resumes(adapted, photos, tmp_path):
    emb, _ = adapted
    root, _ = photos
    out = tmp_path / "idx"
    indexes.build_index(out, emb, from_folder(root), progress=False)
    before = (out / "manifest.json").read_text()
    bad = root / "zzz" / "broken.png"  # sorts last: 16 images embed, then the build fails
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    with pytest.raises(indexes.IndexBuildError, match="previous index is intact"):
        indexes.build_index(out, emb, from_folder(root), chunk_size=4, progress=False)
    assert (out / "manifest.json").read_text() == before
    idx = indexes.open_index(out)
    assert idx.count("image") == 16 and idx.image_to_image(emb, str(root / "red" / "0.png"), k=1)[0].score > 0.99
    assert not list(tmp_path.glob(".idx.*.tmp"))  # no half-written folder left behind
    _png(bad, (0, 0, 0), seed=99)
    res = indexes.build_index(out, emb, from_folder(root), chunk_size=4, progress=False)
    assert res.reused == {"image": 16} and res.embedded == {"image": 1}
    assert indexes.open_index(out).count("image") == 17
    assert not (tmp_path / ".idx.work").exists()


def test_up_to_date_build_is_skipped(adapted, photos, tmp_path):
    emb, _ = adapted
    coll = _table_collection(photos[1])
    indexes.build_index(tmp_path / "idx", emb, coll, progress=False)
    assert indexes.build_index(tmp_path / "idx", emb, coll, progress=False).status == "up to date"
    assert indexes.build_index(tmp_path / "idx", emb, coll, force=True, progress=False).status == "built"


# ----------------------------------------------------------------------------- keys
def test_mismatched_model_adapter_or_alpha_is_refused(adapted, photos, tmp_path):
    emb, _ = adapted
    indexes.build_index(tmp_path / "idx", emb, from_folder(photos[0]), progress=False)
    idx = indexes.open_index(tmp_path / "idx")
    emb.set_alpha(0.3)  # the same model re-merged: its key follows
    with pytest.raises(indexes.IndexMismatchError, match=r"alpha 0\.5, not 0\.3") as e:
        idx.text_to_image(emb, "red", k=1)
    assert "\n" not in str(e.value)
    with pytest.raises(indexes.IndexMismatchError):
        idx.search("image", np.zeros((1, idx.dim), np.float32), key=emb.key)
    emb.set_alpha(0.5)
    assert idx.text_to_image(emb, "red", k=1)
    other = indexes.Embedder(emb.model, emb.preprocess, emb.tokenizer, adapter_sha256="0" * 64)
    with pytest.raises(indexes.IndexMismatchError, match="adapter"):
        idx.text_to_image(other, "red", k=1)
    torch.manual_seed(1)
    m2, p2, t2 = radapter.load_model(radapter.TINY_MODEL)
    with pytest.raises(indexes.IndexMismatchError, match="base model"):
        idx.text_to_image(indexes.Embedder(m2, p2, t2), "red", k=1)
    # adding with another alpha is refused as well
    emb.set_alpha(0.7)
    with pytest.raises(indexes.IndexMismatchError):
        indexes.add_to_index(tmp_path / "idx", emb, from_folder(photos[0]), progress=False)
    with pytest.raises(ValueError):
        ModelKey("f", "a", None)


def test_embedder_refuses_inconsistent_setups(tiny):
    model, preprocess, tok = tiny
    with pytest.raises(indexes.IndexStoreError, match="no adapters"):
        indexes.Embedder(model, preprocess, tok, alpha=0.5)
    radapter.add_adapters(model, radapter.RAdapterConfig())
    with pytest.raises(indexes.IndexStoreError, match="sha256"):
        indexes.Embedder(model, preprocess, tok, alpha=0.5)
    with pytest.raises(indexes.IndexStoreError, match="merge"):
        indexes.Embedder(model, preprocess, tok, adapter_sha256="x")


# ----------------------------------------------------------------------------- cache and alpha grid
def test_cache_hit_miss_and_reindex(adapted, photos, tmp_path):
    emb, _ = adapted
    cache = indexes.IndexCache(tmp_path / "cache")
    coll = _table_collection(photos[1])
    first = cache.get_or_build(emb, coll)
    assert not first.hit and first.build.embedded == {"image": 16, "text": 32}
    again = indexes.get_or_build(tmp_path / "cache", emb, _table_collection(photos[1]))
    assert again.hit and again.index.path == first.index.path
    # another index type: re-indexed from the cached embeddings, not re-embedded
    hnsw = cache.get_or_build(emb, coll, index_type="hnsw")
    assert not hnsw.hit and hnsw.build.status == "re-indexed" and not hnsw.build.embedded
    assert hnsw.index.manifest["parts"]["image"]["index"]["type"] == "hnsw"
    assert cache.get_or_build(emb, coll, index_type="hnsw").hit
    # another alpha or another collection: a miss and a second folder
    emb.set_alpha(0.8)
    assert not cache.get_or_build(emb, coll).hit
    assert not cache.get_or_build(emb, coll.select(["image"])).hit
    assert len(cache.entries()) == 3


def test_nearest_alpha_and_grid(adapted, photos, tmp_path):
    emb, _ = adapted
    cache = indexes.IndexCache(tmp_path / "cache")
    coll = from_folder(photos[0])
    seen = []
    indexes.build_alpha_grid(cache, emb, coll, [0.0, 1.0, 0.5], on_built=lambda a, r: seen.append(a))
    assert seen == [0.5, 0.0, 1.0]  # nearest to the embedder's alpha (0.5) first
    assert emb.alpha == 0.5  # merged back where it started
    assert sorted(cache.alphas(emb.base_fingerprint, emb.adapter_sha256, coll.hash())) == [0.0, 0.5, 1.0]
    near = indexes.nearest_alpha_index(cache, emb, coll, 0.33)
    assert near.alpha == 0.5 and not near.exact and near.index.alpha == 0.5
    assert indexes.nearest_alpha_index(cache, emb, coll, 0.25).alpha == 0.0  # tie: the smaller alpha
    assert indexes.nearest_alpha_index(cache, emb, coll, 1.0).exact
    assert indexes.nearest_alpha_index(cache, emb, coll, 0.33, max_distance=0.1) is None
    assert indexes.nearest_alpha_index(cache, emb, coll.hash()[::-1], 0.5) is None
    # the index at 0.5 answers the model at 0.5 only
    emb.set_alpha(0.3)
    with pytest.raises(indexes.IndexMismatchError):
        near.index.text_to_image(emb, "red", k=1)
    emb.set_alpha(near.alpha)
    assert near.index.text_to_image(emb, "red", k=1)


def test_background_grid_uses_its_own_model_copy(adapted, photos, tmp_path):
    emb, _ = adapted
    coll = from_folder(photos[0])
    job = indexes.start_alpha_grid(tmp_path / "cache", emb, coll, [0.2, 0.5, 0.9])
    assert job.wait(timeout=60) and job.done
    assert job.alphas == [0.5, 0.2, 0.9] and sorted(job.built) == [0.2, 0.5, 0.9]
    assert emb.alpha == 0.5 and radapter.merged_alpha(emb.model) == 0.5
    # the copy embeds exactly like the original model merged at the same alpha
    res = indexes.get_or_build(tmp_path / "cache", emb, coll)
    assert res.hit
    stopped = indexes.start_alpha_grid(tmp_path / "cache2", emb, coll, [0.1, 0.2, 0.3])
    stopped.cancel()
    stopped.wait(timeout=60)
    assert len(stopped.built) <= 3


# ----------------------------------------------------------------------------- incremental adds
def test_incremental_add(adapted, photos, tmp_path):
    emb, _ = adapted
    root, _ = photos
    out = tmp_path / "idx"
    indexes.build_index(out, emb, from_folder(root), index_type="hnsw", progress=False)
    for i in range(4, 7):
        _png(root / "purple" / f"{i}.png", (150, 30, 160), seed=100 + i)
    res = indexes.add_to_index(out, emb, from_folder(root), progress=False)
    assert res.status == "added" and res.embedded == {"image": 3}
    idx = indexes.open_index(out)
    assert idx.count("image") == 19 and [r["id"] for r in idx.rows("image")] == list(range(19))
    assert len(idx.manifest["parts"]["image"]["shards"]) == 2 and idx.embeddings("image").shape[0] == 19
    assert idx.manifest["parts"]["image"]["index"]["type"] == "hnsw"
    assert [h["op"] for h in idx.manifest["history"]] == ["build", "add"]
    hit = idx.image_to_image(emb, str(root / "purple" / "5.png"), k=1)[0]
    assert hit.id >= 16 and hit.meta["label"] == "purple"
    # rows and embeddings read across shards, on demand
    assert idx.row("image", 17)["label"] == "purple" and idx.row("image", 0)["id"] == 0
    vec = idx.embeddings("image")
    assert np.array_equal(vec[[1, 16, 18]], np.asarray(vec)[[1, 16, 18]]) and np.array_equal(vec[15:17], vec[[15, 16]])
    # the same set of items gives the same collection hash as a build from scratch
    assert idx.collection_hash == from_folder(root).hash()
    assert indexes.add_to_index(out, emb, from_folder(root), progress=False).status == "up to date"
    # captions can be added to an image-only index; they link to the indexed images
    caps = load_collections([f"table:{photos[1]}"])
    res = indexes.add_to_index(out, emb, caps, progress=False)
    assert res.embedded == {"text": 32}
    idx = indexes.open_index(out)
    r = idx.rows("text")[0]
    assert idx.rows("image")[r["image_id"]]["path"] == r["path"]
    # a file changed in place is refused (rebuild instead)
    _png(root / "red" / "0.png", (0, 0, 0), seed=7)
    with pytest.raises(indexes.IndexBuildError, match="changed on disk"):
        indexes.add_to_index(out, emb, from_folder(root), progress=False)


# ----------------------------------------------------------------------------- index types
@pytest.mark.parametrize("kind, params", [
    ("flat", {}), ("hnsw", {"m": 8, "ef_construction": 20, "ef_search": 16}), ("ivf", {"nlist": 4, "nprobe": 4}),
    ("ivfpq", {"nlist": 2, "nprobe": 2, "pq_m": 4, "pq_bits": 4}), ("factory", {"factory": "IVF2,SQ8"}),
])
def test_each_index_type_builds_and_answers(adapted, photos, tmp_path, kind, params):
    emb, _ = adapted
    coll = load_collections([f"table:{photos[1]}", f"folder:{photos[0]}"])  # 32 images (16 twice), 32 captions
    res = indexes.build_index(tmp_path / kind, emb, coll, index_type=kind, index_params=params, progress=False)
    idx = indexes.open_index(tmp_path / kind)
    spec = idx.manifest["parts"]["image"]["index"]
    assert spec["type"] == kind and all(spec["params"][k] == v for k, v in params.items())
    assert res.manifest["parts"]["text"]["count"] == 32
    hits = idx.image_to_image(emb, coll.images[3], k=5)
    assert len(hits) == 5 and all(0 <= h.id < 32 for h in hits)
    # the query image itself (or its twin) comes first; IVF-PQ's candidates are re-scored exactly
    assert hits[0].meta["path"] == coll.images[3] and hits[0].score == pytest.approx(1.0, abs=1e-2)
    assert indexes.retrieval_recall(idx)["t2i_r10"] >= 0
    _, ids = idx.search("image", idx.embeddings("image")[:2], k=3, key=emb.key, ef_search=8, nprobe=1)
    assert ids.shape == (2, 3)


def test_choose_spec_by_size_and_tuning():
    assert ann.choose_spec(1000, 64).kind == "flat"
    assert ann.choose_spec(ann.AUTO_FLAT_MAX + 1, 64).kind == "hnsw"
    big = ann.choose_spec(ann.AUTO_HNSW_MAX + 1, 512)
    assert big.kind == "ivfpq" and big.params["pq_m"] == 64 and big.params["pq_bits"] == 8
    assert ann.choose_spec(1_000_000, 256, "ivf").params == {"nlist": 4096, "nprobe": 64}
    assert ann.choose_spec(50, 8, "ivf").params["nlist"] == 1
    assert ann.choose_spec(1000, 64, "auto", nprobe=3).params == {}  # parameters of other types are ignored
    with pytest.raises(indexes.IndexBuildError, match="takes no parameter"):
        ann.choose_spec(1000, 64, "flat", nprobe=3)
    with pytest.raises(indexes.IndexBuildError, match="unknown index type"):
        ann.choose_spec(1000, 64, "lsh")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    truth = ann.build(x, ann.IndexSpec("flat"))[0].search(q, 10)[1]
    index, trained = ann.build(x, ann.choose_spec(len(x), 16, "ivf", nlist=16))
    assert trained == 1024
    tuned = ann.tune(index, q, truth, target=0.9)
    assert tuned["param"] == "nprobe" and tuned["reached"] and tuned["curve"][tuned["value"]] >= 0.9


# ----------------------------------------------------------------------------- retrieval evaluation
def test_recall_through_flat_index_equals_brute_force(adapted, photos, tmp_path):
    emb, _ = adapted
    coll = _table_collection(photos[1])
    indexes.build_index(tmp_path / "idx", emb, coll, progress=False)
    idx = indexes.open_index(tmp_path / "idx")
    through = indexes.retrieval_recall(idx)
    exact = indexes.brute_force_recall(idx)
    assert {k: through[k] for k in exact} == exact
    # and equals the library's own evaluation of the same set with the same merged model
    from radapter.data.formats import image_text_table
    from radapter.evaluation import evaluate_retrieval

    lib = evaluate_retrieval(emb.model, emb.tokenizer, emb.preprocess, image_text_table(photos[1]), progress=False)
    for k in exact:
        assert through[k] == pytest.approx(lib[k])


def test_evaluate_id_and_ood_sets_through_the_cache(adapted, photos, tmp_path):
    from indexes.evaluate import evaluate_sets

    emb, _ = adapted
    table = photos[1]
    shifted = tmp_path / "shifted"  # the same captions over noisier images: an "OOD" style
    for name, rgb in COLOURS.items():
        for i in range(4):
            _png(shifted / name / f"{i}.png", tuple(c // 2 for c in rgb), seed=50 + i)
    (shifted / "captions.csv").write_text(table.read_text())
    sets = {"id": f"table:{table}", "ood": f"table:{shifted / 'captions.csv'}"}
    res = evaluate_sets(tmp_path / "cache", emb, sets, check_exact=True, progress=False)
    assert set(res) == {"id", "ood"} and not res["id"]["cached"]
    for r in res.values():
        assert {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= r.keys()
        assert {k: r[k] for k in r["exact"]} == r["exact"] and r["alpha"] == 0.5
    assert evaluate_sets(tmp_path / "cache", emb, sets, progress=False)["ood"]["cached"]


def test_embedder_load_reads_the_adapter_file(adapted):
    emb, path = adapted
    torch.manual_seed(0)  # the same random-init tiny model the adapter was saved on
    loaded = indexes.Embedder.load(radapter.TINY_MODEL, adapter=path)
    assert loaded.key == emb.key and loaded.alpha == 0.5 and loaded.adapter_path == str(path)
    torch.manual_seed(0)
    assert indexes.Embedder.load(radapter.TINY_MODEL, adapter=path, alpha=0.2).key.alpha == 0.2
    with pytest.raises(indexes.IndexStoreError, match="--alpha needs --adapter"):
        indexes.Embedder.load(radapter.TINY_MODEL, alpha=0.2)


# ----------------------------------------------------------------------------- CLIs and export
def test_build_cli_eval_cli_and_export(photos, tmp_path, capsys):
    from indexes.build import main as build_main
    from indexes.cli import main as cli_main

    def seeded(main, argv, seed=0):  # the tiny model is random-init: the seed makes it the same model
        torch.manual_seed(seed)
        return main(argv)

    out = tmp_path / "idx"
    common = ["--collection", f"table:{photos[1]}", "--model", radapter.TINY_MODEL, "--no-progress"]
    assert seeded(build_main, [str(out), *common, "--index-type", "hnsw", "--hnsw-m", "8"]) == 0
    assert "built:" in capsys.readouterr().out
    assert seeded(build_main, [str(out), *common, "--index-type", "hnsw", "--hnsw-m", "8"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli_main(["reindex", str(out), "--index-type", "flat"]) == 0
    assert cli_main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["parts"]["image"]["index"]["type"] == "flat"
    assert cli_main(["eval", str(out), "--check-exact"]) == 0
    res = json.loads(capsys.readouterr().out)["idx"]
    assert {k: res[k] for k in res["exact"]} == res["exact"]
    search = ["search", str(out), "--text", "a red square", "-k", "2", "--model", radapter.TINY_MODEL]
    assert seeded(cli_main, search) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "path" in json.loads(lines[0])
    # another model's query is refused with one line and exit status 2
    assert seeded(cli_main, search, seed=1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: index") and "base model" in err and "\n" not in err
    assert build_main(["--collection", "nope:thing", str(tmp_path / "x"), "--model", radapter.TINY_MODEL]) == 2
    assert "cannot read collection" in capsys.readouterr().err
    assert cli_main(["export", str(out), "--out", str(tmp_path / "qdrant"), "--part", "text"]) == 0
    points = (tmp_path / "qdrant" / "text.points.jsonl").read_text().splitlines()
    first = json.loads(points[0])
    assert len(points) == 32 and first["id"] == 0 and len(first["vector"]) == 32
    assert first["payload"]["base_fingerprint"] and "caption" in first["payload"]
    config = json.loads((tmp_path / "qdrant" / "text.collection.json").read_text())
    assert config == {"vectors": {"size": 32, "distance": "Cosine"}}


def test_build_cli_help_documents_the_options(capsys):
    from indexes.build import main as build_main

    with pytest.raises(SystemExit):
        build_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--collection", "--model", "--adapter", "--alpha", "--index-type", "--ef-search", "--nprobe",
                 "--add", "--cache", "--alphas", "--chunk-size", "emoji:google-test"):
        assert flag in text


# ----------------------------------------------------------------------------- crash safety
class Killed(BaseException):
    """Raised where the process is "killed" (not an Exception: nothing in the build may catch it)."""


#: The steps of a rebuild and of an add, by swap mode (each one is killed in turn below).
WRITE_STEPS = {
    "exchange": ["file.written", "index.chunk", "dir.created", "index.part", "dir.filled", "dir.exchanged",
                 "dir.deleting", "index.swapped", "dir.trashed"],
    "rename": ["file.written", "index.chunk", "dir.created", "index.part", "dir.filled", "dir.moved-aside",
               "dir.swapped", "dir.trashed", "dir.deleting", "index.swapped"],
}
KILL_CASES = [(swap, step) for swap, steps in WRITE_STEPS.items() for step in steps]


def _use_swap(swap, monkeypatch):
    if swap == "rename":  # the swap of systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange_supported", False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("no atomic exchange on this system")


def _kills(monkeypatch, tmp_path, step, pristine, run):
    """Run ``run(store)`` on a fresh copy of the folder ``pristine`` once per report of ``step``, killed at
    that report; yields a copy of the store as each kill left it (what a SIGKILL there leaves on disk)."""
    dry = tmp_path / "dry"
    shutil.copytree(pristine, dry)
    steps = []
    monkeypatch.setattr(atomic, "crash_hook", steps.append)
    run(dry)
    assert set(steps) <= set(atomic.STEPS) | set(CRASH_STEPS)
    for nth in range(1, steps.count(step) + 1):
        live, killed = tmp_path / f"live{nth}", tmp_path / f"killed{nth}"
        shutil.copytree(pristine, live)
        seen = []

        def hook(s, nth=nth, live=live, killed=killed, seen=seen):
            if s == step and len(seen) < nth:
                seen.append(s)
                if len(seen) == nth:
                    shutil.copytree(live, killed, symlinks=True)
                    raise Killed(f"{step} #{nth}")

        monkeypatch.setattr(atomic, "crash_hook", hook)
        with pytest.raises(Killed):
            run(live)
        monkeypatch.setattr(atomic, "crash_hook", None)
        yield killed
    assert steps.count(step), f"no {step} step"


def _complete(path, emb, counts):
    """Check ``path`` is a whole index of one of ``counts`` images; returns its count."""
    idx = indexes.open_index(path)
    n = idx.count("image")
    assert n in counts and idx.faiss_index("image").ntotal == n == idx.embeddings("image").shape[0]
    rows = idx.rows("image")
    assert [r["id"] for r in rows] == list(range(n))
    hit = idx.image_to_image(emb, rows[-1]["path"], k=1)[0]
    assert hit.id == n - 1 and hit.score == pytest.approx(1.0, abs=1e-4)
    return n


def _purple(root, n=3):
    for i in range(n):
        _png(root / "purple" / f"{i}.png", (150, 30, 160), seed=100 + i)


def test_write_steps_are_the_ones_tested(adapted, photos, tmp_path, monkeypatch):
    emb, _ = adapted
    for swap in WRITE_STEPS:
        if swap == "rename":
            monkeypatch.setattr(atomic, "_exchange_supported", False)
        root = shutil.copytree(photos[0], tmp_path / swap / "photos")
        out = tmp_path / swap / "idx"
        indexes.build_index(out, emb, from_folder(root), progress=False)
        _purple(root)
        steps = []
        monkeypatch.setattr(atomic, "crash_hook", steps.append)
        indexes.add_to_index(out, emb, from_folder(root), progress=False)
        assert list(dict.fromkeys(steps)) == WRITE_STEPS[swap]
        monkeypatch.setattr(atomic, "crash_hook", None)


@pytest.mark.parametrize("swap, step", KILL_CASES)
def test_rebuild_killed_at_each_step_leaves_a_whole_index_and_the_next_build_recovers(
        adapted, photos, tmp_path, monkeypatch, swap, step):
    emb, _ = adapted
    root, _ = photos
    _use_swap(swap, monkeypatch)
    store = tmp_path / "store"
    indexes.build_index(store / "idx", emb, from_folder(root), chunk_size=8, progress=False)
    _purple(root, 2)  # the rebuild: 18 images in 3 chunks

    def rebuild(folder):
        return indexes.build_index(folder / "idx", emb, from_folder(root), chunk_size=8, progress=False)

    for killed in _kills(monkeypatch, tmp_path, step, store, rebuild):
        if (killed / "idx").exists():
            _complete(killed / "idx", emb, {16, 18})
        else:  # killed between the two renames of the swap: the old index is whole, aside
            assert step == "dir.moved-aside" and _complete(killed / ".idx.old", emb, {16}) == 16
        res = rebuild(killed)
        assert res.status in ("built", "up to date") and _complete(killed / "idx", emb, {18}) == 18
        if step == "index.chunk":
            assert sum(res.reused.values()) > 0  # resumed from the chunks the killed run wrote
        assert sorted(os.listdir(killed)) == [".idx.lock", "idx"]
        shutil.rmtree(killed)


@pytest.mark.parametrize("swap, step", KILL_CASES)
def test_add_killed_at_each_step_leaves_a_whole_index_and_the_next_add_recovers(
        adapted, photos, tmp_path, monkeypatch, swap, step):
    emb, _ = adapted
    root, _ = photos
    _use_swap(swap, monkeypatch)
    store = tmp_path / "store"
    indexes.build_index(store / "idx", emb, from_folder(root), progress=False)
    _purple(root, 3)  # the add: 3 images in 2 chunks

    def add(folder):
        return indexes.add_to_index(folder / "idx", emb, from_folder(root), chunk_size=2, progress=False)

    for killed in _kills(monkeypatch, tmp_path, step, store, add):
        if (killed / "idx").exists():
            _complete(killed / "idx", emb, {16, 19})
        else:
            assert step == "dir.moved-aside" and _complete(killed / ".idx.old", emb, {16}) == 16
        res = add(killed)
        assert res.status in ("added", "up to date") and _complete(killed / "idx", emb, {19}) == 19
        assert len(indexes.open_index(killed / "idx").manifest["parts"]["image"]["shards"]) == 2
        assert sorted(os.listdir(killed)) == [".idx.lock", "idx"]
        assert indexes.build_index(killed / "idx", emb, from_folder(root), force=True, progress=False).status == "built"
        assert sorted(os.listdir(killed)) == [".idx.lock", "idx"]
        shutil.rmtree(killed)


def test_up_to_date_runs_remove_a_stale_work_folder(adapted, photos, tmp_path):
    emb, _ = adapted
    root, _ = photos
    out = tmp_path / "store" / "idx"
    indexes.build_index(out, emb, from_folder(root), progress=False)
    for run in (indexes.build_index, indexes.add_to_index):
        (out.parent / ".idx.work").mkdir()  # as a run killed after its swap leaves it
        (out.parent / ".idx.work" / "image-0123.npy").write_bytes(b"x" * 100)
        assert run(out, emb, from_folder(root), progress=False).status == "up to date"
        assert sorted(os.listdir(out.parent)) == [".idx.lock", "idx"]


def test_cache_hit_cleans_up_after_killed_runs_unless_one_is_running(adapted, photos, tmp_path):
    emb, _ = adapted
    cache = indexes.IndexCache(tmp_path / "cache")
    coll = from_folder(photos[0])
    path = cache.get_or_build(emb, coll).index.path
    junk = [path.with_name(f".{path.name}.k3j_x0q9.tmp"), path.with_name(f".{path.name}.work")]
    for folder in junk:  # a kill during assembly; one after the swap
        folder.mkdir()
        (folder / "img_emb_0000.npy").write_bytes(b"x" * 10000)
    held, release = threading.Event(), threading.Event()

    def holder():
        with atomic.folder_lock(path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    assert cache.get_or_build(emb, coll).hit and all(f.exists() for f in junk)  # a run holds it: no waiting
    release.set()
    t.join(10)
    assert cache.get_or_build(emb, coll).hit
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([path.name, f".{path.name}.lock"])


_KILL_SCRIPT = """
import os, signal, sys
import torch
from radapter import atomic
from indexes.cli import main
step, swap = sys.argv[1], sys.argv[2]
if swap == "rename":
    atomic._exchange_supported = False
atomic.crash_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
torch.manual_seed(0)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("step, swap", [("index.chunk", "exchange"), ("index.part", "exchange"),
                                        ("dir.moved-aside", "rename")])
def test_cli_add_sigkilled_then_add_again(photos, tmp_path, step, swap, capsys):
    """``python -m indexes add`` killed with SIGKILL mid-embedding, mid-assembly and mid-swap."""
    from indexes.cli import main as cli_main

    root, _ = photos
    out = tmp_path / "store" / "idx"
    args = [str(out), "--collection", f"folder:{root}", "--model", radapter.TINY_MODEL, "--no-progress",
            "--chunk-size", "2"]
    torch.manual_seed(0)
    assert cli_main(["build", *args]) == 0
    _purple(root, 3)
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, step, swap, "add", *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out if out.exists() else out.parent / ".idx.old").joinpath("manifest.json").is_file()
    assert sorted(os.listdir(out.parent)) != [".idx.lock", "idx"]  # the kill left something
    torch.manual_seed(0)
    assert cli_main(["add", *args]) == 0
    assert "added:" in capsys.readouterr().out
    idx = indexes.open_index(out)
    assert idx.count("image") == 19 and [r["id"] for r in idx.rows("image")] == list(range(19))
    assert sorted(os.listdir(out.parent)) == [".idx.lock", "idx"]
    torch.manual_seed(0)
    assert cli_main(["build", *args, "--force"]) == 0
    assert sorted(os.listdir(out.parent)) == [".idx.lock", "idx"]
