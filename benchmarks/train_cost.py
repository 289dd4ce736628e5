"""Training cost: R-Adapter, LoRA (Hugging Face peft) and full fine-tuning on the same batch, side by side.

    python -m benchmarks.train_cost                       # ViT-B-32 (random init) + the offline default
    python -m benchmarks.train_cost --models radapter-tiny-vit --steps 2 --out /tmp/t.json   # smoke run

One optimiser step is: zero the gradients, forward both towers, MPM-NCE loss, backward,
clip, AdamW, and the EMA update for adapters. LoRA is ``python -m train --method lora``: peft's
LoRA (rank 16) on the layers R-Adapter adapts. Per model it writes (R-Adapter / full FT; the
same ratios for LoRA / full FT under ``lora``, and R-Adapter / LoRA under ``r_adapter_over_lora``)

- ``memory_ratio``: peak tensor memory of a step, R-Adapter / full FT. Tensors alive when the
  step starts (weights, optimiser state, EMA, the batch; summed exactly) plus the peak of what
  the step allocates (the CPU allocator's running total, read with the profiler). This is
  the quantity ``torch.cuda.max_memory_allocated`` reports on a GPU (which ``--device cuda``
  uses): what training needs, independent of the allocator.
- ``memory_ratio_rss``: peak resident memory above the libraries' own footprint. Freed memory
  the allocator keeps for reuse (``--malloc keep``, as ``python -m train`` sets on CPU, and
  glibc's own dynamic threshold otherwise) counts here on top of the tensors.
- ``step_time_ratio``: median step wall time. Each method runs in its own process and the
  two take steps in turns, so load from the rest of the machine hits both alike;
  ``step_time_ratio_fastest`` compares the fastest steps, ``cpu_time_ratio`` process CPU time;
  each method's ``forward_s``, ``backward_s`` and ``optimizer_s`` (clip, AdamW, EMA) are medians too.
- ``flop_ratio``: matmul/conv FLOPs of one step (torch's FlopCounterMode), the step-time
  ratio a compute-bound machine tends to; and ``saved_activations_ratio``: what autograd
  keeps for backward after one forward (exact).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import write_result

METHODS = ("r_adapter", "lora", "full_ft")
TRAIN_METHOD = {"r_adapter": "r-adapter", "lora": "lora", "full_ft": "full-ft"}  # python -m train --method


@dataclass
class Setup:
    """One method's model, batch and optimiser, ready to step."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    method: str
    precision: str = "fp32"

    def forward(self) -> torch.Tensor:
        import radapter
        from train.loop import autocast_context

        images, texts, labels = self.batch
        with autocast_context(images.device, self.precision):  # as python -m train --precision does
            img, txt = self.model.encode_image(images), self.model.encode_text(texts)
        return radapter.mpm_nce_loss(img.float(), txt.float(), labels)

    def step(self) -> dict[str, float]:
        """One optimiser step; returns the seconds of its phases (forward, backward, optimiser)."""
        import radapter

        sync: Callable[[], None] = torch.cuda.synchronize if self.batch[0].is_cuda else (lambda: None)
        # Synchronised after each phase, so a step's time ends with its work on a GPU too.
        self.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = self.forward()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.method == "r_adapter":
            radapter.update_ema(self.model)
        sync()
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": time.perf_counter() - t2}

    def live_tensor_bytes(self) -> int:
        """Bytes of every tensor alive between steps: weights, buffers, optimiser state, gradients, the batch."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.batch]
        tensors += [p.grad for p in self.params if p.grad is not None]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def setup(model_name: str, method: str, batch: int, device: str, grad_checkpointing: bool = False,
          precision: str = "fp32") -> Setup:
    import radapter
    from train.config import TrainConfig
    from train.loop import enable_grad_checkpointing
    from train.structures import prepare_trainable, set_train_mode

    torch.manual_seed(0)
    model, _, tok = radapter.load_model(model_name) if model_name != "default" else radapter.load_model()
    size = model.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    images = torch.randn(batch, 3, size, size)
    texts = tok([f"a photo of a thing number {i}." for i in range(batch)])
    labels = torch.arange(batch) % 10
    # The trainable structure and train/eval modes exactly as python -m train sets them up.
    cfg = TrainConfig(method=TRAIN_METHOD[method], grad_checkpointing=grad_checkpointing)
    params = prepare_trainable(model, cfg)
    set_train_mode(model, cfg)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    return Setup(model, params, opt, (images.to(device), texts.to(device), labels.to(device)), method, precision)


def peak_step_tensor_bytes(s: Setup) -> int:
    """Tensors alive at the start of a step plus the peak of what the step allocates on top."""
    s.opt.zero_grad(set_to_none=True)  # freed here, outside the recording: the running total starts clean
    if s.batch[0].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    start = s.live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s.step()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return start + peak


def saved_activations_bytes(s: Setup) -> int:
    """What autograd keeps for backward after one forward pass, parameters and buffers excluded (exact)."""
    own = {t.untyped_storage().data_ptr() for t in (*s.model.parameters(), *s.model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s.forward()
    return sum(kept.values())


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient of a convolution costs what its forward does (torch's formula counts a
    grouped conv's weight gradient as dense: 100x too many for a depthwise net)."""
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * grad_out_shape[0] * w_shape[0] * w_shape[1] * math.prod(w_shape[2:]) * math.prod(spatial)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(s: Setup) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        s.forward().backward()
    s.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def worker(model_name: str, method: str, batch: int, warmup: int, device: str, malloc: str = "keep",
           grad_checkpointing: bool = False, precision: str = "fp32") -> None:
    """A method in its own process, stepping when told: ``step`` -> its times; ``report`` -> its memory and FLOPs.

    Its own process keeps its peak RSS its own and its allocator state unshared.
    """
    import radapter  # before the baseline in either malloc mode: the libraries count as baseline

    if malloc == "keep":
        radapter.keep_freed_memory()  # as python -m train does on CPU
    baseline_mb = _rss_mb()  # the interpreter and libraries, before any model exists
    s = setup(model_name, method, batch, device, grad_checkpointing, precision)
    for _ in range(max(warmup, 1)):  # optimiser state exists from the first step on
        s.step()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            phases = s.step()  # synchronises with the device before it returns
            print(json.dumps([time.perf_counter() - t0, time.process_time() - c0, phases]), flush=True)
            continue
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Read after the RSS peak: the probes below allocate on their own.
        print(json.dumps({
            "peak_rss_mb": peak_rss, "libraries_rss_mb": baseline_mb,
            "peak_rss_above_libraries_mb": peak_rss - baseline_mb,
            "peak_tensor_mb": peak_step_tensor_bytes(s) / 2**20,
            "saved_activations_mb": saved_activations_bytes(s) / 2**20,
            "step_gflops": step_flops(s) / 1e9,
            "trainable_parameters": sum(p.numel() for p in s.params)}), flush=True)
        return


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _start_worker(name: str, method: str, batch: int, warmup: int, device: str, malloc: str,
                  grad_checkpointing: bool, precision: str) -> subprocess.Popen:
    code = ("from benchmarks.train_cost import worker; "
            f"worker({name!r}, {method!r}, {batch}, {warmup}, {device!r}, {malloc!r}, {grad_checkpointing!r}, "
            f"{precision!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def _ask(proc: subprocess.Popen, command: str | None = None) -> str:
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker exited with {proc.wait()} (its error is above)")
    return line.strip()


def measure_model(name: str, batch: int, steps: int, warmup: int, device: str, malloc: str = "keep",
                  grad_checkpointing: bool = False, precision: str = "fp32") -> dict:
    """Both methods in their own processes, set up one after the other, then stepping in turns."""
    procs = {}
    try:
        for m in METHODS:  # one at a time: set-up and warm-up of one do not slow the other
            procs[m] = _start_worker(name, m, batch, warmup, device, malloc, grad_checkpointing, precision)
            _ask(procs[m])
        wall: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}
        phases: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        for i in range(steps):
            for m in METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)]:  # each goes first in turn
                w, c, ph = json.loads(_ask(procs[m], "step"))
                wall[m].append(w)
                cpu[m].append(c)
                phases[m].append(ph)
        runs = {m: json.loads(_ask(procs[m], "report")) for m in METHODS}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    for m in METHODS:
        runs[m].update(step_s=statistics.median(wall[m]), step_cpu_s=statistics.median(cpu[m]),
                       images_per_s=batch / statistics.median(wall[m]), step_s_all=wall[m],
                       **{k: statistics.median(p[k] for p in phases[m]) for k in phases[m][0]})
    ra, lora, ft = runs["r_adapter"], runs["lora"], runs["full_ft"]
    return {"r_adapter": ra, "lora": lora, "full_ft": ft, **ratios(ra, ft),
            "lora_over_full_ft": ratios(lora, ft), "r_adapter_over_lora": ratios(ra, lora)}


def ratios(a: dict, b: dict) -> dict[str, float]:
    """Method ``a``'s cost over method ``b``'s."""
    return {
        "memory_ratio": a["peak_tensor_mb"] / b["peak_tensor_mb"],
        "memory_ratio_rss": a["peak_rss_above_libraries_mb"] / b["peak_rss_above_libraries_mb"],
        "step_time_ratio": a["step_s"] / b["step_s"],
        "step_time_ratio_fastest": min(a["step_s_all"]) / min(b["step_s_all"]),
        "cpu_time_ratio": a["step_cpu_s"] / b["step_cpu_s"],
        "flop_ratio": a["step_gflops"] / b["step_gflops"],
        "saved_activations_ratio": a["saved_activations_mb"] / b["saved_activations_mb"],
        "trainable_parameters_ratio": a["trainable_parameters"] / b["trainable_parameters"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "default"],
                   help="model names ('default' = the offline default model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=7, help="timed steps per method (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="CPU: glibc malloc keeps freed memory, as python -m train does (default), or glibc's defaults")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="both methods recompute each block in backward (python -m train --grad-checkpointing)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: both methods' forward under bf16 autocast (python -m train --precision bf16; "
                        "the paper trains in mixed precision)")
    p.add_argument("--out", default="docs/bench/train_cost.json")
    args = p.parse_args()
    result = {"batch": args.batch, "steps": args.steps, "device": args.device, "malloc": args.malloc,
              "grad_checkpointing": args.grad_checkpointing, "precision": args.precision,
              "loss": "MPM-NCE, both towers", "models": {}}
    for name in args.models:
        result["models"][name] = measure_model(name, args.batch, args.steps, args.warmup, args.device, args.malloc,
                                               args.grad_checkpointing, args.precision)
        print(name, {k: round(v, 3) for k, v in result["models"][name].items() if k.endswith("ratio")}, flush=True)
    result["goals"] = {"memory_ratio": "<= 0.6", "step_time_ratio": "<= 0.7"}
    write_result(args.out, result, "benchmarks.train_cost")


if __name__ == "__main__":
    main()
