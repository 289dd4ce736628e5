"""Retrieval evaluation through the indexes: Recall@1/5/10 image->text and text->image, ID vs OOD.

Recall is computed by searching the indexes (:mod:`indexes.recall`); ``--check-exact`` adds
the brute-force numbers (full cosine matrix, no FAISS). ID vs OOD: e.g. ``emoji:google-test``
(the style adapters train on) vs ``emoji:twitter-test`` (the same emoji in Twitter's style).

    python -m indexes.evaluate runs/indexes/google runs/indexes/twitter
    python -m indexes.evaluate --benchmark emoji --cache runs/index-cache --adapter a.safetensors --alpha 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import radapter
from radapter.errors import RAdapterError

from .errors import IndexStoreError

__all__ = ["BENCHMARK_SETS", "evaluate_indexes", "evaluate_sets", "main"]

#: ID and OOD retrieval sets of the benchmarks that have them.
BENCHMARK_SETS = {"emoji": {"id": "emoji:google-test", "ood": "emoji:twitter-test"}}


def evaluate_indexes(paths: Sequence[str | Path], *, check_exact: bool = False, **search_params: Any
                     ) -> dict[str, Any]:
    """Recall of each index folder (named by its folder), optionally beside the brute-force numbers."""
    from .index import RetrievalIndex
    from .recall import brute_force_recall, retrieval_recall

    out = {}
    for p in paths:
        index = RetrievalIndex(p)
        res = retrieval_recall(index, **search_params)
        if check_exact:
            res["exact"] = brute_force_recall(index)
        out[Path(p).name] = res
    return out


def evaluate_sets(cache: Any, embedder: Any, sets: dict[str, str], *, index_type: str = "auto",
                  data_dir: str | None = None, caption_template: str | None = None, check_exact: bool = False,
                  progress: bool = True, **search_params: Any) -> dict[str, Any]:
    """Build (or take from ``cache``) the index of each named collection spec and evaluate it."""
    from .cache import IndexCache
    from .collection import parse_collection
    from .recall import brute_force_recall, retrieval_recall

    cache = cache if isinstance(cache, IndexCache) else IndexCache(cache)
    out: dict[str, Any] = {}
    for name, spec in sets.items():
        coll = parse_collection(spec, caption_template=caption_template, data_dir=data_dir)
        res = cache.get_or_build(embedder, coll, index_type=index_type, progress=progress)
        out[name] = {"set": spec, "index": str(res.index.path), "cached": res.hit,
                     **retrieval_recall(res.index, **search_params)}
        if check_exact:
            out[name]["exact"] = brute_force_recall(res.index)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m indexes.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("indexes", nargs="*", help="index folders to evaluate (each needs image and text parts)")
    p.add_argument("--benchmark", choices=sorted(BENCHMARK_SETS),
                   help="evaluate the benchmark's ID and OOD retrieval sets (built into --cache as needed)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=SPEC",
                   help="a named collection to build into --cache and evaluate (repeatable), "
                        "e.g. id=emoji:google-test")
    p.add_argument("--cache", default="runs/index-cache", help="index cache folder for --benchmark/--set")
    p.add_argument("--model", default=None, help="model name or path (default: radapter's offline default model)")
    p.add_argument("--pretrained", default=None, help="pretrained tag or local weights file")
    p.add_argument("--adapter", default=None, help="adapter .safetensors file")
    p.add_argument("--alpha", type=float, default=None, help="merge alpha (default: the adapter's default_alpha)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--index-type", default="auto", help="index type of new builds (auto, flat, hnsw, ivf, ivfpq)")
    p.add_argument("--caption-template", default=None, help="template for captions, {} = caption")
    p.add_argument("--data-dir", default=None, help="prepared benchmark folder (default $RADAPTER_DATA)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search depth for this evaluation")
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched for this evaluation")
    p.add_argument("--check-exact", action="store_true", help="also compute brute-force recall (no FAISS)")
    p.add_argument("--batch-size", type=int, default=64)
    radapter.add_keep_freed_memory_option(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = {k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v is not None}
    try:
        result: dict[str, Any] = {}
        if args.indexes:
            result.update(evaluate_indexes(args.indexes, check_exact=args.check_exact, **params))
        sets = dict(BENCHMARK_SETS.get(args.benchmark, {})) if args.benchmark else {}
        for item in args.set:
            name, sep, spec = item.partition("=")
            if not sep:
                raise IndexStoreError(f"--set {item!r}: expected NAME=SPEC")
            sets[name] = spec
        if sets:
            from .embedder import Embedder

            if args.keep_freed_memory:
                radapter.keep_freed_memory()

            embedder = Embedder.load(args.model, pretrained=args.pretrained, adapter=args.adapter, alpha=args.alpha,
                                     device=args.device, batch_size=args.batch_size)
            result.update(evaluate_sets(args.cache, embedder, sets, index_type=args.index_type,
                                        data_dir=args.data_dir, caption_template=args.caption_template,
                                        check_exact=args.check_exact, progress=not args.no_progress, **params))
        if not result:
            raise IndexStoreError("nothing to evaluate: give index folders, --benchmark or --set")
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        from radapter.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
