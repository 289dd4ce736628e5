"""``python -m indexes COMMAND``: build, add, reindex, eval, info, search, export.

    python -m indexes build OUT --collection emoji:google-test     (= python -m indexes.build)
    python -m indexes add OUT --collection folder:/data/photos      (only the items OUT lacks)
    python -m indexes reindex OUT --index-type hnsw                 (FAISS only, from stored embeddings)
    python -m indexes eval OUT [OUT ...] [--check-exact]            (= python -m indexes.evaluate)
    python -m indexes info OUT                                      (the manifest)
    python -m indexes search OUT --text "a red heart" -k 5 [--model ... --adapter ...]
    python -m indexes export OUT --out exports/OUT [--part image]   (Qdrant points JSONL)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from radapter.errors import RAdapterError


def _info(args: argparse.Namespace) -> None:
    from .store import read_manifest

    print(json.dumps(read_manifest(args.index), indent=2))


def _search(args: argparse.Namespace) -> None:
    from .embedder import Embedder
    from .errors import IndexStoreError
    from .index import RetrievalIndex

    index = RetrievalIndex(args.index)
    if not args.text and not args.image:
        raise IndexStoreError("give --text or --image")
    alpha = args.alpha if args.alpha is not None else index.alpha if args.adapter else None
    embedder = Embedder.load(args.model, pretrained=args.pretrained, adapter=args.adapter, alpha=alpha,
                             device=args.device)
    params = {k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v is not None}
    if args.text:
        hits = (index.text_to_image if args.part == "image" else index.text_to_text)(embedder, args.text, args.k,
                                                                                     **params)
    else:
        hits = (index.image_to_image if args.part == "image" else index.image_to_text)(embedder, args.image, args.k,
                                                                                       **params)
    for h in hits:
        print(json.dumps({"rank": h.rank, "score": round(h.score, 4), "id": h.id, **h.meta}, ensure_ascii=False))


def _export(args: argparse.Namespace) -> None:
    from .export import export_qdrant

    for path in export_qdrant(args.index, args.out, [args.part] if args.part else None):
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Each subcommand imports its own modules when it runs, so --help stays light.
    if argv and argv[0] in ("build", "add", "reindex"):
        from . import build

        return build.main(argv[1:] + {"build": [], "add": ["--add"], "reindex": ["--reindex"]}[argv[0]])
    if argv and argv[0] == "eval":
        from . import evaluate

        return evaluate.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m indexes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("build", "add", "reindex", "eval"):
        sub.add_parser(name, help=f"see python -m indexes {name} --help")
    s = sub.add_parser("info", help="print an index's manifest")
    s.add_argument("index")
    s = sub.add_parser("search", help="query an index with a text or an image")
    s.add_argument("index")
    s.add_argument("--text", default=None, help="query text")
    s.add_argument("--image", default=None, help="query image file")
    s.add_argument("--part", default="image", choices=("image", "text"), help="what to return")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--model", default=None, help="the index's model (default: radapter's offline default model)")
    s.add_argument("--pretrained", default=None)
    s.add_argument("--adapter", default=None, help="the index's adapter file")
    s.add_argument("--alpha", type=float, default=None, help="query alpha (default: the index's)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--ef-search", type=int, default=None)
    s.add_argument("--nprobe", type=int, default=None)
    s = sub.add_parser("export", help="export embeddings + metadata as Qdrant points (JSON lines)")
    s.add_argument("index")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--part", default=None, choices=("image", "text"), help="default: every part")
    args = p.parse_args(argv)
    try:
        {"info": _info, "search": _search, "export": _export}[args.command](args)
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
