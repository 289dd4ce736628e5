"""The LiT-style alignment of the offline model: clip-art captions, the trained head, the lit file."""

from pathlib import Path

import pytest
import torch

import radapter
from radapter.models.offline import align, build, clipart
from radapter.models.registry import BRIDGE_MODEL, DEFAULT_MODEL

LEMMAS = frozenset({"emperor", "penguin", "bored", "dog", "flag", "map", "sweden", "park"})


def test_title_words_keep_english_words_in_order_once():
    assert clipart.title_words("emperor_penguin_ralf_ste_01", LEMMAS) == ["emperor", "penguin"]
    assert clipart.title_words("boredDog_dog_01", LEMMAS) == ["bored", "dog"]
    assert clipart.title_words("architetto_franc_01", LEMMAS) == []


def test_caption_joins_title_and_folders_most_specific_first():
    root = Path("/clip")
    assert clipart.caption(root / "animals/birds/emperor_penguin_ralf_01.png", root, LEMMAS) == \
        "emperor penguin, birds, animals"
    assert clipart.caption(root / "signs_and_symbols/flags/cigno_01.png", root, LEMMAS) == \
        "flags, signs and symbols"
    # A title ending in the folder's word does not repeat it.
    assert clipart.caption(root / "animals/dog/bored_dog.png", root, LEMMAS) == "bored dog, animals"


def test_missing_packages_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="openclipart-png"):
        clipart.clipart_pairs(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        clipart.wordnet_lemmas.__wrapped__(tmp_path)


def _toy_features(n: int = 64, width: int = build.TEXT_WIDTH) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(8, width, generator=g)
    cid = torch.arange(n) % 8
    # Images carry their caption's direction: a learnable pairing.
    image = torch.nn.functional.normalize(torch.randn(8, build.EMBED_DIM, generator=g)[cid]
                                          + 0.1 * torch.randn(n, build.EMBED_DIM, generator=g), dim=-1)
    return {"image": image, "caption_id": cid, "text": text, "captions": [str(int(c)) for c in cid]}


def _head(rows: int = 16) -> build.BridgeTextHead:
    torch.manual_seed(0)
    head = build.BridgeTextHead(rows=rows)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    return head


def _pair_accuracy(head, feats) -> float:
    rows = torch.nn.functional.normalize(head(feats["text"]), dim=-1)
    return float(((feats["image"] @ rows.t()).argmax(1) == feats["caption_id"]).float().mean())


def test_training_aligns_pairs_and_the_anchor_holds_imagenet_rows():
    base, feats = _head(), _toy_features()
    anchor_t = base.keys.detach().clone()
    cfg = align.AlignConfig(steps=60, batch_size=32, lr=1e-2, anchor=0.0)
    free = align.train_head(base, feats, anchor_t, cfg)
    held = align.train_head(base, feats, anchor_t, align.AlignConfig(**{**cfg.__dict__, "anchor": 100.0}))
    assert _pair_accuracy(free, feats) > _pair_accuracy(base, feats) + 0.3
    with torch.no_grad():
        drift = {name: float((h(anchor_t) - base(anchor_t)).norm() / base(anchor_t).norm())
                 for name, h in (("free", free), ("held", held))}
    assert drift["held"] < drift["free"] / 3
    # Training leaves the base head untouched and returns an eval-mode copy.
    assert base.training and not free.training and not any(p.requires_grad for p in free.parameters())


def test_default_is_the_aligned_model_and_the_bridge_stays_loadable():
    lit, _, _ = radapter.load_model()
    bridge, _, _ = radapter.load_model(BRIDGE_MODEL)
    assert lit.radapter_model_info.name == DEFAULT_MODEL == build.LIT_NAME
    assert bridge.radapter_model_info.name == BRIDGE_MODEL
    info = lit.radapter_bridge_info
    assert "openclipart-png" in info["alignment"]["data"]  # provenance travels with the file
    assert not torch.equal(lit.text.proj.ridge.weight, bridge.text.proj.ridge.weight)
    # Same towers: only the text head differs.
    assert torch.equal(lit.visual.trunk.conv_stem.weight, bridge.visual.trunk.conv_stem.weight)
    assert radapter.compute_fingerprint(lit) != radapter.compute_fingerprint(bridge)
