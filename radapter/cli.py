"""Command line: ``python -m radapter {export,info,models,eval,segment,demo}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import RAdapterError


def _export(args: argparse.Namespace) -> None:
    from .adapters.checkpoint import adapter_file_info, load_adapters
    from .adapters.export import export_merged
    from .models.registry import load_model

    info = adapter_file_info(args.adapter)  # a bad file fails before the model loads
    # No --model: the base model the adapter was trained on (None: the offline default).
    model, _, _ = load_model(args.model or info.get("base_model"), pretrained=args.pretrained)
    load_adapters(model, args.adapter)
    out = export_merged(model, args.out, args.alpha)  # None: the file's default alpha
    alpha = json.loads((out / "open_clip_config.json").read_text())["radapter"]["alpha"]
    print(f"wrote {out} (alpha={alpha}); load it with open_clip.create_model_and_transforms('local-dir:{out}')")


def _info(args: argparse.Namespace) -> None:
    from .adapters.checkpoint import adapter_file_info

    print(json.dumps(adapter_file_info(args.adapter), indent=2, sort_keys=True))


def _models(args: argparse.Namespace) -> None:
    from .models.registry import list_models

    print("\n".join(list_models()))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(steps=args.steps, out_dir=args.out)


def _segment(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from .adapters.checkpoint import load_adapters
    from .adapters.merge import merge_adapters
    from .atomic import atomic_path
    from .data.sets import open_image
    from .evaluation.segmentation import overlay, segment
    from .models.registry import load_model

    model, _, tokenizer = load_model(args.model, pretrained=args.pretrained) if args.model else load_model()
    if args.adapter:
        load_adapters(model, args.adapter)
        merge_adapters(model, args.alpha)  # None: the file's default alpha
    image = np.asarray(open_image(args.image))
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    seg = segment(model, tokenizer, image, names, method=args.method, background=args.background)
    with atomic_path(args.out) as tmp:
        Image.fromarray(overlay(image, seg)).save(tmp, format="PNG")
    for name, score in seg.scores().items():
        print(f"{name}: {100 * seg.masks()[name].mean():.1f}% of pixels, mean probability {score:.2f}")
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from .evaluation.cli import main as eval_main

    eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radapter", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="write a model merged at alpha as a plain open_clip folder")
    e.add_argument("--model", default=None,
                   help="model name or path (see `radapter models`; default: the adapter file's base model)")
    e.add_argument("--pretrained", default=None, help="pretrained tag or local weights file")
    e.add_argument("--adapter", required=True, help="adapter .safetensors file")
    e.add_argument("--alpha", type=float, default=None, help="re-scaling alpha (default: the file's default_alpha)")
    e.add_argument("--out", required=True, help="output folder (loads as local-dir:OUT)")
    e.set_defaults(func=_export)

    i = sub.add_parser("info", help="print an adapter file's metadata")
    i.add_argument("adapter")
    i.set_defaults(func=_info)

    m = sub.add_parser("models", help="list loadable model names")
    m.set_defaults(func=_models)

    from .evaluation.cli import add_arguments

    ev = sub.add_parser("eval", help="evaluate a model (+ adapter at alpha) on benchmarks or your own data")
    add_arguments(ev)
    ev.set_defaults(func=_eval)

    s = sub.add_parser("segment", help="open-vocabulary segmentation of an image; writes a PNG overlay")
    s.add_argument("image", help="image file")
    s.add_argument("--classes", required=True, help="comma-separated class names")
    s.add_argument("--out", default="segmentation.png", help="overlay PNG to write")
    s.add_argument("--model", default=None, help="model name or path (default: the offline default model)")
    s.add_argument("--pretrained", default=None)
    s.add_argument("--adapter", default=None, help="adapter file to merge")
    s.add_argument("--alpha", type=float, default=None, help="merge alpha (default: the adapter's default_alpha)")
    s.add_argument("--method", default="clearclip", help="ViT last-block fix: clearclip, sclip, maskclip, plain")
    s.add_argument("--background", default="threshold", help="threshold or prompts")
    s.set_defaults(func=_segment)

    d = sub.add_parser("demo", help="end-to-end walkthrough of the library on the tiny model")
    d.add_argument("--steps", type=int, default=150, help="training steps")
    d.add_argument("--out", default="runs/demo", help="where the adapter file and export go")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except (RAdapterError, ValueError) as e:  # bad names, files or options: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
