"""``python -m train``: R-Adapter, DRM and baselines. Every option has the paper's default.

    python -m train --method r-adapter --benchmark fmnist --config train/configs/cpu-small.json
    torchrun --nproc_per_node 2 -m train --method r-adapter --benchmark emoji --batch-size 64
    python -m train --config train/configs/imagenet-vitb16.json     # the paper's ImageNet recipe
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing

from radapter.errors import RAdapterError

from .config import METHODS, TrainConfig, load_config_file

HELP = {
    "method": f"one of {', '.join(METHODS)}; drm = R-Adapter trained with the DRM objective, full-ft-drm = full "
              "fine-tuning with DRM; full-ft is FLYP-style and also reports WiSE-FT",
    "model": "model name or path (default: the offline default model)",
    "pretrained": "pretrained tag or local weights file",
    "benchmark": "prepared benchmark to train on: fmnist, digits, emoji, emoji-backgrounds",
    "train_folder": "your ImageFolder training data (instead of --benchmark)",
    "val_folder": "your ImageFolder validation data (held out; chooses alpha)",
    "test_folder": "your ImageFolder test data (reported; never used for choices)",
    "train_table": "your CSV/JSONL of image, caption[, group] for retrieval training",
    "classnames": "class-name file for --train-folder, or 'imagenet' for ImageNet's <wnid> folders",
    "templates": "file with one prompt template per line ({} = class name); default: the benchmark's",
    "task": "classification (class captions) or retrieval (captions; several per image are positives)",
    "shots": "few-shot: k training images per class",
    "base_to_novel": "train on the first half of the classes; report base, novel and their harmonic mean",
    "train_limit": "at most this many training images (fixed random subset)",
    "data_dir": "prepared benchmark folder (default $RADAPTER_DATA or ~/.cache/radapter/data)",
    "rank": "adapter rank (default full rank; the paper uses low rank for few-shot)",
    "scale_init": "initial adapter scale s (paper code: 0.1)",
    "drop_prob": "adapter-dropping probability p (paper: 0.2)",
    "drop_mode": "adapter (per adapter and sample, the paper) or token (the authors' drop-path code)",
    "ema_momentum": "EMA momentum m of adapter weights (paper: 0.999; 0.9 for small few-shot runs)",
    "lora_rank": "LoRA baseline rank", "lora_alpha": "LoRA baseline alpha (scale = alpha / rank)",
    "loss": "mpm-nce or clip (default: mpm-nce for r-adapter, clip = FLYP for full-ft)",
    "eps": "MPM-NCE label smoothing eps (paper, ImageNet: 0.02)",
    "margin": "MPM-NCE negative margin delta (paper: 0.05)",
    "temperature": "MPM-NCE temperature (default: 1 / the model's logit scale, as the authors use)",
    "drm_lambda": "DRM weight of the worst-case-risk proxy", "drm_beta": "DRM inference mix of the two heads",
    "drm_norm": "DRM target from core affinities: softmax or minmax",
    "drm_label_mix": "DRM: mix the label into the target q (0 = core prediction only)",
    "drm_default_template": "DRM default head at inference: one template (default: the caption templates)",
    "val_every": "score ID validation (top-1 at alpha 1) every N steps and at the end, to see the budget plateau "
                 "(metrics.json: training.val_curve); the RNG is restored, so training is the same",
    "drm_check_descriptions": "DRM: score each candidate description set on ID validation and train on the best",
    "lr": "learning rate (paper: 5e-4)", "weight_decay": "AdamW weight decay (paper: 0)",
    "warmup_steps": "linear warm-up steps before the cosine decay (paper: 500)",
    "batch_size": "global batch size (paper: 512)", "epochs": "epochs (paper: 10)",
    "steps": "optimiser steps (overrides --epochs)", "grad_clip": "gradient-norm clip (paper: 1)",
    "accum_steps": "gradient accumulation: optimiser step every N batches",
    "grad_checkpointing": "keep only each transformer/CNN block's input and recompute the block in backward: "
                          "far less activation memory (large batches) for about one more forward per step",
    "precision": "fp32; bf16 autocast (GPU, or CPU: fast where it has AVX512-BF16/AMX); fp16 autocast (GPU)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "workers": "DataLoader workers",
    "keep_freed_memory": "on CPU, have glibc's malloc keep freed memory for reuse: no page faults after the first "
                         "steps, about 1.6x the images/s on the default model, resident memory stays near its peak "
                         "(--no-keep-freed-memory: glibc's defaults)",
    "seed": "seed for everything (data order, captions, init, dropping)",
    "out_dir": "output folder: adapter.safetensors, metrics.json, sweep.png, config.json, checkpoint.pt",
    "log_every": "log a line every N steps", "ckpt_every": "write a resumable checkpoint every N steps",
    "resume": "continue from out_dir/checkpoint.pt exactly where it stopped (checkpoint.prev.pt if that one is "
              "unreadable); refuses changed options that alter the run",
    "resume_allow_changes": "with --resume, continue with changed options that alter the run (--lr, --steps, "
                            "the data, ...) instead of refusing them",
    "eval_limit": "at most this many images per evaluation set", "eval_alphas": "alpha grid points in 0..1",
    "test_sweep": "evaluate the test split at every alpha (--no-test-sweep: only the chosen alpha and 1, "
                  "which is all the results table needs; validation always sweeps)",
    "default_alpha": "alpha to ship and report (default: best ID validation accuracy)",
    "dry_run": "build everything and run 2 steps (checks a recipe without the data size or time)",
}


def _arg_type(annotation: str):
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of options (flags given here override it)")
    for f in TrainConfig.fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _arg_type(f.name)
        help_text = f"{HELP[f.name]} (default: {f.default})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=kind, default=None, help=help_text)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if args.get("config") else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("train").setLevel(logging.INFO)
    try:
        cfg = config_from_args(argv)
        from .run import run

        run(cfg)
    except (RAdapterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
