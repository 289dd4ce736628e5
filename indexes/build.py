"""Build a FAISS index folder of image and/or caption embeddings for one model, adapter and alpha.

    python -m indexes.build runs/indexes/emoji-google --collection emoji:google-test
    python -m indexes.build runs/indexes/photos --collection folder:/data/photos --index-type hnsw \\
        --model ViT-B-32 --pretrained /models/vit-b-32.safetensors --adapter a.safetensors --alpha 0.5
    python -m indexes.build runs/indexes/photos --collection folder:/data/photos --add   # only new files
    python -m indexes.build --cache runs/index-cache --collection emoji:google-test \\
        --adapter a.safetensors --alphas 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1

Collections (repeat --collection to join several): BENCH:SET (a prepared benchmark's
retrieval set, e.g. emoji:google-test or emoji:twitter-all), folder:PATH (every image
below PATH; label = sub-folder), table:PATH[,IMAGE_ROOT] (CSV/JSONL of image,caption[,group]),
coco:CAPTIONS.json,IMAGE_DIR, captions:PATH (one caption per line), or a plain folder or
table path.

Writes are atomic: a failed or interrupted build or add (even one killed) leaves the previous
index intact, the next run of the same folder cleans up what it left, and re-running the same
command resumes from the chunks already embedded. A folder that is already up to date (same
model, adapter, alpha, collection and index type) is left alone.
Index types: flat (exact; default up to 100k items), hnsw (default up to 5M), ivf, ivfpq
(default beyond: least memory), factory (any faiss index_factory string).
See docs/indexes.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import radapter
from radapter.errors import RAdapterError

from .ann import DEFAULTS, KINDS
from .collection import PARTS
from .errors import IndexStoreError

if TYPE_CHECKING:
    from .store import BuildResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The build options (shared by ``python -m indexes.build`` and ``python -m indexes build``)."""
    p.add_argument("out", nargs="?", help="index folder to write (omit with --cache)")
    g = p.add_argument_group("collection")
    g.add_argument("--collection", "-c", action="append", default=[], metavar="SPEC",
                   help="what to index (repeatable): BENCH:SET, folder:PATH, table:PATH[,IMAGE_ROOT], "
                        "coco:CAPTIONS.json,IMAGE_DIR, captions:PATH, or a folder/table path")
    g.add_argument("--parts", default=None, help=f"comma-separated parts to index, of {','.join(PARTS)} "
                                                  "(default: every part the collection has)")
    g.add_argument("--caption-template", default=None,
                   help="template captions are embedded through, {} = caption (default: the benchmark's, else {})")
    g.add_argument("--data-dir", default=None, help="prepared benchmark folder (default $RADAPTER_DATA)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model name or path (default: radapter's offline default model)")
    g.add_argument("--pretrained", default=None, help="pretrained tag or local weights file for --model")
    g.add_argument("--adapter", default=None, help="adapter .safetensors file to merge into the model")
    g.add_argument("--alpha", type=float, default=None, help="merge alpha (default: the adapter's default_alpha)")
    g.add_argument("--device", default="cpu", help="torch device for embedding (cpu, cuda)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    radapter.add_keep_freed_memory_option(g)
    g = p.add_argument_group("index")
    g.add_argument("--index-type", default="auto", choices=("auto", *KINDS),
                   help="auto: flat up to 100k items, hnsw up to 5M, ivfpq beyond (per part)")
    hnsw, pq = DEFAULTS["hnsw"], DEFAULTS["ivfpq"]
    g.add_argument("--hnsw-m", dest="m", type=int, default=None, help=f"HNSW links per node (default {hnsw['m']})")
    g.add_argument("--ef-construction", type=int, default=None,
                   help=f"HNSW build depth (default {hnsw['ef_construction']}; higher: better graph, slower build)")
    g.add_argument("--ef-search", type=int, default=None,
                   help=f"HNSW search depth stored as the default (default {hnsw['ef_search']})")
    g.add_argument("--nlist", type=int, default=None, help="IVF cells (default: power of 2 near 4*sqrt(n))")
    g.add_argument("--nprobe", type=int, default=None, help="IVF cells searched by default (nlist/64, >= 8)")
    g.add_argument("--pq-m", type=int, default=None, help="IVF-PQ sub-quantisers (default dim/8)")
    g.add_argument("--pq-bits", type=int, default=None, help="IVF-PQ bits per code (default 8; 4 below 10k items)")
    g.add_argument("--rerank", type=int, default=None,
                   help=f"IVF-PQ: re-score rerank*k candidates exactly from the stored embeddings "
                        f"(default {pq['rerank']}; 1 = off)")
    g.add_argument("--factory", default=None, help="faiss index_factory string for --index-type factory")
    g = p.add_argument_group("mode")
    g.add_argument("--add", action="store_true", help="add the items OUT lacks to the existing index")
    g.add_argument("--force", action="store_true", help="rebuild even when OUT is up to date")
    g.add_argument("--reindex", action="store_true",
                   help="rebuild only the FAISS indexes of OUT from its stored embeddings (no model needed)")
    g.add_argument("--cache", default=None, help="build into this index cache (folder per key) instead of OUT")
    g.add_argument("--alphas", default=None,
                   help="with --cache and --adapter: comma-separated alphas to build ahead (the alpha grid)")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="items per resumable chunk of embeddings (default: indexes.store.DEFAULT_CHUNK)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--json", action="store_true", help="print the manifest as JSON")


def index_params(args: argparse.Namespace) -> dict[str, Any]:
    """The index parameters given on the command line (unset ones left out)."""
    names = ("m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_m", "pq_bits", "rerank", "factory")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def summary(result: BuildResult) -> str:
    m = result.manifest
    parts = ", ".join(f"{p}: {v['count']} ({v['index']['factory']})" for p, v in m["parts"].items())
    reused = f", {sum(result.reused.values())} reused from an interrupted run" if sum(result.reused.values()) else ""
    embedded = f"embedded {sum(result.embedded.values())}{reused}; " if result.embedded else ""
    return (f"{result.status}: {result.path} [{parts}] dim {m['dim']}, alpha {m['alpha']}, "
            f"{embedded}{result.seconds:.1f} s")


def run(args: argparse.Namespace) -> list[BuildResult]:
    """Carry out a parsed build command; returns what each build did."""
    from .cache import IndexCache, build_alpha_grid
    from .collection import describe, load_collections
    from .embedder import Embedder
    from .store import DEFAULT_CHUNK, BuildResult, add_to_index, build_index, read_manifest, recover, reindex

    params = index_params(args)
    chunk_size = args.chunk_size or DEFAULT_CHUNK
    if not args.out and not args.cache:
        raise IndexStoreError("give an index folder OUT or --cache DIR")
    if args.out and args.cache:
        raise IndexStoreError("give either OUT or --cache, not both")
    if args.reindex:
        if not args.out:
            raise IndexStoreError("--reindex needs OUT")
        manifest = reindex(args.out, args.index_type, params)
        return [BuildResult(args.out, "re-indexed", manifest)]
    if not args.collection:
        raise IndexStoreError("nothing to index: give --collection SPEC")
    if args.alphas and not (args.cache and args.adapter):
        raise IndexStoreError("--alphas needs --cache and --adapter")
    parts = [p.strip() for p in args.parts.split(",")] if args.parts else None
    coll = load_collections(args.collection, caption_template=args.caption_template, data_dir=args.data_dir,
                            parts=parts)
    print(f"collection {describe(coll)}", file=sys.stderr)
    if args.keep_freed_memory:
        radapter.keep_freed_memory()
    embedder = Embedder.load(args.model, pretrained=args.pretrained, adapter=args.adapter, alpha=args.alpha,
                             device=args.device, batch_size=args.batch_size, num_workers=args.workers)
    progress = not args.no_progress
    common = {"index_type": args.index_type, "index_params": params}
    if args.cache:
        cache = IndexCache(args.cache)
        if args.alphas:
            alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
            grid = build_alpha_grid(cache, embedder, coll, alphas, progress=progress, **common)
            return [r.build or BuildResult(r.index.path, "cached", r.index.manifest) for r in grid.values()]
        r = cache.get_or_build(embedder, coll, chunk_size=chunk_size, progress=progress, **common)
        return [r.build or BuildResult(r.index.path, "cached", r.index.manifest)]
    if args.add:
        recover(args.out)  # an add or build killed mid-swap: restore the index first
        read_manifest(args.out)  # a clear error when there is nothing to add to
        return [add_to_index(args.out, embedder, coll, chunk_size=chunk_size, progress=progress, **common)]
    return [build_index(args.out, embedder, coll, chunk_size=chunk_size, force=args.force, progress=progress,
                        **common)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m indexes.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        results = run(args)
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r.manifest, indent=2) if args.json else summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
