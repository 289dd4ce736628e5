"""``python -m radapter eval``: evaluate a model (optionally with an adapter at alpha) on benchmarks or your data."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cpu_memory import add_keep_freed_memory_option
from ..errors import RAdapterError

if TYPE_CHECKING:  # the data and model modules import torch: only the commands load them, not --help
    from ..data import benchmarks as bm
    from ..data.sets import ClassificationSet

SET_KINDS = ("folder", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", action="append", default=[],
                   help="prepared benchmark: fmnist, digits, emoji, emoji-backgrounds (repeatable)")
    p.add_argument("--id", dest="id_set", default=None,
                   help=f"your ID test set as KIND:PATH, KIND in {SET_KINDS}")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=KIND:PATH",
                   help="a named OOD set (repeatable); averaged as the papers do")
    p.add_argument("--classnames", default=None, help="class-name file for folder sets (one per line)")
    p.add_argument("--templates", default="openai", help="openai (80 ImageNet prompts), simple, or a file "
                                                          "with one template per line ({} = class name)")
    p.add_argument("--retrieval", action="append", default=[], metavar="NAME=TABLE[,IMAGE_ROOT]",
                   help="a caption table (CSV/JSONL) or COCO captions JSON to score retrieval on")
    p.add_argument("--model", default=None, help="model name or path (default: the offline default model)")
    p.add_argument("--pretrained", default=None, help="pretrained tag or local weights file")
    p.add_argument("--adapter", default=None, help="adapter .safetensors file to merge")
    p.add_argument("--alpha", type=float, default=None, help="merge alpha (default: the adapter's default_alpha)")
    p.add_argument("--sweep", action="store_true", help="sweep alpha over 0, 0.1, ..., 1 (needs --adapter)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="ID split of a benchmark (choose "
                                                                            "alpha on val, report on test)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per set (fixed subset)")
    p.add_argument("--data-dir", default=None, help="prepared benchmark folder (default $RADAPTER_DATA)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    add_keep_freed_memory_option(p)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--plot", default=None, help="with --sweep: write the accuracy-vs-alpha PNG here")


def _user_set(spec: str, name: str, classnames: str | None, folders: list[str] | None = None) -> ClassificationSet:
    from ..data import formats

    kind, sep, path = spec.partition(":")
    if not sep or kind not in SET_KINDS:
        raise RAdapterError(f"set {spec!r}: expected KIND:PATH with KIND in {SET_KINDS}")
    if kind == "folder":
        return formats.image_folder(path, classnames, name=name, class_folders=folders)
    return formats.imagenet_family(kind, path)


def _user_benchmark(args: argparse.Namespace) -> bm.Benchmark:
    from ..data import benchmarks as bm
    from ..data.benchmark_spec import BenchmarkSpec
    from .zero_shot import read_templates

    test = _user_set(args.id_set, "id", args.classnames)
    folders = None
    if args.id_set.startswith("folder:"):
        folders = sorted(p.name for p in Path(args.id_set.partition(":")[2]).iterdir() if p.is_dir())
    ood = {}
    for item in args.ood:
        name, sep, spec = item.partition("=")
        if not sep:
            raise RAdapterError(f"--ood {item!r}: expected NAME=KIND:PATH")
        ood[name] = _user_set(spec, name, args.classnames, folders)
    spec = BenchmarkSpec(name="user", task="classification", description="user data",
                         classnames=tuple(test.classnames), prompt_names=tuple(test.classnames),
                         templates=read_templates(args.templates))
    return bm.Benchmark(spec=spec, test=test, ood=ood)


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .. import evaluation as ev
    from ..adapters.checkpoint import load_adapters
    from ..adapters.inject import adapter_state
    from ..adapters.merge import merge_adapters, merged_alpha
    from ..cpu_memory import keep_freed_memory
    from ..data import benchmarks as bm
    from ..models.registry import load_model

    if not args.benchmark and not args.id_set and not args.retrieval:
        raise RAdapterError("nothing to evaluate: give --benchmark, --id or --retrieval")
    if args.sweep and not args.adapter:
        raise RAdapterError("--sweep needs --adapter")
    if args.keep_freed_memory:
        keep_freed_memory()
    model, preprocess, tokenizer = load_model(args.model, pretrained=args.pretrained) if args.model else load_model()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m radapter eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "",
        "model": args.model or "default", "pretrained": args.pretrained, "adapter": args.adapter,
    }
    if args.adapter:
        load_adapters(model, args.adapter)
        result["adapter_sha256"] = _file_sha256(args.adapter)
        if not args.sweep:
            merge_adapters(model, args.alpha)  # None: the file's default alpha
            result["alpha"] = merged_alpha(model)
    state = adapter_state(model)
    if state is not None:
        result["base_fingerprint"] = state.base_fingerprint
    common = {"batch_size": args.batch_size, "num_workers": args.workers}
    benches = [bm.load_benchmark(b, args.data_dir) for b in args.benchmark]
    if args.id_set:
        benches.append(_user_benchmark(args))
    result["results"] = {}
    for bench in benches:
        if args.sweep:
            sweep = ev.alpha_sweep(model, tokenizer, preprocess, bench, limit=args.limit, split=args.split, **common)
            result["results"][bench.name] = sweep
            if args.plot:
                plot = Path(args.plot)
                if len(benches) > 1:
                    plot = plot.with_name(f"{plot.stem}-{bench.name}{plot.suffix}")
                ev.plot_alpha_sweep(sweep, plot)
        else:
            result["results"][bench.name] = ev.evaluate_benchmark(model, tokenizer, preprocess, bench,
                                                                   limit=args.limit, **common)
    for item in args.retrieval:
        name, _, spec = item.partition("=")
        table, _, image_root = spec.partition(",")
        rset = _retrieval_set(name, table, image_root or None)
        result["results"][f"retrieval:{name}"] = ev.evaluate_retrieval(model, tokenizer, preprocess, rset, **common)
    return result


def _retrieval_set(name: str, table: str, image_root: str | None):
    from ..data import formats

    path = Path(table)
    if path.suffix.lower() == ".json":
        try:
            is_coco = "annotations" in json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            is_coco = False
        if is_coco:
            return formats.coco_captions(path, image_root or path.parent, name=name)
    return formats.image_text_table(path, image_root, name=name)


def main(args: argparse.Namespace) -> None:
    from ..atomic import atomic_path

    result = run(args)
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
