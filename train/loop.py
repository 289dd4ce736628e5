"""The training loop: AdamW + warm-up cosine, gradient clipping, EMA, atomic checkpoints, exact resume, DDP.

Checkpoints: ``checkpoint.pt`` and the one before it, ``checkpoint.prev.pt``; ``--resume``
falls back to the previous one when the latest is unreadable, and refuses a checkpoint
written with other run-altering options unless ``--resume-allow-changes``.

Run with ``torchrun --nproc_per_node N -m train ...`` for data parallelism (gloo on CPU,
nccl on GPU); ``--batch-size`` is the global batch, split evenly over processes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
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

from .config import RESUME_FIXED, TrainConfig, describe_changes, resume_changes
from .data import StepBatchSampler, TrainData
from .objectives import DualEncoder, check_descriptions, contrastive_loss, drm_loss, logit_scale, normalise_core
from .structures import prepare_trainable, set_train_mode

log = logging.getLogger("train")
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
STATE_KEYS = ("step", "model", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "scaler", "config")


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


class UnreadableCheckpoint(radapter.RAdapterError):
    """A checkpoint file is truncated, corrupt or not a training checkpoint."""


def save_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, opt, sched, step: int, scaler=None,
                    loss: float | None = None) -> None:
    """Write the resumable state atomically; the file is synced to disk before it replaces the old one.

    ``loss`` is the last step's loss: a run resumed after its last step reports it.
    """
    state = {
        "step": step, "model": trainable_state(model, cfg), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "scaler": scaler.state_dict() if scaler is not None else {}, "config": cfg.to_dict(), "loss": loss,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def keep_as_previous(latest: Path, previous: Path) -> None:
    """Make ``previous`` the same file as ``latest``, atomically: a hard link (no extra disk), else a copy."""
    with atomic_path(previous) as tmp:
        tmp.unlink()
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)


class CheckpointFiles:
    """A run's ``checkpoint.pt`` and the one written before it, ``checkpoint.prev.pt``.

    Each save keeps the latest checkpoint as the previous one, so at most two are on disk.
    A latest file this run neither wrote nor resumed from (another run's, or an unreadable
    one) is never kept, and another run's previous one is removed at the first save, with the
    temporary files of writes that were killed part-way.
    """

    def __init__(self, out: Path, resumed_from: Path | None = None) -> None:
        self.latest, self.previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
        self._latest_ours = resumed_from == self.latest
        self._previous_ours = resumed_from is not None
        self._saved = False

    def save(self, model: nn.Module, cfg: TrainConfig, opt, sched, step: int, scaler=None,
             loss: float | None = None) -> None:
        if not self._saved:
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
                for stale in self.latest.parent.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
        if self._latest_ours and self.latest.is_file():
            keep_as_previous(self.latest, self.previous)
        elif not self._previous_ours:
            self.previous.unlink(missing_ok=True)
        save_checkpoint(self.latest, model, cfg, opt, sched, step, scaler, loss)
        self._latest_ours = self._previous_ours = self._saved = True


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; ``UnreadableCheckpoint`` (one line naming it) if it fails."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # truncated or corrupt: RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableCheckpoint(f"{path} is unreadable ({reason})") from e
    if not isinstance(state, dict) or not set(STATE_KEYS) <= state.keys():
        raise UnreadableCheckpoint(f"{path} is not a training checkpoint")
    return state


def check_resume_config(path: Path, saved: dict[str, Any], cfg: TrainConfig, *, main: bool = True) -> None:
    """Refuse to resume ``path`` when its run had other run-altering options, naming them (old -> new).

    ``cfg.resume_allow_changes`` accepts the changes (with a warning), except for the options
    that decide which tensors the checkpoint holds (method, model, ranks).
    """
    changes = resume_changes(saved, cfg)
    fixed = [name for name, _, _ in changes if name in RESUME_FIXED]
    if fixed:
        raise radapter.RAdapterError(
            f"{path} belongs to another run ({describe_changes(changes)}); {', '.join(fixed)} cannot change on "
            "resume: use another --out-dir or drop --resume")
    if changes and not cfg.resume_allow_changes:
        raise radapter.RAdapterError(
            f"{path} was written with other options ({describe_changes(changes)}); pass --resume-allow-changes to "
            "continue with the new ones, or use another --out-dir, or drop --resume")
    if changes and main:
        log.warning("resuming %s with changed options (--resume-allow-changes): %s", path, describe_changes(changes))


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from; ``restore_checkpoint`` empties ``state``."""

    path: Path
    state: dict[str, Any]


def find_resume_point(out: Path, cfg: TrainConfig, *, main: bool = True) -> ResumePoint | None:
    """What ``--resume`` continues from: ``checkpoint.pt``, else (with a warning) ``checkpoint.prev.pt``
    when the latest is unreadable or missing; None when neither exists (a fresh start).

    Raises ``UnreadableCheckpoint`` when neither is readable, and ``RAdapterError`` when the
    checkpoint was written with other run-altering options (see ``check_resume_config``).
    """
    latest, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not latest.is_file() and not previous.is_file():
        return None
    problems = []
    for path in (latest, previous):
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            state = read_checkpoint(path)
        except UnreadableCheckpoint as e:
            problems.append(str(e))
            continue
        check_resume_config(path, state["config"], cfg, main=main)
        if problems and main:
            log.warning("%s; resuming from %s (step %d)", "; ".join(problems), path, state["step"])
        return ResumePoint(path, state)
    raise UnreadableCheckpoint(f"cannot resume: {'; '.join(problems)}; use another --out-dir or drop --resume")


def _apply_optimiser_options(opt, sched, cfg: TrainConfig) -> None:
    """Learning rate and weight decay come from ``cfg``, the schedule's position from the checkpoint.

    Unchanged options give the restored values exactly; options accepted by
    ``--resume-allow-changes`` (lr, weight decay, warm-up, length) apply from the resumed step.
    """
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        group["lr"] = cfg.lr * factor(sched.last_epoch)


def restore_checkpoint(resume: ResumePoint, model: nn.Module, cfg: TrainConfig, opt, sched,
                       scaler=None) -> tuple[int, dict, float | None]:
    """Restore model, optimiser, scheduler and scaler, then empty ``resume.state`` (freeing its tensors).

    Returns the step, the RNG states to restore once the data iterator exists (creating it
    draws from the global RNG) and the checkpoint's last loss (None where it has none).
    """
    state = resume.state
    expected = set(trainable_state(model, cfg))
    unknown, missing = set(state["model"]) - expected, expected - set(state["model"])
    if unknown or missing:
        raise radapter.RAdapterError(f"{resume.path} does not fit this model ({len(unknown)} unknown tensors, "
                                     f"{len(missing)} missing)")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _apply_optimiser_options(opt, sched, cfg)
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    step, rng, loss = int(state["step"]), {"cpu": state["rng_cpu"], "cuda": state["rng_cuda"]}, state.get("loss")
    state.clear()
    return step, rng, None if loss is None else float(loss)


def load_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, opt, sched, scaler=None) -> tuple[int, dict]:
    """Check and restore ``path`` (see ``restore_checkpoint``); returns the step and the RNG states."""
    state = read_checkpoint(path)
    check_resume_config(path, state["config"], cfg)
    step, rng, _ = restore_checkpoint(ResumePoint(path, state), model, cfg, opt, sched, scaler)
    return step, rng


def final_loss(loss: float | None, resumed: bool) -> dict[str, Any]:
    """The summary's ``final_loss``: a finite number, or None with ``final_loss_note`` saying why."""
    if loss is None:
        why = ("resumed after the last step from a checkpoint that does not record its loss" if resumed
               else "no training step ran")
        return {"final_loss": None, "final_loss_note": why}
    if not math.isfinite(loss):
        return {"final_loss": None, "final_loss_note": f"the last step's loss was not finite ({loss})"}
    return {"final_loss": loss}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@torch.no_grad()
def core_targets(model: nn.Module, tokenizer, preprocess, data: TrainData, cfg: TrainConfig) -> torch.Tensor:
    """DRM's q for every training image, from the frozen pretrained model (computed once, before training)."""
    from radapter.evaluation import embed_images

    feats = embed_images(model, data.dataset(preprocess), batch_size=64, desc="DRM core targets")
    desc = encode_texts(model, tokenizer, check_descriptions(data.classnames, data.descriptions))
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
                 world: Dist, resume: ResumePoint | None = None,
                 validate: Callable[[nn.Module], float] | None = None) -> dict[str, Any]:
    """Train ``model`` in place, continuing from ``resume`` if given (see ``find_resume_point``);
    returns a summary (steps, final loss, timing). With ``validate`` and ``cfg.val_every``, the
    summary's ``val_curve`` holds ``validate(model)`` every ``val_every`` steps and at the end."""
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
    start, rng, last_loss = 0, None, None
    if resume is not None:
        start, rng, last_loss = restore_checkpoint(resume, model, cfg, opt, sched, scaler)
        if world.main:
            log.info("resumed from %s at step %d", resume.path, start)
    checkpoints = CheckpointFiles(out, resume.path if resume is not None else None)
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
    desc_tokens = tokenizer(check_descriptions(data.classnames, data.descriptions)).to(device) if cfg.uses_drm \
        else None
    local = micro_batch // world.world_size
    bar = tqdm(total=steps, initial=start, desc=f"train {cfg.method}", disable=not world.main)
    t0, loss_value, extra, step = time.time(), last_loss, {}, start
    val_curve: list[dict[str, float]] = []
    set_train_mode(model, cfg)
    batches = iter(loader)
    if rng is not None:
        restore_rng(rng)
    for micro, (images, index) in enumerate(batches, start=start * cfg.accum_steps):
        step = micro // cfg.accum_steps
        images = images.to(device)
        labels = labels_all[index].to(device)
        with autocast_context(device, cfg.precision):
            batch = sampler.global_batch(micro)
            captions = data.pick_captions(batch, cfg.seed, micro)[world.rank * local:(world.rank + 1) * local]
            tokens = tokenizer(captions).to(device)
            if cfg.uses_drm:  # one text forward for captions and descriptions (one call DDP can wrap)
                img, txt = encoder(images, torch.cat([tokens, desc_tokens]))
                txt, desc_txt = txt[:len(captions)], txt[len(captions):]
                loss, extra = drm_loss(img.float(), txt.float(), desc_txt.float(), labels, q_all[index].to(device),
                                       cfg, scale)
            else:
                img, txt = encoder(images, tokens)
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
        if validate is not None and cfg.val_every and world.main and (step % cfg.val_every == 0 or step == steps):
            val_curve.append({"step": step, "top1": validate_keeping_rng(model, validate, cfg)})
            log.info("step %d: ID validation top-1 %.1f%% (alpha 1)", step, 100 * val_curve[-1]["top1"])
        if world.main and not cfg.dry_run and (step % cfg.ckpt_every == 0 or step == steps):
            checkpoints.save(model, cfg, opt, sched, step, scaler, loss=loss_value)
    bar.close()
    model.eval()
    if world.world_size > 1:
        dist.barrier()
    summary = {"steps": step, **final_loss(loss_value, resume is not None), "seconds": round(time.time() - t0, 2),
               "examples": len(data), "trainable_parameters": sum(p.numel() for p in params)}
    if val_curve:
        summary["val_curve"] = val_curve
    return summary


def validate_keeping_rng(model: nn.Module, validate: Callable[[nn.Module], float], cfg: TrainConfig) -> float:
    """``validate(model)`` in eval mode, then back to the method's training mode with the RNG as it
    was: evaluation's DataLoader draws a seed, and training must not depend on how often it looked."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.eval()
        return float(validate(model))
    finally:
        set_train_mode(model, cfg)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
