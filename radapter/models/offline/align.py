"""LiT-style alignment of the offline model's text head on clip art; writes ``weights/lit.safetensors``.

    python -m radapter.models.offline.align          # ~4 min on 2 CPU cores (image features cached)

Locked-image tuning (LiT): the image tower is frozen, the text side learns to point at it.
Here the text tower (MiniLM) stays frozen too and only the bridge head is trained: its ridge
map (384 -> 1281 + bias) and the kernel keys. Both towers are frozen, so their outputs are
computed once and training is a few seconds of linear algebra.

Loss = symmetric multi-positive InfoNCE between clip-art images and their captions
(:mod:`radapter.models.offline.clipart`; images sharing a caption are positives)
+ ``anchor`` x the mean squared relative change of the 1000 ImageNet class-name rows
(the bridge's own inputs) from the rows of the ImageNet bridge: the new head must still
predict EfficientNet's classifier for ImageNet's names, which is what keeps the bridge's
zero-shot skill on natural categories.

Sources: Debian ``openclipart-png`` (clip art, titles and folders), ``wordnet-base`` (to keep
the English words of titles), the ImageNet bridge file. Nothing from the benchmarks' test sets.
Settings are chosen with ``--select`` on validation data only: Fashion-MNIST's val split and
the emoji train+val split (category accuracy, name R@1 among the train+val names).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...adapters.merge import interpolate_weights
from ...data.benchmark_spec import get_spec
from ...data.cache import data_dir
from ...data.sets import ImageDataset, open_image
from ...evaluation.harness import embed_images
from .build import BRIDGE_FILE, BRIDGE_NAME, LIT_FILE, BridgeTextHead, build_offline_model, file_sha256, minilm_path
from .clipart import clipart_pairs
from .fit_bridge import write_bridge

CACHE = Path.home() / ".cache" / "radapter" / "align"


@dataclass(frozen=True)
class AlignConfig:
    """Hyper-parameters of the alignment (defaults picked with ``--select`` on validation data).

    ``mix`` interpolates the head's weights between the bridge (0) and the aligned head (1),
    WiSE-FT style: alignment on clip art alone trades ImageNet-style skill for icon skill.
    """

    steps: int = 300
    batch_size: int = 256
    anchor_batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 0.03
    anchor: float = 1.0
    train_keys: bool = True
    mix: float = 0.75
    seed: int = 0


def _render(path: Path) -> Image.Image:
    img = open_image(path)
    img.thumbnail((256, 256))  # big drawings: shrink before the model's own resize
    return img


class _ClipartImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(_render(self.paths[i])), i


@torch.inference_mode()
def pooled_text(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """MiniLM sentence embeddings before the bridge head (what the head sees)."""
    head, model.text.proj = model.text.proj, torch.nn.Identity()
    try:
        out = [model.encode_text(tokenizer(texts[i:i + batch_size])).float() for i in range(0, len(texts), batch_size)]
    finally:
        model.text.proj = head
    return torch.cat(out)


def clipart_features(model, preprocess, tokenizer) -> dict[str, torch.Tensor | list[str]]:
    """Image embeddings and caption sentence embeddings of the clip art, cached on disk."""
    pairs = clipart_pairs()
    key = f"{file_sha256(BRIDGE_FILE)[:12]}-{file_sha256(minilm_path() / 'model.safetensors')[:12]}-{len(pairs)}"
    path = CACHE / f"clipart-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    captions = [c for _, c in pairs]
    image = embed_images(model, _ClipartImages([p for p, _ in pairs], preprocess), desc="clip art")
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    feats = {"image": image, "captions": captions, "unique": unique,
             "caption_id": torch.tensor([index[c] for c in captions]),
             "text": pooled_text(model, tokenizer, unique)}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


# Not radapter.mpm_nce_loss: that one pairs row i with row i (B x B, repeated captions repeat
# columns); here each distinct caption is one column (B images x U captions).
def _loss(head: BridgeTextHead, img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    rows = F.normalize(head(txt), dim=-1)
    logits = img @ rows.t() / tau
    target = pos.float() / pos.sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos.t().float() / pos.sum(0)[:, None] * logits.t().log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def train_head(base: BridgeTextHead, feats: dict, anchor_t: torch.Tensor, cfg: AlignConfig) -> BridgeTextHead:
    """The aligned copy of ``base`` (a :class:`BridgeTextHead`)."""
    head = copy.deepcopy(base).float().train()
    for p in head.parameters():
        p.requires_grad_(False)
    params = [head.ridge.weight, head.ridge.bias] + ([head.keys] if cfg.train_keys else [])
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        anchor_rows = base(anchor_t)
        anchor_norm = anchor_rows.norm(dim=-1, keepdim=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    img, cid, text = feats["image"], feats["caption_id"], feats["text"]
    for _ in range(cfg.steps):
        idx = torch.randperm(len(img), generator=gen)[:cfg.batch_size]
        ids, inverse = cid[idx].unique(return_inverse=True)
        pos = inverse[:, None] == torch.arange(len(ids))[None]
        loss = _loss(head, img[idx], text[ids], pos, cfg.temperature)
        a = torch.randperm(len(anchor_t), generator=gen)[:cfg.anchor_batch]
        drift = ((head(anchor_t[a]) - anchor_rows[a]) / anchor_norm[a]).pow(2).sum(-1).mean()
        opt.zero_grad()
        (loss + cfg.anchor * drift).backward()
        opt.step()
        sched.step()
    return head.eval().requires_grad_(False)


def mix_heads(base: BridgeTextHead, aligned: BridgeTextHead, mix: float) -> BridgeTextHead:
    """``(1 - mix) * base + mix * aligned`` over the head's weights (WiSE-FT's interpolation)."""
    head = copy.deepcopy(base)
    head.load_state_dict(interpolate_weights(base.state_dict(), aligned.state_dict(), mix))
    return head.eval().requires_grad_(False)


def align_head(base: BridgeTextHead, feats: dict, cfg: AlignConfig) -> BridgeTextHead:
    """Train on clip art, anchored on the ImageNet names, and mix with the bridge by ``cfg.mix``."""
    return mix_heads(base, train_head(base, feats, base.keys.detach().clone(), cfg), cfg.mix)


#: Fashion-MNIST class-name candidates, listed before looking at any data; ``--select`` picks
#: one per class on the val split (the benchmark spec then records the pick).
FMNIST_NAME_CANDIDATES = (
    ("t-shirt", "top", "tee shirt", "jersey", "t-shirt or top"), ("trousers", "pants", "jeans", "slacks"),
    ("sweater", "pullover", "jumper", "cardigan", "sweatshirt"), ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat", "trench coat"), ("sandal", "sandals", "flip-flop", "strappy sandal"),
    ("shirt", "button-down shirt", "blouse", "dress shirt"), ("sneaker", "running shoe", "trainer", "sports shoe"),
    ("handbag", "bag", "purse", "tote bag"), ("ankle boot", "boot", "boots", "cowboy boot"),
)


@torch.no_grad()
def pick_class_names(head: BridgeTextHead, model, tokenizer, templates: tuple[str, ...], image: torch.Tensor,
                     labels: torch.Tensor, candidates=FMNIST_NAME_CANDIDATES, rounds: int = 2) -> list[str]:
    """Coordinate ascent over one name per class, maximising top-1 on (validation) images."""
    names = sorted({n for c in candidates for n in c})
    emb = pooled_text(model, tokenizer, [t.format(n) for n in names for t in templates])
    row = dict(zip(names, class_rows(head, emb, len(templates)), strict=True))

    def top1(pick: list[str]) -> float:
        return float(((image @ torch.stack([row[n] for n in pick]).t()).argmax(1) == labels).float().mean())

    pick = [c[0] for c in candidates]
    for _ in range(rounds):
        for k, options in enumerate(candidates):
            pick[k] = max(options, key=lambda n: top1([*pick[:k], n, *pick[k + 1:]]))
    return pick


def class_rows(head: BridgeTextHead, prompts: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Zero-shot class rows: unit rows of each class's prompts (class-major), averaged, renormalised."""
    rows = F.normalize(head(prompts), dim=-1)
    return F.normalize(rows.view(-1, n_templates, rows.shape[-1]).mean(1), dim=-1)


# --- selection on validation data only ------------------------------------------------------------

def validation_features(model, preprocess, tokenizer, limit: int = 1000) -> dict:
    """Features of the validation data: fmnist val, emoji (Google) train+val (images cached on disk)."""
    from ...data.benchmarks import load_benchmark

    fm_bench, em_spec = load_benchmark("fmnist"), get_spec("emoji")
    fm = fm_bench.val.subset(limit)
    meta = json.loads((data_dir() / "emoji" / "emoji_meta.json").read_text())
    keep = [i for i, m in enumerate(meta) if m["split"] in ("train", "val")]
    fm_templates = fm_bench.spec.templates
    feats = {
        "fmnist_prompts": pooled_text(model, tokenizer, [t.format(c) for c in fm.classnames for t in fm_templates]),
        "emoji_prompts": pooled_text(model, tokenizer, [t.format(c) for c in em_spec.prompt_names
                                                        for t in em_spec.templates]),
        "emoji_names": pooled_text(model, tokenizer, [em_spec.extra.get("caption_template", "{}").format(
            meta[i]["name"]) for i in keep]),
        "n_fmnist_templates": len(fm_templates), "n_emoji_templates": len(em_spec.templates),
        "fmnist_label": torch.as_tensor(fm.labels),
        "emoji_label": torch.tensor([em_spec.classnames.index(meta[i]["category"]) for i in keep]),
    }
    # The image side is frozen: its features depend on the image tower only.
    path = CACHE / f"val-images-{file_sha256(BRIDGE_FILE)[:12]}-{limit}.pt"
    if not path.is_file():
        google = np.load(data_dir() / "emoji" / "google.npz")["images"][keep]
        images = {"fmnist_image": embed_images(model, fm.dataset(preprocess), desc="fmnist val"),
                  "emoji_image": embed_images(model, ImageDataset(google, [0] * len(keep), preprocess),
                                              desc="emoji train+val")}
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(images, path)
    return {**feats, **torch.load(path, weights_only=False)}


@torch.no_grad()
def validation_scores(head: BridgeTextHead, v: dict) -> dict[str, float]:
    fm = class_rows(head, v["fmnist_prompts"], v["n_fmnist_templates"])
    em = class_rows(head, v["emoji_prompts"], v["n_emoji_templates"])
    names = F.normalize(head(v["emoji_names"]), dim=-1)
    i2t = (v["emoji_image"] @ names.t()).argmax(1) == torch.arange(len(names))
    return {"fmnist_val_top1": float(((v["fmnist_image"] @ fm.t()).argmax(1) == v["fmnist_label"]).float().mean()),
            "emoji_trainval_category_top1": float(((v["emoji_image"] @ em.t()).argmax(1) == v["emoji_label"])
                                                  .float().mean()),
            "emoji_trainval_name_r1": float(i2t.float().mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(LIT_FILE))
    parser.add_argument("--select", action="store_true", help="print validation scores for a small grid; write nothing")
    for f, default in asdict(AlignConfig()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(default) if not isinstance(default, bool)
                            else lambda s: s.lower() in ("1", "true", "yes"), default=default)
    args = parser.parse_args(argv)
    cfg = AlignConfig(**{f: getattr(args, f) for f in asdict(AlignConfig())})
    start = time.perf_counter()
    model, preprocess, tokenizer = build_offline_model(name=BRIDGE_NAME)
    base = model.text.proj
    feats = clipart_features(model, preprocess, tokenizer)
    anchor_t = base.keys.detach().clone()
    val = validation_features(model, preprocess, tokenizer)
    print("bridge", validation_scores(base, val))
    if args.select:
        aligned = train_head(base, feats, anchor_t, cfg)
        for mix in (0.25, 0.5, 0.75, 1.0):
            head = mix_heads(base, aligned, mix)
            print(json.dumps({"mix": mix, **validation_scores(head, val)}), flush=True)
        head = mix_heads(base, aligned, cfg.mix)
        pick = pick_class_names(head, model, tokenizer, tuple(get_spec("fmnist").templates), val["fmnist_image"],
                                val["fmnist_label"])
        print("fmnist names picked on val at mix", cfg.mix, pick)
        return
    head = align_head(base, feats, cfg)
    scores = validation_scores(head, val)
    print("aligned", scores)
    out = write_bridge(*lit_file_contents(head, model.radapter_bridge_info, cfg, scores, len(feats["captions"])),
                       args.out)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


def lit_file_contents(head: BridgeTextHead, bridge_meta: dict, cfg: AlignConfig, scores: dict[str, float],
                      n_pairs: int) -> tuple[dict, dict]:
    """Tensors and metadata of the aligned head: the bridge file's format, plus what was done."""
    tensors = {"ridge.weight": head.ridge.weight.detach().contiguous(), "ridge.bias": head.ridge.bias.detach(),
               "kernel.keys": head.keys.detach().contiguous()}
    meta = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in bridge_meta.items()}
    meta["alignment"] = json.dumps({
        "method": "LiT-style: both towers frozen, bridge head (ridge map + kernel keys) trained",
        "data": f"Debian openclipart-png, {n_pairs} image-caption pairs (titles filtered by Debian wordnet-base)",
        "anchor": "ImageNet class-name rows of the bridge", "base_sha256": file_sha256(BRIDGE_FILE),
        "config": asdict(cfg), "validation": scores, "command": "python -m radapter.models.offline.align",
    }, sort_keys=True)
    return tensors, meta


if __name__ == "__main__":
    main()
