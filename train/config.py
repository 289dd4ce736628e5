"""`TrainConfig`: every training option as data, with the paper's defaults.

A run is fully described by its config: CLI flags, a JSON config file (``--config``) or
both (flags win). The resolved config is saved next to the outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("r-adapter", "drm", "full-ft", "full-ft-drm", "lora", "linear-probe", "zero-shot")

# Options that do not change what a run trains (placement, speed, logging, evaluation): a
# resumed run may change them. Every other option alters the run: ``--resume`` refuses a
# change of one unless ``--resume-allow-changes`` is given.
RESUME_FREE = frozenset({
    "val_folder", "test_folder", "drm_beta", "grad_checkpointing", "device", "workers", "keep_freed_memory",
    "out_dir", "log_every", "ckpt_every", "resume", "resume_allow_changes", "eval_limit", "eval_alphas",
    "test_sweep", "default_alpha", "val_every",
})
# Options that decide which tensors the checkpoint holds: no resume can change them.
RESUME_FIXED = frozenset({"method", "model", "pretrained", "rank", "lora_rank"})


@dataclass
class TrainConfig:
    # what to train
    method: str = "r-adapter"
    model: str | None = None  # None: the offline default model
    pretrained: str | None = None
    # data
    benchmark: str | None = "fmnist"
    train_folder: str | None = None  # ImageFolder for your own classification data
    val_folder: str | None = None  # held out from training: chooses alpha
    test_folder: str | None = None  # reported ID accuracy (never used for choices)
    train_table: str | None = None  # CSV/JSONL of image, caption[, group] for retrieval
    classnames: str | None = None
    templates: str | None = None  # file with one template per line; default: the benchmark's
    task: str = "classification"  # classification | retrieval
    shots: int | None = None  # k-shot per class
    base_to_novel: bool = False  # train on the first half of the classes
    train_limit: int | None = None  # at most this many training images (fixed subset)
    data_dir: str | None = None
    # R-Adapter (paper defaults)
    rank: int | None = None
    scale_init: float = 0.1
    drop_prob: float = 0.2
    drop_mode: str = "adapter"
    ema_momentum: float | None = 0.999
    lora_rank: int = 16
    lora_alpha: float = 16.0
    # MPM-NCE (paper, ImageNet)
    loss: str | None = None  # None: mpm-nce for r-adapter, clip (FLYP) for full-ft
    eps: float = 0.02
    margin: float = 0.05
    temperature: float | None = None  # None: 1 / the model's logit scale (the authors' choice)
    # DRM
    drm_lambda: float = 1.0
    drm_beta: float = 0.5
    drm_norm: str = "softmax"  # how core affinities become the target q: softmax | minmax
    drm_label_mix: float = 0.0  # q <- (1 - m) q + m onehot(y)
    drm_default_template: str | None = None  # None: the same templates as the captions
    drm_check_descriptions: bool = True  # score description sets on ID val first and train on the best
    # optimisation (paper: AdamW, wd 0, lr 5e-4, cosine, 500 warm-up steps, batch 512, 10 epochs, clip 1)
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    batch_size: int = 512
    epochs: float = 10.0
    steps: int | None = None  # overrides epochs
    grad_clip: float = 1.0
    accum_steps: int = 1
    grad_checkpointing: bool = False  # recompute each block's forward in backward
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU or CPU) | fp16 (autocast, GPU)
    device: str = "auto"
    workers: int = 0
    keep_freed_memory: bool = True  # CPU: glibc malloc keeps freed blocks for reuse
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/train"
    log_every: int = 20
    ckpt_every: int = 100
    resume: bool = False
    resume_allow_changes: bool = False  # --resume may change settings that alter the run
    eval_limit: int | None = None
    val_every: int = 0  # >0: ID validation top-1 at alpha 1 every N steps (the plateau curve)
    eval_alphas: int = 11  # alpha grid points for the sweep (0..1)
    test_sweep: bool = True  # False: the test split only at the chosen alpha and at 1 (validation still sweeps)
    default_alpha: float | None = None  # None: best alpha on the ID validation split
    dry_run: bool = False  # build everything, run 2 steps, write nothing heavy

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.task not in ("classification", "retrieval"):
            raise ValueError(f"task must be classification or retrieval, got {self.task!r}")
        if self.drm_norm not in ("softmax", "minmax"):
            raise ValueError(f"drm_norm must be softmax or minmax, got {self.drm_norm!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("batch_size and accum_steps must be positive")

    @property
    def uses_drm(self) -> bool:
        return self.method in ("drm", "full-ft-drm")

    @property
    def uses_adapters(self) -> bool:
        return self.method in ("r-adapter", "drm")

    @property
    def loss_name(self) -> str:
        """The contrastive loss on captions; DRM methods add the worst-case-risk term to it."""
        return self.loss or ("mpm-nce" if self.uses_adapters else "clip")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """The run-altering options whose value in ``cfg`` differs from the ``saved`` config, as
    ``(name, old, new)``; an option missing from ``saved`` counts as its default."""
    changes = []
    for f in TrainConfig.fields():
        if f.name in RESUME_FREE:
            continue
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if f.name == "epochs" and cfg.steps is not None and saved.get("steps") is not None:
            continue  # --steps decides the length in both runs
        if old != new:
            changes.append((f.name, old, new))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``--lr 0.0005 -> 0.001, --steps 6 -> 8``: the changes as flags with old and new values."""
    return ", ".join(f"--{name.replace('_', '-')} {old!r} -> {new!r}" for name, old, new in changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    known = {f.name for f in TrainConfig.fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}")
    return data
