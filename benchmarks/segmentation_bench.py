"""Open-vocabulary segmentation on the emoji composites: ID (Google) vs OOD (Twitter) at several alphas.

    python -m benchmarks.segmentation_bench --adapter adapters/emoji-categories.safetensors --limit 40

For each alpha: mIoU of the text-driven masks, mIoU of the text-agnostic saliency baseline
(every class gets the same salient mask), and the own-object rate (two-object images: share
of classes whose mask lies mostly on their own object rather than on the other one; 0.5 is
what salience alone gets). Writes docs/bench/segmentation.json with ``miou_id``,
``miou_ood``, ``miou_saliency_baseline`` and ``own_object_rate`` at the last alpha of ``--alphas`` as the
headline keys, plus every alpha's figures.
"""

from __future__ import annotations

import argparse

import radapter
from benchmarks.common import write_result
from radapter.data.benchmarks import load_benchmark
from radapter.segmentation import evaluate_segmentation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.4, 1.0])
    p.add_argument("--limit", type=int, default=40, help="images per style")
    p.add_argument("--scale", type=float, default=1.0, help="upscaling before sliding windows")
    p.add_argument("--method", default="clearclip")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="docs/bench/segmentation.json")
    args = p.parse_args()
    model, _, tok = radapter.load_model(args.model) if args.model else radapter.load_model()
    bench = load_benchmark("segmentation", args.data_dir)
    alphas = args.alphas if args.adapter else [None]
    if args.adapter:
        radapter.load_adapters(model, args.adapter)
    per_alpha = {}
    for alpha in alphas:
        if alpha is not None:
            radapter.merge_adapters(model, alpha)
        res = {style: evaluate_segmentation(model, tok, bench.segmentation[style], method=args.method,
                                            limit=args.limit, scale=args.scale)
               for style in ("google", "twitter")}
        per_alpha[str(alpha)] = {
            "miou_id": res["google"]["miou"], "miou_ood": res["twitter"]["miou"],
            "miou_saliency_baseline": res["google"]["miou_saliency_baseline"],
            "miou_saliency_baseline_ood": res["twitter"]["miou_saliency_baseline"],
            "own_object_rate": res["google"]["own_object_rate"],
            "own_object_rate_ood": res["twitter"]["own_object_rate"],
        }
    head = per_alpha[str(alphas[-1])]
    write_result(args.out, {"model": getattr(model, "radapter_model_info", None).name, "adapter": args.adapter,
                            "method": args.method, "limit": args.limit, "scale": args.scale,
                            "reported_alpha": alphas[-1], **head, "per_alpha": per_alpha},
                 "benchmarks.segmentation_bench")


if __name__ == "__main__":
    main()
