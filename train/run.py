"""One training run end to end: load, train, evaluate, write the outputs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import radapter
from radapter.atomic import atomic_path
from radapter.evaluation import plot_alpha_sweep

from .config import TrainConfig
from .data import build_train_data
from .description_check import choose_descriptions
from .evaluate import alpha_setter, evaluate_retrieval_task, final_evaluation, linear_probe, validation_top1
from .loop import find_resume_point, init_distributed, resolve_device, run_training
from .lora import merge_lora
from .objectives import default_templates

log = logging.getLogger("train")


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the metrics written to ``out_dir/metrics.json``."""
    device = resolve_device(cfg)
    if device.type == "cpu" and cfg.keep_freed_memory and radapter.keep_freed_memory():
        log.info("malloc keeps freed memory for reuse (--no-keep-freed-memory for glibc's defaults)")
    world = init_distributed(device)
    out = Path(cfg.out_dir)
    trains = cfg.method not in ("zero-shot", "linear-probe")
    # Checked before anything is loaded or written: a refused resume leaves the folder as it was.
    resume = find_resume_point(out, cfg, main=world.main) if cfg.resume and trains else None
    torch.manual_seed(cfg.seed)  # also makes random-init models (tests, timing) identical across processes
    model, preprocess, tokenizer = (radapter.load_model(cfg.model, pretrained=cfg.pretrained) if cfg.model
                                    else radapter.load_model())
    model.to(device)
    data = build_train_data(cfg)
    checked = None
    if cfg.uses_drm and cfg.drm_check_descriptions and data.bench is not None and data.bench.val is not None \
            and data.spec_descriptions:
        checked = choose_descriptions(model, tokenizer, preprocess, data.bench.spec, data.bench.val,
                                      data.templates, cfg.eval_limit)
        data.set_descriptions(list(checked["candidates"][checked["chosen"]]["descriptions"].values()))
    out.mkdir(parents=True, exist_ok=True)
    if world.main:
        cfg.save(out / "config.json")
        log.info("%s on %d training examples (%s)", cfg.method, len(data), cfg.benchmark or cfg.train_folder
                 or cfg.train_table)
    full = cfg.method in ("full-ft", "full-ft-drm")
    theta0 = _clone_state(model) if full else None
    summary: dict[str, Any] = {}
    if trains:
        summary = run_training(model, tokenizer, preprocess, data, cfg, device, world, resume,
                               validate=validation_top1(tokenizer, preprocess, data, cfg))
    if not world.main:
        return {}
    if cfg.method == "lora":
        merge_lora(model)
    theta1 = _clone_state(model) if full else None
    set_alpha = alpha_setter(model, cfg, theta0, theta1)
    started = time.perf_counter()
    if cfg.dry_run:
        results: dict[str, Any] = {"dry_run": True}
    elif cfg.method == "linear-probe":
        results = linear_probe(model, preprocess, data, cfg)
    elif cfg.task == "retrieval":
        results = evaluate_retrieval_task(model, tokenizer, preprocess, data, cfg, set_alpha)
    else:
        results = final_evaluation(model, tokenizer, preprocess, data, cfg, set_alpha)
    metrics = {"method": cfg.method, "config": cfg.to_dict(), "training": summary, "results": results,
               "evaluation_seconds": round(time.perf_counter() - started, 2)}
    if checked is not None:
        metrics["description_check"] = checked
    if cfg.uses_adapters:
        alpha = results.get("chosen_alpha", cfg.default_alpha)
        extra = {}
        if cfg.uses_drm:
            extra["drm"] = {"beta": cfg.drm_beta, "templates": list(default_templates(cfg, data.templates)),
                            "classnames": data.classnames, "descriptions": data.descriptions}
        radapter.save_adapters(model, out / "adapter.safetensors",
                               default_alpha=alpha if alpha is not None else 0.5,
                               training={"method": cfg.method, "benchmark": cfg.benchmark, "task": cfg.task,
                                         "steps": summary.get("steps"), "seed": cfg.seed,
                                         "final_loss": summary.get("final_loss"),
                                         **({"final_loss_note": summary["final_loss_note"]}
                                            if "final_loss_note" in summary else {})}, **extra)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=float))
    sweep = results.get("all", {}).get("sweep") or results.get("base", {}).get("sweep")
    if sweep:
        plot_alpha_sweep({"benchmark": cfg.benchmark or "data", "split": "test", "points": sweep},
                         out / "sweep.png", current_alpha=results.get("chosen_alpha"),
                         title=f"{cfg.method} on {cfg.benchmark or 'your data'}: accuracy vs alpha")
    log.info("wrote %s", out)
    return metrics
