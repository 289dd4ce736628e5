import pytest
import torch
from torch import nn

import radapter
from radapter.adapters.placement import resolve_sites
from tests.conftest import randomize_adapters


def test_sites_after_attention_and_ffn_in_both_towers(tiny):
    model, _, _ = tiny
    plans = resolve_sites(model, radapter.RAdapterConfig())
    paths = [p.path for p in plans]
    assert paths == [
        "visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.0.mlp.c_proj",
        "visual.transformer.resblocks.1.attn", "visual.transformer.resblocks.1.mlp.c_proj",
        "transformer.resblocks.0.attn", "transformer.resblocks.0.mlp.c_proj",
        "transformer.resblocks.1.attn", "transformer.resblocks.1.mlp.c_proj",
    ]
    assert [p.kind for p in plans[:2]] == ["mha", "linear"]
    assert {p.tower for p in plans[:4]} == {"image"} and {p.tower for p in plans[4:]} == {"text"}


def test_attention_adapter_fires_despite_out_proj_trap(tiny):
    """nn.MultiheadAttention never calls out_proj; the adapter must still change the output."""
    model, _, _ = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(towers=("image",)))
    x = torch.randn(2, 3, 32, 32)
    before = model.encode_image(x)
    adapter = model.visual.transformer.resblocks[0].attn.radapter["default"]
    with torch.no_grad():
        adapter.ema_weight.normal_(0, 0.1)
    assert not torch.allclose(model.encode_image(x), before)


def test_tower_selection(tiny):
    model, _, _ = tiny
    plans = resolve_sites(model, radapter.RAdapterConfig(towers=("text",)))
    assert plans and all(p.path.startswith("transformer.") for p in plans)


def test_only_adapter_parameters_train(tiny):
    model, _, _ = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".radapter." in n for n in trainable)
    assert not model.logit_scale.requires_grad
    s = radapter.trainable_summary(model)
    assert s.adapters == 8 and s.trainable == 8 * (64 * 64 + 1)
    assert s.base == sum(p.numel() for n, p in model.named_parameters() if ".radapter." not in n)
    frozen_scale = radapter.add_adapters(radapter.load_model(radapter.TINY_MODEL)[0],
                                         radapter.RAdapterConfig(learn_scale=False))
    assert radapter.trainable_summary(frozen_scale).trainable == 8 * 64 * 64


@pytest.mark.slow
def test_vit_b32_trainable_count_matches_paper():
    """2 d^2 per block in both towers: ~20.5M for ViT-B (the paper's ViT-B/16 figure)."""
    model, _, _ = radapter.load_model("ViT-B-32")
    radapter.add_adapters(model, radapter.RAdapterConfig(learn_scale=False))
    s = radapter.trainable_summary(model)
    assert s.trainable == 12 * 2 * 768**2 + 12 * 2 * 512**2
    assert 0.12 < s.share < 0.15


def test_errors_for_unknown_or_unmatched_placement(tiny):
    model, _, _ = tiny
    with pytest.raises(radapter.PlacementError, match="unknown placement"):
        radapter.add_adapters(model, radapter.RAdapterConfig(placement="nope"))
    with pytest.raises(radapter.PlacementError, match="no adapter sites"):
        radapter.add_adapters(nn.Sequential(nn.Linear(2, 2)), radapter.RAdapterConfig())
    with pytest.raises(radapter.RAdapterError, match="already has an adapter set"):
        radapter.add_adapters(radapter.add_adapters(model), radapter.RAdapterConfig())


class ToyCNN(nn.Module):
    """A CNN 'image tower' with 1x1 projections and a linear 'text tower'."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                                                    nn.Conv2d(8, 8, 1)) for _ in range(2)])
        self.text = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def test_new_towers_are_added_by_describing_them():
    radapter.register_placement({
        "name": "toy_cnn",
        "sites": [
            {"tower": "image", "kind": "conv1x1", "pattern": r"blocks\.\d+\.2"},
            {"tower": "text", "kind": "linear", "pattern": r"text\.2"},
        ],
    })
    torch.manual_seed(0)
    model = ToyCNN().eval()
    x = torch.randn(2, 3, 6, 6)
    base = model(x)
    radapter.add_adapters(model, radapter.RAdapterConfig(placement="toy_cnn"))
    assert [p for p, _, _ in radapter.iter_adapters(model)] == ["blocks.0.2", "blocks.1.2", "text.2"]
    randomize_adapters(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base)
    radapter.merge_adapters(model, 1.0)
    assert torch.allclose(model(x), unmerged, rtol=1e-5, atol=1e-6)
    radapter.merge_adapters(model, 0.0)
    assert (model(x) - base).abs().max() <= 1e-6


def test_site_kind_is_checked():
    radapter.register_placement({"name": "bad_kind", "sites": [{"tower": "image", "kind": "mha", "pattern": "0"}]})
    with pytest.raises(radapter.PlacementError, match=r"not nn\.MultiheadAttention"):
        radapter.add_adapters(nn.Sequential(nn.Linear(2, 2)), radapter.RAdapterConfig(placement="bad_kind",
                                                                                     towers=("image",)))
