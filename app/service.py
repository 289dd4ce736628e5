"""The app's model service: one model per adapter, merged at each request's own alpha under a lock.

Every request names its alpha; the model is re-merged to that alpha (a memory-bound add
from precomputed deltas, a few milliseconds) and used while the lock is held, so two users
at different alphas never see each other's weights.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import radapter
from radapter.checkpoint import adapter_file_info
from radapter.drm import DRMHead
from radapter.segmentation import Segmentation, segment
from radapter.zero_shot import ZeroShotHead

log = logging.getLogger(__name__)

NO_ADAPTER = "none (zero-shot model)"
MAX_CLASSES = 100
MAX_CLASS_NAME = 80
DEFAULT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an emoji of a {}.", "a product photo of a {}.")


class InputError(ValueError):
    """Bad user input, shown in the UI as a message."""


@dataclass
class AdapterEntry:
    name: str
    path: Path
    info: dict[str, Any]
    sweep: dict[str, Any] | None = None  # the alpha sweep shipped next to the adapter, if any

    @property
    def default_alpha(self) -> float:
        return float(self.info.get("default_alpha", 0.5))

    @property
    def drm(self) -> dict[str, Any] | None:
        raw = self.info.get("drm")
        return json.loads(raw) if isinstance(raw, str) else raw


def discover_adapters(folder: str | Path | None) -> dict[str, AdapterEntry]:
    """Adapter files in the server's folder (never a path from the browser)."""
    entries: dict[str, AdapterEntry] = {}
    if folder is None or not Path(folder).is_dir():
        return entries
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            info = adapter_file_info(path)
        except radapter.RAdapterError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        sweep_path = path.with_suffix(".sweep.json")
        sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
        entries[path.stem] = AdapterEntry(path.stem, path, info, sweep)
    return entries


def parse_classnames(text: str | Sequence[str]) -> list[str]:
    """Comma-separated class names, cleaned; one-line errors for empty, duplicate or too many."""
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise InputError("Type at least one class name (comma separated).")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{len(names)} classes is too many: at most {MAX_CLASSES}.")
    if any(len(n) > MAX_CLASS_NAME for n in names):
        raise InputError(f"Class names are limited to {MAX_CLASS_NAME} characters.")
    return list(dict.fromkeys(names))


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be between 0 and 1, got {alpha}")
    return round(alpha, 4)


def as_rgb_array(image: Any, max_side: int = 1024) -> np.ndarray:
    """An (H, W, 3) uint8 array from what Gradio hands over, downscaled if huge."""
    if image is None:
        raise InputError("Upload an image first (or pick an example).")
    if isinstance(image, np.ndarray):
        img = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise InputError("That file is not an image.")
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return np.asarray(img)


@dataclass
class _Slot:
    """One model copy (base or base + one adapter) and the lock that guards its alpha."""

    model: nn.Module
    entry: AdapterEntry | None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelService:
    """Holds the base model, the configured adapters, and answers requests at any alpha."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, adapters: dict[str, AdapterEntry],
                 model_name: str = "default", head_cache_size: int = 64) -> None:
        self.preprocess, self.tokenizer, self.model_name = preprocess, tokenizer, model_name
        self.adapters = adapters
        self._base = model.eval()
        self._slots: dict[str, _Slot] = {NO_ADAPTER: _Slot(self._base, None)}
        self._slots_lock = threading.Lock()
        self._heads: OrderedDict[tuple, ZeroShotHead] = OrderedDict()
        self._heads_lock = threading.Lock()
        self._head_cache_size = head_cache_size

    @classmethod
    def from_config(cls, model: str | None = None, pretrained: str | None = None,
                    adapter_dir: str | Path | None = "adapters") -> ModelService:
        loaded = radapter.load_model(model, pretrained=pretrained) if model else radapter.load_model()
        return cls(*loaded, adapters=discover_adapters(adapter_dir), model_name=model or "default")

    @property
    def base_model(self) -> nn.Module:
        return self._base

    def base_fingerprint(self, adapter: str) -> str:
        """The base-model fingerprint an adapter's model carries (its adapters are added on that base)."""
        return radapter.inject.require_state(self._slot(adapter).model).base_fingerprint

    def adapter_names(self) -> list[str]:
        return [*self.adapters, NO_ADAPTER]

    def _slot(self, adapter: str | None) -> _Slot:
        name = adapter or NO_ADAPTER
        if name not in self._slots:
            if name not in self.adapters:
                raise InputError(f"Unknown adapter {name!r}; choose one of {self.adapter_names()}.")
            with self._slots_lock:
                if name not in self._slots:
                    model = copy.deepcopy(self._base)
                    radapter.load_adapters(model, self.adapters[name].path)
                    radapter.merge_adapters(model, self.adapters[name].default_alpha)
                    self._slots[name] = _Slot(model, self.adapters[name])
        return self._slots[name]

    @contextmanager
    def at_alpha(self, adapter: str | None, alpha: float) -> Iterator[nn.Module]:
        """The model of ``adapter`` merged at ``alpha``, exclusively for the duration of the block."""
        slot = self._slot(adapter)
        with slot.lock:
            if slot.entry is not None:
                radapter.merge_adapters(slot.model, alpha)
            yield slot.model

    def _head(self, model: nn.Module, key: tuple, classnames: list[str], templates: Sequence[str],
              drm: dict | None, beta: float):
        with self._heads_lock:
            if key in self._heads:
                self._heads.move_to_end(key)
                return self._heads[key]
        if drm and all(c in drm.get("classnames", []) for c in classnames):
            desc = dict(zip(drm["classnames"], drm["descriptions"], strict=True))
            head = DRMHead(model, self.tokenizer, classnames, [desc[c] for c in classnames],
                           default_template=drm.get("default_template", "a photo of a {}."), beta=beta)
        else:
            head = radapter.zero_shot_classifier(model, self.tokenizer, classnames, templates)
        with self._heads_lock:
            self._heads[key] = head
            while len(self._heads) > self._head_cache_size:
                self._heads.popitem(last=False)
        return head

    @torch.no_grad()  # not inference_mode: adapter tensors made under it could not be tracked by the merge cache
    def probabilities(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float, *,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, beta: float = 0.5) -> dict[str, float]:
        """Class probabilities of ``image`` from ``adapter`` merged at ``alpha``."""
        x = self.preprocess(Image.fromarray(image)).unsqueeze(0)
        entry = self.adapters.get(adapter) if adapter else None
        drm = entry.drm if entry else None
        with self.at_alpha(adapter, alpha) as model:
            key = (adapter or NO_ADAPTER, alpha if entry else None, tuple(classnames), tuple(templates),
                   beta if drm else None)
            head = self._head(model, key, classnames, templates, drm, beta)
            feats = model.encode_image(x.to(next(model.parameters()).device))
            probs = torch.softmax(head(feats).float(), dim=1)[0].cpu()
        return {c: float(p) for c, p in zip(classnames, probs, strict=True)}

    def compare(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float,
                **kw: Any) -> dict[str, dict[str, float]]:
        """Zero-shot (alpha 0), fine-tuned (alpha 1) and merged-at-alpha predictions side by side."""
        if not adapter or adapter == NO_ADAPTER:
            zs = self.probabilities(image, classnames, None, 0.0, **kw)
            return {"zero-shot": zs, "fine-tuned": zs, "merged": zs}
        return {"zero-shot": self.probabilities(image, classnames, adapter, 0.0, **kw),
                "fine-tuned": self.probabilities(image, classnames, adapter, 1.0, **kw),
                "merged": self.probabilities(image, classnames, adapter, alpha, **kw)}

    def segment(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float,
                **kw: Any) -> Segmentation:
        with self.at_alpha(adapter, alpha) as model:
            return segment(model, self.tokenizer, image, classnames, **kw)
