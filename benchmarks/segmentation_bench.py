"""Open-vocabulary segmentation on the emoji composites: ID (Google) vs OOD (Twitter) at several alphas.

    python -m benchmarks.segmentation_bench --adapter adapters/emoji-categories.safetensors --limit 40

For each alpha: mIoU of the text-driven masks, mIoU of the text-agnostic saliency baseline
(every class gets the same salient mask, same windows and resolution), and the own-object
rate (two-object images: share of classes whose mask lies mostly on their own object rather
than on the other one; 0.5 is what salience alone gets). Writes docs/bench/segmentation.json
with ``miou_id``, ``miou_ood``, ``miou_saliency_baseline`` and ``own_object_rate`` at the
last alpha of ``--alphas`` as the headline keys, plus every alpha's figures.

Settings were chosen on a validation slice, never on the reported images:

    python -m benchmarks.segmentation_bench --start 40 --limit 120 --styles google --out /tmp/val.json
"""

from __future__ import annotations

import argparse

import radapter
from benchmarks.common import write_result
from radapter.data.benchmarks import load_benchmark
from radapter.evaluation.segmentation import PRIORS, SCORES, evaluate_segmentation

STYLE_KEYS = {"google": "", "twitter": "_ood"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.4, 1.0])
    p.add_argument("--limit", type=int, default=40, help="images per style")
    p.add_argument("--start", type=int, default=0, help="first image (validation slices start past the reported ones)")
    p.add_argument("--styles", nargs="+", default=["google", "twitter"], choices=list(STYLE_KEYS))
    p.add_argument("--scale", type=float, default=2.0, help="upscaling before sliding windows")
    p.add_argument("--method", default="clearclip", help="ViT last-block fix (ignored by CNN towers)")
    p.add_argument("--scores", default="auto", choices=SCORES)
    p.add_argument("--prior", default="auto", choices=PRIORS)
    p.add_argument("--no-dilate", action="store_true", help="CNN towers: keep the last stage's stride")
    p.add_argument("--background", default="threshold", choices=["threshold", "prompts"])
    p.add_argument("--threshold", type=float, default=None, help="background threshold (see segment())")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="docs/bench/segmentation.json")
    args = p.parse_args()
    model, _, tok = radapter.load_model(args.model) if args.model else radapter.load_model()
    bench = load_benchmark("segmentation", args.data_dir)
    alphas = args.alphas if args.adapter else [None]
    if args.adapter:
        radapter.load_adapters(model, args.adapter)
    kw = {"method": args.method, "limit": args.limit, "start": args.start, "scale": args.scale,
          "scores": args.scores, "prior": args.prior, "threshold": args.threshold,
          "background": args.background, "dilate": False if args.no_dilate else None}
    per_alpha = {}
    for alpha in alphas:
        if alpha is not None:
            radapter.merge_adapters(model, alpha)
        row = {}
        for style in args.styles:
            res = evaluate_segmentation(model, tok, bench.segmentation[style], **kw)
            suffix = STYLE_KEYS[style]
            row[f"miou{suffix or '_id'}"] = res["miou"]
            row[f"miou_saliency_baseline{suffix}"] = res["miou_saliency_baseline"]
            row[f"own_object_rate{suffix}"] = res["own_object_rate"]
        per_alpha[str(alpha)] = row
    head = per_alpha[str(alphas[-1])]
    write_result(args.out, {"model": model.radapter_model_info.name, "adapter": args.adapter,
                            **{k: v for k, v in kw.items() if k != "limit"}, "limit": args.limit,
                            "styles": args.styles, "reported_alpha": alphas[-1], **head, "per_alpha": per_alpha},
                 "benchmarks.segmentation_bench")


if __name__ == "__main__":
    main()
