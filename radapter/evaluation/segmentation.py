"""Training-free open-vocabulary segmentation from a (merged) image-text model.

Dense image-text scores per location, compared with class text embeddings:
- open_clip ViTs: patch tokens projected into the joint space, with a last-block fix
  that keeps them local: ``clearclip`` (default: query-query attention, no residual, no
  FFN in the last block), ``sclip`` (correlative attention softmax(qq^T) + softmax(kk^T)),
  ``maskclip`` (value path only), or ``plain`` (the unmodified last block);
- timm CNN towers (the offline default): class-activation maps. The last downsampling
  stage runs dilated (output stride 16 instead of 32: same weights, twice the grid), each
  location of the final feature map goes through the image head, and the scores are raw
  logits ``[f, 1] . t`` (not a per-location cosine); each class's map is then z-scored over
  the image (``prior="z"``), which removes a class's image-wide offset so that a class that
  scores high everywhere cannot take every pixel.
Coarse grids are refined with sliding windows over an upscaled image; scores are
upsampled to the image size; pixels whose best class scores below a background
threshold (or lose to "background" prompts) stay unlabelled (0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.inject import adapter_state
from ..adapters.merge import merge_adapters, unmerge_adapters
from .zero_shot import Template, encode_texts, render

VIT_METHODS = ("clearclip", "sclip", "maskclip", "plain")
SCORES = ("auto", "logits", "cosine")
PRIORS = ("auto", "none", "mean", "z")
BACKGROUND_PROMPTS = ("background", "a photo of nothing", "texture", "ground", "sky", "wall")


@dataclass
class Segmentation:
    """Per-pixel labels (0 = unlabelled, k = ``classnames[k - 1]``), per-class masks and scores."""

    labels: np.ndarray  # (H, W) int
    probs: np.ndarray  # (C, H, W) float: softmax over classes at each pixel
    classnames: list[str]

    def masks(self) -> dict[str, np.ndarray]:
        return {name: self.labels == k for k, name in enumerate(self.classnames, start=1)}

    def scores(self) -> dict[str, float]:
        """Mean probability of each class over its own mask (0 when it has no pixel)."""
        return {name: float(self.probs[k - 1][self.labels == k].mean()) if (self.labels == k).any() else 0.0
                for k, name in enumerate(self.classnames, start=1)}

    def annotations(self) -> list[tuple[np.ndarray, str]]:
        """``[(mask, label)]`` for ``gr.AnnotatedImage``, classes with at least one pixel."""
        return [(m.astype(np.float32), n) for n, m in self.masks().items() if m.any()]


def _vit_last_block(block: nn.Module, x: torch.Tensor, method: str) -> torch.Tensor:
    attn = block.attn
    y = block.ln_1(x)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    if method == "maskclip":
        out = v
    elif method == "clearclip":
        out = F.scaled_dot_product_attention(q, q, v)
    elif method == "sclip":
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = F.linear(out.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias)
    if method in ("clearclip", "maskclip"):
        return out  # no residual, no FFN: the residual stream carries the global, non-local signal
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _vit_dense(visual: nn.Module, images: torch.Tensor, method: str) -> torch.Tensor:
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = _vit_last_block(blocks[-1], x, method)
    x = visual.ln_post(x[:, 1:])  # drop the class token
    if visual.proj is not None:
        x = x @ visual.proj
    side = math.isqrt(x.shape[1])
    return x.reshape(x.shape[0], side, side, -1)


def _last_stride_convs(trunk: nn.Module) -> tuple[list[nn.Conv2d], list[nn.Conv2d]] | None:
    """The stride-2 convs of the last downsampling block and the spatial convs after it.

    Only for trunks made of ``blocks`` (timm EfficientNet / MobileNet family) whose convs
    are plain ``nn.Conv2d`` with symmetric "same" padding; ``None`` when that does not hold.
    """
    blocks = getattr(trunk, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return None
    flat = [b for stage in blocks for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    convs = [[m for m in b.modules() if isinstance(m, nn.Conv2d)] for b in flat]
    last = max((i for i, cs in enumerate(convs) if any(c.stride != (1, 1) for c in cs)), default=None)
    if last is None:
        return None
    strided = [c for c in convs[last] if c.stride != (1, 1)]
    after = [c for cs in convs[last + 1:] for c in cs if c.kernel_size != (1, 1)]
    for c in strided + after:
        k = c.kernel_size
        if type(c) is not nn.Conv2d or k[0] != k[1] or c.padding != ((k[0] - 1) // 2,) * 2 or c.dilation != (1, 1):
            return None
    if any(c.stride != (2, 2) for c in strided) or any(c.stride != (1, 1) for c in after):
        return None
    return strided, after


def can_dilate(model: nn.Module) -> bool:
    """Whether the CNN tower's last downsampling stage can run dilated (output stride halved)."""
    trunk = getattr(model.visual, "trunk", None)
    return trunk is not None and _last_stride_convs(trunk) is not None


@contextmanager
def _dilated(trunk: nn.Module) -> Iterator[None]:
    """Run the last downsampling stage at stride 1 with dilation 2 after it (atrous, as in DeepLab).

    Same weights, a feature grid twice as fine: each later conv sees the same relative
    neighbourhood as before, so the features stay close to the ones the head was fit on.
    Only the conv attributes change, and they are restored on exit; like merging, this
    mutates the model, so no other thread may run it meanwhile (the app holds its lock).
    """
    found = _last_stride_convs(trunk)
    if found is None:
        raise ValueError(f"cannot dilate a {type(trunk).__name__} trunk (needs timm EfficientNet-style blocks)")
    strided, after = found
    try:
        for c in strided:
            c.stride = (1, 1)
        for c in after:
            c.dilation = (2, 2)
            c.padding = (c.kernel_size[0] - 1, c.kernel_size[1] - 1)
        yield
    finally:
        for c in strided:
            c.stride = (2, 2)
        for c in after:
            c.dilation = (1, 1)
            c.padding = ((c.kernel_size[0] - 1) // 2, (c.kernel_size[1] - 1) // 2)


def _cnn_dense(visual: nn.Module, images: torch.Tensor, dilate: bool = False) -> torch.Tensor:
    if dilate:
        with _dilated(visual.trunk):
            fmap = visual.trunk.forward_features(images)  # (B, C, 2h, 2w)
    else:
        fmap = visual.trunk.forward_features(images)  # (B, C, h, w)
    b, c, h, w = fmap.shape
    flat = fmap.permute(0, 2, 3, 1).reshape(-1, c)
    return visual.head(flat).reshape(b, h, w, -1)


def is_cnn(model: nn.Module) -> bool:
    """Whether the image tower takes the CNN (class-activation) dense path."""
    visual = model.visual
    return not hasattr(visual, "_embeds") and hasattr(getattr(visual, "trunk", None), "forward_features")


@torch.inference_mode()
def dense_features(model: nn.Module, images: torch.Tensor, method: str = "clearclip", *,
                   normalize: bool = True, dilate: bool = False) -> torch.Tensor:
    """Per-location embeddings ``(B, h, w, d)`` in the joint space (L2-normalised unless told not).

    ``dilate`` (CNN towers only): run the last downsampling stage dilated, twice the grid.
    """
    visual = model.visual
    if hasattr(visual, "transformer") and hasattr(visual, "_embeds"):
        if method not in VIT_METHODS:
            raise ValueError(f"method must be one of {VIT_METHODS}, got {method!r}")
        feats = _vit_dense(visual, images, method)
    elif is_cnn(model):
        feats = _cnn_dense(visual, images, dilate)
    else:
        raise ValueError(f"no dense-feature path for a {type(visual).__name__} image tower")
    return F.normalize(feats.float(), dim=-1) if normalize else feats.float()


def _input_size(model: nn.Module) -> int:
    size = model.visual.preprocess_cfg.get("size", 224) if hasattr(model.visual, "preprocess_cfg") else 224
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def _normalise(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    cfg = getattr(model.visual, "preprocess_cfg", {})
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))[:, None, None]
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))[:, None, None]
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # a writable copy
    return (x - mean) / std


def _window_maps(model: nn.Module, image: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor], k: int, *,
                 scale: float, stride_frac: float, **dense_kw: Any) -> torch.Tensor:
    """``fn(dense features (B, g, g, d)) -> (B, k, g, g)`` over sliding windows, stitched to ``(k, H, W)``."""
    device = next(model.parameters()).device
    h, w = image.shape[:2]
    size = _input_size(model)
    x = _normalise(model, image)[None]
    big_h, big_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(big_h, big_w), mode="bilinear", align_corners=False)
    stride = max(1, int(size * stride_frac))
    rows = sorted({*range(0, big_h - size + 1, stride), big_h - size})
    cols = sorted({*range(0, big_w - size + 1, stride), big_w - size})
    total = torch.zeros(k, big_h, big_w)
    count = torch.zeros(1, big_h, big_w)
    crops = [(r, c) for r in rows for c in cols]
    for i in range(0, len(crops), 8):
        batch = torch.cat([x[:, :, r:r + size, c:c + size] for r, c in crops[i:i + 8]]).to(device)
        maps = fn(dense_features(model, batch, **dense_kw))  # (B, k, g, g)
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).cpu()
        for (r, c), m in zip(crops[i:i + 8], maps, strict=True):
            total[:, r:r + size, c:c + size] += m
            count[:, r:r + size, c:c + size] += 1
    maps = total / count
    return F.interpolate(maps[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _resolve(model: nn.Module, scores: str, dilate: bool | None) -> tuple[bool, bool]:
    """``(normalize, dilate)`` for the dense features: CNN towers default to raw logits, dilated."""
    if scores not in SCORES:
        raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")
    cnn = is_cnn(model)
    normalize = scores == "cosine" or (scores == "auto" and not cnn)
    if dilate is None:
        dilate = cnn and can_dilate(model)
    elif dilate and not (cnn and can_dilate(model)):
        raise ValueError("dilate=True needs a CNN image tower with timm EfficientNet-style blocks")
    return normalize, dilate


def score_maps(model: nn.Module, image: np.ndarray, text: torch.Tensor, *, method: str = "clearclip",
               scale: float = 2.0, stride_frac: float = 0.5, scores: str = "auto",
               dilate: bool | None = None) -> torch.Tensor:
    """Scores ``(K, H, W)`` of every text embedding at every pixel of ``image`` (H, W, 3 uint8).

    The image is upscaled by ``scale`` and covered by overlapping windows of the model's
    input size; window scores are upsampled and averaged where windows overlap.
    ``scores="cosine"``: per-location cosine; ``"logits"``: the un-normalised dense feature
    dotted with the unit text embedding (for the offline CNN: the class-activation logit
    ``w . f + b`` divided by the text row's norm); ``"auto"``: logits for CNN towers,
    cosine for ViTs. ``dilate`` (default: where possible): see :func:`dense_features`.
    """
    normalize, dilate = _resolve(model, scores, dilate)
    text = F.normalize(text.float(), dim=-1).to(next(model.parameters()).device)

    def fn(feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhwd,kd->bkhw", feats, text)

    return _window_maps(model, image, fn, text.shape[0], scale=scale, stride_frac=stride_frac,
                        method=method, normalize=normalize, dilate=dilate)


def remove_prior(maps: torch.Tensor, prior: str) -> torch.Tensor:
    """Per-class prior removal over the image: ``"mean"`` subtracts each class's image mean,
    ``"z"`` also divides by its standard deviation, ``"none"`` leaves the maps as they are.

    Why: a class whose text row matches the image's overall style scores high at every pixel
    and wins every argmax; what locates an object is where its class scores *above its own
    level* in this image.
    """
    if prior == "none":
        return maps
    centred = maps - maps.mean((1, 2), keepdim=True)
    if prior == "mean":
        return centred
    if prior == "z":
        return centred / centred.std((1, 2), keepdim=True).clamp_min(1e-12)
    raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")


def _with_merged(model: nn.Module, fn: Callable[[], Any]) -> Any:
    """Dense paths bypass the adapter hooks, so unmerged adapters are folded in (alpha 1) meanwhile."""
    state = adapter_state(model)
    if state is None or state.merged:
        return fn()
    merge_adapters(model, 1.0)
    try:
        return fn()
    finally:
        unmerge_adapters(model)


def segment(
    model: nn.Module, tokenizer: Callable, image: np.ndarray, classnames: Sequence[str], *,
    templates: Sequence[Template] = ("a photo of a {}.", "an emoji of a {}.", "a drawing of a {}."),
    method: str = "clearclip", background: str = "threshold", threshold: float | None = None,
    temperature: float | None = None, scale: float = 2.0, scores: str = "auto", prior: str = "auto",
    dilate: bool | None = None,
) -> Segmentation:
    """Label every pixel of ``image`` (H, W, 3 uint8) with one of ``classnames`` or 0 (unlabelled).

    ``prior`` (:func:`remove_prior`; ``"auto"``: ``"z"`` for CNN towers, ``"none"`` for ViTs)
    is applied to each class's map before the per-pixel argmax.
    ``background="threshold"``: with ``prior="z"``, a pixel is unlabelled when its best
    class's z-score is below ``threshold`` (default 1.0: one standard deviation above that
    class's image mean); otherwise when its best class probability is below ``threshold``
    (default ``1.5 / C``: clearly above uniform) or its best score is below the image's median
    best score. ``"prompts"``: generic background prompts compete as extra classes.
    Probabilities are a softmax over classes of ``temperature`` x the (prior-adjusted) scores
    (default 50 for cosines, 1 for z-scores, 5 otherwise: a sharpness, not a calibration).
    """
    names = [str(c).strip() for c in classnames]
    if not names or any(not n for n in names):
        raise ValueError("segment needs a non-empty list of non-empty class names")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    prompts = [[render(t, n) for t in templates] for n in names]
    if background == "prompts":
        prompts += [[p] for p in BACKGROUND_PROMPTS]
    elif background != "threshold":
        raise ValueError("background must be 'threshold' or 'prompts'")
    if prior == "auto":
        prior = "z" if is_cnn(model) else "none"
    normalize, _ = _resolve(model, scores, dilate)
    if temperature is None:
        temperature = 50.0 if normalize and prior == "none" else 1.0 if prior == "z" else 5.0

    def run() -> Segmentation:
        flat = [p for group in prompts for p in group]
        emb = encode_texts(model, tokenizer, flat)
        text, start = [], 0
        for group in prompts:
            text.append(F.normalize(emb[start:start + len(group)].mean(0), dim=-1))
            start += len(group)
        maps = score_maps(model, image, torch.stack(text), method=method, scale=scale, scores=scores, dilate=dilate)
        maps = remove_prior(maps, prior)
        probs = torch.softmax(temperature * maps, dim=0)
        best_p, best = probs.max(0)
        labels = best + 1
        if background == "prompts":
            labels[best >= len(names)] = 0
        elif prior == "z":
            labels[maps.max(0).values < (threshold if threshold is not None else 1.0)] = 0
        else:
            cut = threshold if threshold is not None else 1.5 / len(names)
            best_score = maps.max(0).values
            labels[(best_p < cut) | (best_score < best_score.median())] = 0
        return Segmentation(labels.numpy().astype(np.int64), probs[:len(names)].numpy(), names)

    return _with_merged(model, run)


def saliency_mask(model: nn.Module, image: np.ndarray, *, method: str = "clearclip", scale: float = 2.0,
                  threshold: float | None = 1.0, dilate: bool | None = None) -> np.ndarray:
    """Text-agnostic baseline: the norm of the un-normalised dense features, thresholded.

    The same windows, scale and (CNN) dilation as :func:`segment`, so it sees the same
    resolution. ``threshold``: keep pixels whose norm is at least that many standard
    deviations above the image mean (default 1.0, its best setting on the validation
    composites); ``None``: above the image median.
    """
    _, dilate = _resolve(model, "auto", dilate)

    def run() -> np.ndarray:
        norm = _window_maps(model, image, lambda f: f.norm(dim=-1)[:, None], 1, scale=scale, stride_frac=0.5,
                            method=method, normalize=False, dilate=dilate)[0]
        if threshold is None:
            return (norm > norm.median()).numpy()
        return (norm >= norm.mean() + threshold * norm.std()).numpy()

    return _with_merged(model, run)


def own_object_hits(labels: np.ndarray, target: np.ndarray) -> list[bool]:
    """For a two-object image: does each class's mask land mostly on its own object (not the other)?"""
    hits = []
    for k, other in ((1, 2), (2, 1)):
        pred = labels == k
        hits.append(int(np.sum(pred & (target == k))) > int(np.sum(pred & (target == other))))
    return hits


def evaluate_segmentation(model: nn.Module, tokenizer: Callable, sset, *, method: str = "clearclip",
                          limit: int | None = None, start: int = 0, progress: bool = True,
                          **segment_kw: Any) -> dict[str, float]:
    """mIoU of the open-vocabulary masks, the text-agnostic saliency baseline, and the own-object rate.

    Each image is segmented with its own object names as the vocabulary. The baseline gives
    every class the same salient mask, so it scores what salience alone explains; the
    own-object rate (two-object images) shows whether the text picks the right object.
    Images ``start`` to ``start + limit`` are used (a validation slice: ``start`` past the
    reported ones).
    """
    from tqdm.auto import tqdm

    from .metrics import IoUAccumulator

    ours, baseline = IoUAccumulator(), IoUAccumulator()
    own: list[bool] = []
    stop = len(sset) if limit is None else min(start + limit, len(sset))
    n = max(0, stop - start)
    for i in tqdm(range(start, stop), desc=f"segmenting {sset.name}", disable=not progress):
        names, target, image = sset.object_names[i], sset.masks[i], sset.images[i]
        seg = segment(model, tokenizer, image, names, method=method, **segment_kw)
        ours.add(seg.labels, target, names)
        salient = saliency_mask(model, image, method=method, scale=segment_kw.get("scale", 2.0),
                                dilate=segment_kw.get("dilate"))
        for k, name in enumerate(names, start=1):
            baseline.add_binary(name, salient, target == k)
        if len(names) == 2:
            own += own_object_hits(seg.labels, target)
    return {"miou": ours.miou(), "miou_saliency_baseline": baseline.miou(),
            "own_object_rate": float(np.mean(own)) if own else float("nan"), "images": n, "method": method}


def overlay(image: np.ndarray, seg: Segmentation, opacity: float = 0.5) -> np.ndarray:
    """The image with each class's mask tinted in its own colour (for a PNG or the app)."""
    palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], np.float32)
    out = image.astype(np.float32).copy()
    for k in range(1, len(seg.classnames) + 1):
        mask = seg.labels == k
        out[mask] = (1 - opacity) * out[mask] + opacity * palette[(k - 1) % len(palette)]
    return out.round().astype(np.uint8)
