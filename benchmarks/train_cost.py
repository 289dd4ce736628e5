"""Training cost: R-Adapter against full fine-tuning on the same batch, side by side.

    python -m benchmarks.train_cost                       # ViT-B-32 (random init) + the offline default
    python -m benchmarks.train_cost --models radapter-tiny-vit --steps 2 --out /tmp/t.json   # smoke run

Each (model, method) runs in its own subprocess so its peak resident memory is its own:
load the model, set up the method, run warm-up steps, then time ``--steps`` optimiser
steps (forward of both towers, contrastive loss, backward, AdamW, EMA for adapters).
Writes per model ``memory_ratio`` (peak RSS above the libraries' own footprint, R-Adapter /
full FT; the whole-process ratio too) and ``step_time_ratio``, plus images/s of each and
``saved_activations_mb``: what autograd keeps for backward after one forward (exact, where
peak RSS is an allocator-dependent reading).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import write_result


def _one(model_name: str, method: str, batch: int, steps: int, warmup: int) -> dict:
    """Run inside a fresh process: returns peak RSS and median step time."""
    import radapter

    baseline_mb = _rss_mb()  # the interpreter and libraries, before any model exists
    torch.manual_seed(0)
    model, _, tok = radapter.load_model(model_name) if model_name != "default" else radapter.load_model()
    size = model.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    images = torch.randn(batch, 3, size, size)
    texts = tok([f"a photo of a thing number {i}." for i in range(batch)])
    labels = torch.arange(batch) % 10
    if method == "r-adapter":
        radapter.add_adapters(model, radapter.RAdapterConfig())
        params = radapter.adapter_parameters(model)
        model.eval()
        for _, _, a in radapter.iter_adapters(model):
            a.train()
    else:
        model.requires_grad_(True)
        model.logit_scale.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = radapter.mpm_nce_loss(model.encode_image(images), model.encode_text(texts), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if method == "r-adapter":
            radapter.update_ema(model)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # After the peak is read: an extra graph before the timed steps would leave the allocator's
    # freed pages in the reading.
    saved_mb = _saved_activations_mb(lambda: radapter.mpm_nce_loss(model.encode_image(images),
                                                                    model.encode_text(texts), labels), model)
    return {"peak_rss_mb": peak, "libraries_rss_mb": baseline_mb, "peak_model_and_training_mb": peak - baseline_mb,
            "saved_activations_mb": saved_mb, "step_s": statistics.median(times),
            "images_per_s": batch / statistics.median(times),
            "trainable_parameters": sum(p.numel() for p in params)}


def _saved_activations_mb(forward, model: torch.nn.Module) -> float:
    """What autograd keeps for backward after one forward pass, parameters and buffers excluded (exact, no noise)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(model_name: str, method: str, batch: int, steps: int, warmup: int) -> dict:
    code = ("import json, sys; from benchmarks.train_cost import _one; "
            f"print(json.dumps(_one({model_name!r}, {method!r}, {batch}, {steps}, {warmup})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{method} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "default"],
                   help="model names ('default' = the offline default model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="docs/bench/train_cost.json")
    args = p.parse_args()
    result = {"batch": args.batch, "steps": args.steps, "loss": "MPM-NCE, both towers", "models": {}}
    for name in args.models:
        ra = measure(name, "r-adapter", args.batch, args.steps, args.warmup)
        ft = measure(name, "full-ft", args.batch, args.steps, args.warmup)
        result["models"][name] = {
            "r_adapter": ra, "full_ft": ft,
            # Memory the model and its training need: peak RSS minus the libraries' own footprint.
            "memory_ratio": ra["peak_model_and_training_mb"] / ft["peak_model_and_training_mb"],
            "memory_ratio_whole_process": ra["peak_rss_mb"] / ft["peak_rss_mb"],
            "step_time_ratio": ra["step_s"] / ft["step_s"],
            "saved_activations_ratio": ra["saved_activations_mb"] / ft["saved_activations_mb"],
        }
    result["goals"] = {"memory_ratio": "<= 0.6", "step_time_ratio": "<= 0.7"}
    write_result(args.out, result, "benchmarks.train_cost")


if __name__ == "__main__":
    main()
