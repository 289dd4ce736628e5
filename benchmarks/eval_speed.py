"""Evaluation speed against its floor: an alpha sweep and the end-of-training evaluation.

    python -m benchmarks.eval_speed                # writes docs/bench/eval_speed.json

On the offline default model with the shipped Fashion-MNIST adapter (``adapters/fmnist.safetensors``),
``--limit`` images per set (ID test and each of the benchmark's OOD sets):

- ``sweep``: ``radapter.evaluation.alpha_sweep`` over the 11 alphas 0, 0.1, ..., 1, the path
  ``python -m radapter eval --benchmark fmnist --adapter ... --sweep --limit N`` takes;
- ``end_of_training``: ``python -m train --method r-adapter --benchmark fmnist --config
  train/configs/cpu-small.json --steps 2 --eval-limit N`` (alpha chosen on the ID validation split
  over 11 alphas, then the test split, ID and OOD, at each alpha); its figure is the
  ``evaluation_seconds`` the run writes into its metrics.json;
- ``floor``: the model's own forward throughput (``encode_image`` in batches of 64, inference
  mode, images already decoded and preprocessed) on the same ID test images, measured in the
  same run. ``floor_s`` of a job is its image count over that throughput, and ``over_floor`` is
  the job's time over its floor: what decoding, preprocessing, re-merging and heads add.

Both jobs and the floor run with ``radapter.keep_freed_memory()`` on, as the command lines do
by default (without it every batch page-faults its activations in again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import radapter
from benchmarks.common import write_result
from radapter.data.benchmarks import load_benchmark
from radapter.evaluation import alpha_sweep

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "adapters" / "fmnist.safetensors"


def forward_throughput(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Images per second of ``encode_image`` alone over ``images`` (after one warm-up batch)."""
    model.eval()
    with torch.inference_mode():
        model.encode_image(images[:batch_size], normalize=True)
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model.encode_image(images[i:i + batch_size], normalize=True)
        return len(images) / (time.perf_counter() - t0)


def images_scored(points: list[dict]) -> int:
    """Images evaluated in a list of sweep points (ID plus every OOD set, each point)."""
    return sum(p["id"]["n"] + sum(r["n"] for r in p.get("ood", {}).values()) for p in points)


def sweep_job(limit: int) -> tuple[dict, torch.nn.Module, torch.Tensor]:
    model, preprocess, tokenizer = radapter.load_model()
    radapter.load_adapters(model, ADAPTER)
    bench = load_benchmark("fmnist")
    t0 = time.perf_counter()
    sweep = alpha_sweep(model, tokenizer, preprocess, bench, limit=limit)
    seconds = time.perf_counter() - t0
    ds = bench.test.subset(limit).dataset(preprocess)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    job = {"seconds": seconds, "alphas": len(sweep["points"]), "sets": 1 + len(bench.ood),
           "images": images_scored(sweep["points"])}
    return job, model, images


def end_of_training_job(limit: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "train", "--method", "r-adapter", "--benchmark", "fmnist",
               "--config", "train/configs/cpu-small.json", "--steps", "2",
               "--eval-limit", str(limit), "--out-dir", out]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    res = metrics["results"]
    val = len(res.get("val_sweep", [])) * limit  # val points keep top-1 only: each scored `limit` ID images
    test = images_scored(res["all"]["sweep"])
    return {"seconds": metrics["evaluation_seconds"], "process_seconds": wall, "images": val + test,
            "val_images": val, "test_images": test, "command": " ".join(["python", *cmd[1:-2]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="images per set")
    p.add_argument("--out", default="docs/bench/eval_speed.json")
    p.add_argument("--skip-training", action="store_true", help="only the sweep")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    radapter.keep_freed_memory()  # as python -m radapter eval and python -m train do by default
    sweep, model, images = sweep_job(args.limit)
    radapter.merge_adapters(model, 0.5)
    floor = forward_throughput(model, images)
    jobs = {"sweep": sweep}
    if not args.skip_training:
        jobs["end_of_training"] = end_of_training_job(args.limit)
    for job in jobs.values():
        job["floor_s"] = job["images"] / floor
        job["over_floor"] = job["seconds"] / job["floor_s"]
        job["images_per_s"] = job["images"] / job["seconds"]
    result = {"limit": args.limit, "adapter": str(ADAPTER.relative_to(ROOT)), "floor_images_per_s": floor, **jobs,
              "goals": {"sweep_seconds": "<= 120", "end_of_training_seconds": "<= 120"},
              "goals_met": {f"{k}_seconds": v["seconds"] <= 120 for k, v in jobs.items()},
              "load_average_before_after": [load_before, os.getloadavg()[0]]}
    write_result(args.out, result, "benchmarks.eval_speed")


if __name__ == "__main__":
    main()
