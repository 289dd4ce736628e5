"""Retrieval with the emoji-names adapter vs the zero-shot model: Recall@1/5/10 and typed queries.

    python -m benchmarks.retrieval_bench                    # writes docs/bench/retrieval.json
    python -m benchmarks.retrieval_bench --alphas 0 1 --out /tmp/r.json

For the zero-shot model (no adapter) and for the adapter merged at each alpha of ``--alphas``
(default 0, 0.2, ..., 1, plus the file's ``default_alpha``), builds a flat index of each test
set (``emoji:google-test``, the style the adapter trained on, and ``emoji:twitter-test``, the
same unseen emoji drawn by Twitter) through :func:`indexes.evaluate.evaluate_sets` and reports
its Recall@1/5/10 text->image and image->text, beside the brute-force numbers. Then it types
the queries a visitor would (``--query``) into the app's collection, as the app's retrieval
tab does (raw text, no template), and lists the top-k captions of the zero-shot model and of
the adapter at its default alpha, with how many of them are on topic (an image whose name or
short name holds one of the query's keywords as a word) and how many on-topic emoji the
collection holds at all. The test emoji are unseen in training (the split is by emoji), so a
query whose subject has no test emoji (e.g. "a dog") cannot be answered on topic by any model.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import radapter
from benchmarks.common import write_result
from indexes import Embedder, IndexCache, open_index
from indexes.evaluate import BENCHMARK_SETS, evaluate_sets
from indexes.keys import file_sha256
from indexes.recall import KS

DEFAULT_ADAPTER = "adapters/emoji-names.safetensors"
#: ID (the adapter's training style) and OOD test sets, named by style.
DEFAULT_SETS = {"google": BENCHMARK_SETS["emoji"]["id"], "twitter": BENCHMARK_SETS["emoji"]["ood"]}
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: What visitors type (from the issue and a few more), with the words that make a hit on topic.
DEFAULT_QUERIES: dict[str, tuple[str, ...]] = {
    "a cat": ("cat",),
    "a red heart": ("heart",),
    "a dog": ("dog",),
    "a car": ("car",),
    "pizza": ("pizza",),
    "a smiling face": ("smiling", "smile"),
}
DIRECTIONS = {"t2i": "text->image", "i2t": "image->text"}

Loaded = tuple[Any, Callable, Callable]


def _recalls(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{direction: {r1, r5, r10}}`` from the flat keys of :func:`indexes.recall.retrieval_recall`."""
    return {d: {f"r{k}": round(res[f"{d}_r{k}"], 4) for k in KS} for d in DIRECTIONS}


def _keyword_pattern(words: Sequence[str]) -> re.Pattern[str]:
    # Whole words (plural allowed): "car" must not match "card" or "carrot".
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")s?\b", re.IGNORECASE)


def _image_captions(index: Any) -> dict[int, list[str]]:
    """Every caption (name and short names) of each image id, from the index's text rows."""
    out: dict[int, list[str]] = {}
    for row in index.rows("text"):
        if row.get("image_id") is not None:
            out.setdefault(int(row["image_id"]), []).append(row["caption"])
    return out


def typed_queries(index: Any, embedder: Embedder, queries: dict[str, Sequence[str]], k: int
                  ) -> dict[str, dict[str, Any]]:
    """Top-``k`` images of each typed query (raw text, as the app sends it) with their captions,
    the number on topic, and the rank of the first on-topic image among all of them."""
    captions = _image_captions(index)
    n = index.manifest["parts"]["image"]["count"]
    texts = list(queries)
    # All n: the rank of the first on-topic image says how far a visitor would scroll.
    ranked = index.text_to_image(embedder, texts, n)
    out = {}
    for text, hits in zip(texts, ranked, strict=True):
        pat = _keyword_pattern(queries[text])
        topic = [any(pat.search(c) for c in captions.get(h.id, [])) for h in hits]
        out[text] = {
            "top": [{"caption": h.meta.get("caption"), "score": round(h.score, 4), "on_topic": t}
                    for h, t in zip(hits[:k], topic[:k], strict=True)],
            "on_topic_in_top_k": sum(topic[:k]),
            "first_on_topic_rank": topic.index(True) + 1 if any(topic) else None,
        }
    return out


def _on_topic_counts(index: Any, queries: dict[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    captions = _image_captions(index)
    out = {}
    for text, words in queries.items():
        pat = _keyword_pattern(words)
        names = [index.rows("image")[i]["caption"] for i, cs in sorted(captions.items())
                 if any(pat.search(c) for c in cs)]
        out[text] = {"keywords": list(words), "on_topic_in_collection": len(names), "on_topic_names": names}
    return out


def run_benchmark(loaded: Loaded, adapter: str | Path, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                  sets: dict[str, str] | None = None, queries: dict[str, Sequence[str]] | None = None,
                  query_set: str | None = None, k: int = 5, cache_dir: str | Path = "runs/retrieval-bench-cache",
                  data_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True
                  ) -> dict[str, Any]:
    """Recall of the zero-shot model and of ``adapter`` at each alpha, and the typed queries.

    ``loaded`` is ``radapter.load_model(...)``'s ``(model, preprocess, tokenizer)`` without
    adapters; the adapter file is loaded into that model after the zero-shot pass.
    ``query_set`` names the set of ``sets`` the queries run on (default: the first, ID).
    """
    sets = dict(sets or DEFAULT_SETS)
    queries = dict(DEFAULT_QUERIES if queries is None else queries)
    query_set = query_set or next(iter(sets))
    model, preprocess, tokenizer = loaded
    if radapter.has_adapters(model):
        raise ValueError("pass the base model: the zero-shot pass needs it without adapters")
    cache = IndexCache(cache_dir)
    data = str(data_dir) if data_dir is not None else None
    info = getattr(model, "radapter_model_info", None)
    t0 = time.perf_counter()

    def evaluate(embedder: Embedder) -> tuple[dict[str, Any], dict[str, str]]:
        """Recall per set, and each set's index folder."""
        # Flat indexes: exact search, so the index numbers must equal the brute-force ones.
        res = evaluate_sets(cache, embedder, sets, index_type="flat", data_dir=data, check_exact=True,
                            progress=progress)
        recalls = {name: {"set": r["set"], "images": r["images"], "captions": r["captions"], **_recalls(r),
                          "exact_matches_index": all(abs(r["exact"][f"{d}_r{kk}"] - r[f"{d}_r{kk}"]) < 1e-9
                                                     for d in DIRECTIONS for kk in KS)}
                   for name, r in res.items()}
        return recalls, {name: r["index"] for name, r in res.items()}

    steps = tqdm(total=1 + len(alphas), desc="models", disable=not progress)
    zs_embedder = Embedder(model, preprocess, tokenizer, batch_size=batch_size)
    zero_shot, paths = evaluate(zs_embedder)
    zs_index = open_index(paths[query_set])
    zs_queries = typed_queries(zs_index, zs_embedder, queries, k)
    steps.update()

    meta = radapter.load_adapters(model, adapter)
    default_alpha = float(meta["default_alpha"])
    grid = sorted({round(float(a), 6) for a in alphas} | {round(default_alpha, 6)})
    steps.total = 1 + len(grid)
    embedder = Embedder(model, preprocess, tokenizer, adapter_sha256=file_sha256(adapter), alpha=grid[0],
                        adapter_path=str(adapter), batch_size=batch_size)
    by_alpha: dict[str, Any] = {}
    ad_queries: dict[str, Any] = {}
    for a in grid:
        embedder.set_alpha(a)
        by_alpha[f"{a:g}"], paths = evaluate(embedder)
        if a == round(default_alpha, 6):
            ad_queries = typed_queries(open_index(paths[query_set]), embedder, queries, k)
        steps.update()
    steps.close()

    default = by_alpha[f"{default_alpha:g}"]
    delta = {s: {d: {r: round(default[s][d][r] - zero_shot[s][d][r], 4) for r in zero_shot[s][d]}
                 for d in DIRECTIONS} for s in sets}
    alpha0 = by_alpha.get("0")
    example_rows = _on_topic_counts(zs_index, queries)
    for text in queries:
        example_rows[text]["zero_shot"] = zs_queries[text]
        example_rows[text]["adapter"] = ad_queries[text]
    return {
        "model": info.name if info else type(model).__name__,
        "fingerprint": zs_embedder.base_fingerprint,
        "adapter": {"path": str(adapter), "sha256": embedder.adapter_sha256, "default_alpha": default_alpha,
                    "training": meta.get("training")},
        "sets": sets,
        "metric": "Recall@k through flat FAISS indexes (indexes.recall.retrieval_recall); t2i: a caption "
                  "counts when its image is in its top k; i2t: an image counts when any of its captions is",
        "zero_shot": zero_shot,
        "adapter_by_alpha": by_alpha,
        "adapter_default_minus_zero_shot": delta,
        "alpha0_equals_zero_shot": None if alpha0 is None else all(
            alpha0[s][d] == zero_shot[s][d] for s in sets for d in DIRECTIONS),
        "examples": {"set": sets[query_set], "k": k, "alpha": default_alpha,
                     "how": "raw query text through RetrievalIndex.text_to_image, as the app's retrieval tab",
                     "queries": example_rows},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of the result (recall per direction and style; typed queries)."""
    da = result["adapter"]["default_alpha"]
    lines = []
    for d, label in DIRECTIONS.items():
        lines += [f"\n{label}\n", "| model | " + " | ".join(f"{s} R@{k}" for s in result["sets"] for k in KS) + " |",
                  "|---|" + "---:|" * (len(KS) * len(result["sets"]))]
        rows = [("zero-shot", result["zero_shot"])]
        rows += [(f"adapter, alpha {a}" + (" (default)" if float(a) == da else ""), r)
                 for a, r in result["adapter_by_alpha"].items()]
        for name, r in rows:
            lines.append(f"| {name} | " + " | ".join(f"{r[s][d][f'r{k}']:.3f}" for s in result["sets"] for k in KS)
                         + " |")
    ex = result["examples"]
    lines += [f"\nTyped queries on {ex['set']}, top {ex['k']} (* = on topic)\n",
              "| query | on-topic emoji in the set | zero-shot | adapter |", "|---|---:|---|---|"]
    for text, q in ex["queries"].items():
        def cell(side: dict[str, Any]) -> str:
            return ", ".join(h["caption"] + ("*" if h["on_topic"] else "") for h in side["top"])
        lines.append(f"| {text} | {q['on_topic_in_collection']} | {cell(q['zero_shot'])} | {cell(q['adapter'])} |")
    return "\n".join(lines)


def _parse_query(item: str) -> tuple[str, tuple[str, ...]]:
    text, _, words = item.partition("=")
    return text, tuple(w for w in words.split(",") if w) or (text.split()[-1],)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name (default: the offline default model)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--adapter", default=DEFAULT_ADAPTER, help="adapter file to compare with the zero-shot model")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                   help="merge alphas (the adapter's default_alpha is always added)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=SPEC",
                   help="a test collection (repeatable; default google=emoji:google-test twitter=emoji:twitter-test)")
    p.add_argument("--query", action="append", default=[], metavar="TEXT[=WORD,WORD]",
                   help="a typed query and its on-topic words (repeatable; default: the issue's and a few more)")
    p.add_argument("-k", type=int, default=5, help="captions shown per typed query")
    p.add_argument("--cache", default="runs/retrieval-bench-cache", help="index cache folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="docs/bench/retrieval.json")
    args = p.parse_args()  # sys.argv: write_result records it as the command
    sets = dict(s.partition("=")[::2] for s in args.set) or None
    queries = dict(_parse_query(q) for q in args.query) or None
    loaded = radapter.load_model(args.model, pretrained=args.pretrained) if args.model else radapter.load_model()
    result = run_benchmark(loaded, args.adapter, alphas=args.alphas, sets=sets, queries=queries, k=args.k,
                           cache_dir=args.cache, data_dir=args.data_dir, batch_size=args.batch_size,
                           progress=not args.no_progress)
    write_result(args.out, result, "benchmarks.retrieval_bench")
    print(tables(result))


if __name__ == "__main__":
    main()
