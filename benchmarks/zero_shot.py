"""Zero-shot quality of a model on every offline benchmark (ID, each OOD set, OOD average).

    python -m benchmarks.zero_shot                              # the offline default model
    python -m benchmarks.zero_shot --model ViT-B-32-quickgelu --pretrained openai --out docs/bench/zero_shot_vitb32.json

Prompts, class names and templates are the benchmarks' own (fixed a priori in
radapter/data/specs); nothing is tuned on a test set. Writes the flat keys
``fmnist_top1``, ``fmnist_ood_top1``, ``digits_top1``, ``digits_ood_top1``,
``emoji_category_top1``, ``emoji_category_ood_top1``, ``emoji_name_r1`` (image -> name among
all 1906 emoji, Google style) and ``emoji_name_ood_r1`` (Twitter style), plus every detail.
"""

from __future__ import annotations

import argparse
import time

import radapter
from benchmarks.common import write_result
from radapter.data.benchmarks import load_benchmark
from radapter.evaluation import evaluate_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name (default: the offline default model)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--benchmarks", nargs="+", default=["fmnist", "digits", "emoji"])
    p.add_argument("--limit", type=int, default=None, help="at most this many images per set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="docs/bench/zero_shot.json")
    args = p.parse_args()
    model, preprocess, tok = (radapter.load_model(args.model, pretrained=args.pretrained) if args.model
                              else radapter.load_model())
    info = getattr(model, "radapter_model_info", None)
    result = {"model": info.name if info else args.model, "fingerprint": radapter.compute_fingerprint(model),
              "limit": args.limit, "details": {}}
    t0 = time.time()
    for name in args.benchmarks:
        res = evaluate_benchmark(model, tok, preprocess, load_benchmark(name, args.data_dir), limit=args.limit)
        result["details"][name] = res
        cls = res.get("classification")
        key = "emoji_category" if name == "emoji" else name
        if cls:
            result[f"{key}_top1"] = cls["id"]["top1"]
            result[f"{key}_ood_top1"] = cls["ood_avg"]["top1"]
        if name == "emoji":
            result["emoji_name_r1"] = res["retrieval"]["google-all"]["i2t_r1"]
            result["emoji_name_ood_r1"] = res["retrieval"]["twitter-all"]["i2t_r1"]
    result["seconds"] = round(time.time() - t0, 1)
    write_result(args.out, result, "benchmarks.zero_shot")


if __name__ == "__main__":
    main()
