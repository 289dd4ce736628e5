"""Benchmark the weight-space ensemble: re-merge cost and merged-model inference cost.

    python -m benchmarks.merge_bench                 # ViT-B-32 (random init), writes docs/bench/merge.json
    python -m benchmarks.merge_bench --model radapter-tiny-vit --reps 3 --out /tmp/m.json   # smoke run

Measured side by side in one run:
- re-merge at a new alpha (precomputed deltas, one add per tensor) against one single-image
  forward, the authors' way (``(I + alpha*s*A) @ W`` per layer, a matmul each time), and
  WiSE-FT's way (interpolate two full state dicts, load the result);
- the memory-traffic floor: ``torch.add(a, b, out=c)`` over the same number of bytes;
- merged-model inference against the base model at batch 1 and 32, and unmerged adapters.
"""

from __future__ import annotations

import argparse
import copy

import torch

import radapter
from benchmarks.common import interleaved_times, median_time, write_result


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, a in radapter.iter_adapters(model):
            for name in a.param_names:
                if name != "scale":
                    p = getattr(a, name)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            a.update_ema(0.0)


def _adapted_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for site in radapter.merge_targets(model).values() for t in site.values())


def _matmul_merge(model: torch.nn.Module, alpha: float, originals: dict, deltas: dict) -> None:
    """The authors' way: rebuild ``(I + alpha * s * A) @ W_org`` with a matmul per tensor."""
    with torch.no_grad():
        targets = radapter.merge_targets(model)
        for path, _, a in radapter.iter_adapters(model):
            m = torch.eye(a.features) + alpha * deltas[path]
            for name, t in targets[path].items():
                w0 = originals[path][name]
                t.copy_((m @ w0.reshape(w0.shape[0], -1)).reshape(w0.shape))


def _time_wiseft(model: torch.nn.Module, reps: int) -> float:
    """WiSE-FT's way: two full models' state dicts, interpolated into a new one, loaded."""
    radapter.merge_adapters(model, 0.0)
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.merge_adapters(model, 1.0)
    theta_1 = {k: v.clone() for k, v in model.state_dict().items()}

    def wiseft() -> None:
        with torch.no_grad():
            model.load_state_dict(radapter.interpolate_weights(theta_0, theta_1, 0.7))

    seconds = median_time(wiseft, reps)
    radapter.unmerge_adapters(model)
    return seconds


def _time_floor(n_bytes: int, reps: int) -> float:
    """Memory-traffic floor of a re-merge: read two buffers, write one, of the adapted size."""
    n = n_bytes // 4
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    return median_time(lambda: torch.add(a, b, alpha=0.7, out=c), reps, warmup=2)


def run(model_name: str, reps: int, reps_b32: int, batch: int) -> dict:
    torch.manual_seed(0)
    base, _, _ = radapter.load_model(model_name)
    base.requires_grad_(False)
    model = copy.deepcopy(base)
    radapter.add_adapters(model, radapter.RAdapterConfig())
    _randomize(model)
    model.eval()
    size = base.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x1 = torch.randn(1, 3, size, size)
    xb = torch.randn(batch, 3, size, size)

    def fwd(m, x):
        return lambda: m.encode_image(x)

    with torch.inference_mode():
        t_forward_b1 = median_time(fwd(base, x1), reps, warmup=2)

    # Re-merge with precomputed deltas (first merge builds them; not timed).
    radapter.merge_adapters(model, 0.5)
    alphas = iter([0.3, 0.7] * (reps + 2))
    t_remerge = median_time(lambda: radapter.merge_adapters(model, next(alphas)), reps, warmup=2)
    radapter.unmerge_adapters(model)

    targets = radapter.merge_targets(model)
    originals = {p: {n: t.detach().clone() for n, t in site.items()} for p, site in targets.items()}
    deltas = {p: a.delta_matrix(use_ema=True) for p, _, a in radapter.iter_adapters(model)}
    t_matmul = median_time(lambda: _matmul_merge(model, 0.7, originals, deltas), max(3, reps // 4))
    radapter.unmerge_adapters(model)

    t_wiseft = _time_wiseft(model, max(3, reps // 4))
    n_bytes = _adapted_bytes(model)
    t_floor = _time_floor(n_bytes, reps)

    merged = copy.deepcopy(model)
    radapter.merge_adapters(merged, 0.5)
    # A plain copy of the base model measures the timing noise: its ratio to base "should" be 1.
    twin = copy.deepcopy(base)
    with torch.inference_mode():
        b1 = interleaved_times({"base": fwd(base, x1), "merged": fwd(merged, x1), "twin": fwd(twin, x1)},
                               reps, warmup=2)
        bb = interleaved_times({"base": fwd(base, xb), "merged": fwd(merged, xb), "unmerged": fwd(model, xb),
                                "twin": fwd(twin, xb)}, reps_b32, warmup=1)

    return {
        "model": model_name,
        "adapter": "full-rank, both towers, after attention and FFN of every block",
        "adapters": radapter.trainable_summary(model).adapters,
        "adapted_weight_mb": round(n_bytes / 2**20, 1),
        "batch": batch,
        "seconds": {
            "forward_b1": t_forward_b1, "remerge": t_remerge, "remerge_matmul": t_matmul,
            "remerge_wiseft": t_wiseft, "floor_add": t_floor,
            "base_b1": b1["base"], "merged_b1": b1["merged"],
            "base_copy_b1": b1["twin"], "base_b32": bb["base"], "base_copy_b32": bb["twin"],
            "merged_b32": bb["merged"], "unmerged_b32": bb["unmerged"],
        },
        "remerge_over_forward": t_remerge / t_forward_b1,
        "remerge_speedup_vs_matmul": t_matmul / t_remerge,
        "remerge_speedup_vs_wiseft": t_wiseft / t_remerge,
        "remerge_over_floor": t_remerge / t_floor,
        "merged_over_base_b1": b1["merged"] / b1["base"],
        "merged_over_base_b32": bb["merged"] / bb["base"],
        "unmerged_over_base_b32": bb["unmerged"] / bb["base"],
        "noise_base_copy_over_base_b1": b1["twin"] / b1["base"],
        "noise_base_copy_over_base_b32": bb["twin"] / bb["base"],
        "goals": {
            "remerge_over_forward": "<= 0.1", "remerge_speedup_vs_matmul": ">= 10",
            "remerge_speedup_vs_wiseft": ">= 10", "remerge_over_floor": "<= 1.3",
            "merged_over_base_b1": "1.00 +/- 0.03", "merged_over_base_b32": "1.00 +/- 0.03",
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="model name (random init is fine for timing)")
    p.add_argument("--reps", type=int, default=30, help="repetitions of the fast measurements")
    p.add_argument("--reps-b32", type=int, default=8, help="repetitions of the batched forwards")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="docs/bench/merge.json")
    args = p.parse_args()
    write_result(args.out, run(args.model, args.reps, args.reps_b32, args.batch), "benchmarks.merge_bench")


if __name__ == "__main__":
    main()
