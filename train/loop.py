"""The training loop: AdamW + warm-up cosine, gradient clipping, EMA, atomic checkpoints, exact resume, DDP.

Run with ``torchrun --nproc_per_node N -m train ...`` for data parallelism (gloo on CPU,
nccl on GPU); ``--batch-size`` is the global batch, split evenly over processes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import radapter
from radapter.atomic import atomic_path
from radapter.evaluation.zero_shot import encode_texts

from .config import TrainConfig
from .data import StepBatchSampler, TrainData
from .objectives import DualEncoder, class_prompts, contrastive_loss, drm_loss, logit_scale, normalise_core
from .structures import prepare_trainable, set_train_mode

log = logging.getLogger("train")
CHECKPOINT = "checkpoint.pt"


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(cfg.device)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def total_steps(cfg: TrainConfig, n: int) -> int:
    return cfg.steps if cfg.steps is not None else max(1, int(cfg.epochs * (n // (cfg.batch_size * cfg.accum_steps))))


def trainable_state(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to resume: adapters with their EMA copy, LoRA factors, or everything."""
    state = model.state_dict()
    if cfg.method in ("full-ft", "full-ft-drm"):
        return state
    return {k: v for k, v in state.items() if ".radapter." in k or "lora_" in k}


def save_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, opt, sched, step: int, scaler=None) -> None:
    state = {
        "step": step, "model": trainable_state(model, cfg), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "scaler": scaler.state_dict() if scaler is not None else {}, "config": cfg.to_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, opt, sched, scaler=None) -> tuple[int, dict]:
    """Restore model, optimiser, scheduler and scaler; returns the step and the RNG states to
    restore once the data iterator exists (creating it draws from the global RNG)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mismatched = {k for k in ("method", "batch_size", "seed", "model") if state["config"].get(k) != getattr(cfg, k)}
    if mismatched:
        raise radapter.RAdapterError(f"{path} was written by a different run (differs in {sorted(mismatched)}); "
                                     "use another --out-dir or drop --resume")
    missing = set(state["model"]) - set(model.state_dict())
    if missing:
        raise radapter.RAdapterError(f"{path} does not fit this model ({len(missing)} unknown tensors)")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"]), {"cpu": state["rng_cpu"], "cuda": state["rng_cuda"]}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@torch.no_grad()
def core_targets(model: nn.Module, tokenizer, preprocess, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    """DRM's q for every training image, from the frozen pretrained model (computed once, before training)."""
    from radapter.evaluation import embed_images

    feats = embed_images(model, data.dataset(preprocess), batch_size=64, desc="DRM core targets")
    desc = encode_texts(model, tokenizer, class_prompts(data.classnames, data.descriptions, cfg))[len(data.classnames):]
    affinity = feats @ desc.cpu().t()
    return normalise_core(affinity, torch.as_tensor(data.labels), cfg, logit_scale(model))


def autocast_context(device: torch.device, precision: str):
    """The forward's mixed-precision context: bf16 autocast on GPU or CPU, fp16 on GPU, else none.

    ``run_training`` warns where the precision does not apply (fp16 on CPU) or runs slowly
    (bf16 on a CPU without native bf16 instructions).
    """
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Have the towers keep only block inputs and recompute blocks in backward (open_clip's switch).

    The recomputation replays the random state, so adapter dropping draws the same masks.
    """
    if not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch; drop --grad-checkpointing")
    model.set_grad_checkpointing(True)


def run_training(model: nn.Module, tokenizer, preprocess, data: TrainData, cfg: TrainConfig, device: torch.device,
                 world: Dist) -> dict[str, Any]:
    """Train ``model`` in place; returns a summary (steps, final loss, timing)."""
    out = Path(cfg.out_dir)
    if cfg.precision == "fp16" and device.type != "cuda":
        log.warning("--precision fp16 needs a GPU; training in fp32 on %s (bf16 autocast runs on CPU)", device)
    if cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("--precision bf16: this CPU has no native bf16 instructions; autocast will be slower than fp32")
    q_all = core_targets(model, tokenizer, preprocess, data, cfg) if cfg.uses_drm else None
    params = prepare_trainable(model, cfg)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    steps = 2 if cfg.dry_run else total_steps(cfg, len(data))
    if cfg.warmup_steps >= steps and not cfg.dry_run:
        log.warning("warm-up (%d steps) is longer than the run (%d steps)", cfg.warmup_steps, steps)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, steps))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.precision == "fp16" else None
    start, rng = 0, None
    ckpt = out / CHECKPOINT
    if cfg.resume and ckpt.is_file():
        start, rng = load_checkpoint(ckpt, model, cfg, opt, sched, scaler)
        if world.main:
            log.info("resumed from %s at step %d", ckpt, start)
    micro_batch = cfg.batch_size
    sampler = StepBatchSampler(len(data), micro_batch, cfg.seed, start * cfg.accum_steps, steps * cfg.accum_steps,
                               world.rank, world.world_size)
    loader = torch.utils.data.DataLoader(data.dataset(preprocess), batch_sampler=sampler, num_workers=cfg.workers)
    encoder = DualEncoder(model)
    if world.world_size > 1:
        # Full fine-tuning leaves some tower parameters unused (e.g. a text pooler open_clip skips).
        encoder = nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.method in ("full-ft", "full-ft-drm"))
    scale = logit_scale(model)
    labels_all = torch.as_tensor(data.labels)
    class_tokens = tokenizer(class_prompts(data.classnames, data.descriptions, cfg)).to(device) if cfg.uses_drm \
        else None
    local = micro_batch // world.world_size
    bar = tqdm(total=steps, initial=start, desc=f"train {cfg.method}", disable=not world.main)
    t0, loss_value, extra, step = time.time(), float("nan"), {}, start
    set_train_mode(model, cfg)
    batches = iter(loader)
    if rng is not None:
        restore_rng(rng)
    for micro, (images, index) in enumerate(batches, start=start * cfg.accum_steps):
        step = micro // cfg.accum_steps
        images = images.to(device)
        labels = labels_all[index].to(device)
        with autocast_context(device, cfg.precision):
            if cfg.uses_drm:
                img, class_txt = encoder(images, class_tokens)
                loss, extra = drm_loss(img.float(), class_txt.float(), labels, q_all[index].to(device), cfg, scale)
            else:
                batch = sampler.global_batch(micro)
                captions = data.pick_captions(batch, cfg.seed, micro)[world.rank * local:(world.rank + 1) * local]
                img, txt = encoder(images, tokenizer(captions).to(device))
                loss = contrastive_loss(img.float(), txt.float(), labels, cfg, scale)
        scaled = loss / cfg.accum_steps
        (scaler.scale(scaled) if scaler else scaled).backward()
        if (micro + 1) % cfg.accum_steps:
            continue
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.uses_adapters:
            radapter.update_ema(model)
        step += 1
        loss_value = loss.item()
        bar.update(1)
        if world.main and (step % cfg.log_every == 0 or step == steps):
            rate = (step - start) * cfg.batch_size * cfg.accum_steps / max(time.time() - t0, 1e-9)
            parts = " ".join(f"{k} {v:.4f}" for k, v in extra.items())
            log.info("step %d/%d  loss %.4f %s lr %.2e  %.1f img/s", step, steps, loss_value, parts,
                     sched.get_last_lr()[0], rate)
        if world.main and not cfg.dry_run and (step % cfg.ckpt_every == 0 or step == steps):
            save_checkpoint(ckpt, model, cfg, opt, sched, step, scaler)
    bar.close()
    model.eval()
    if world.world_size > 1:
        dist.barrier()
    return {"steps": step, "final_loss": loss_value, "seconds": round(time.time() - t0, 2),
            "examples": len(data), "trainable_parameters": sum(p.numel() for p in params)}
