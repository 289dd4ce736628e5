"""The conv_bn site kind: an adapter on a BatchNorm's output, folded exactly into the conv before it."""

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import radapter
from radapter.adapters.placement import resolve_sites
from tests.conftest import randomize_adapters


class Block(nn.Module):
    """MBConv-like: depthwise conv, 1x1 projection conv + BN (the site), residual add."""

    def __init__(self, channels: int, bias: bool, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(channels, channels, 1, bias=bias)
        self.bn = bn or nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn(self.proj(self.act(self.dw(x))))


class ToyConvBN(nn.Module):
    def __init__(self, bias: bool = False, bn: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, bias), Block(8, bias, bn))
        with torch.no_grad():  # trained-looking BN: statistics and affine terms far from identity
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.2, 3.0)
                    m.weight.normal_(0, 1.0)
                    m.bias.normal_(0, 0.5)
        self.eval()

    @torch.no_grad()
    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


radapter.register_placement({
    "name": "toy_conv_bn",
    "sites": [{"tower": "image", "kind": "conv_bn", "pattern": r"blocks\.\d+\.bn", "fold_into": "proj"}],
})
CONFIG = radapter.RAdapterConfig(placement="toy_conv_bn", towers=("image",))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bias", [False, True], ids=["conv-no-bias", "conv-bias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_bn_merge_is_exact(bias, channels_last):
    model = ToyConvBN(bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(2, 3, 6, 6).to(memory_format=fmt)
    base = model(x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.add_adapters(model, CONFIG)
    assert [p for p, _, _ in radapter.iter_adapters(model)] == ["blocks.0.bn", "blocks.1.bn"]
    randomize_adapters(model, std=0.2)
    unmerged = model(x)
    assert _rel(unmerged, base) > 1e-2
    radapter.merge_adapters(model, 1.0)
    assert _rel(model(x), unmerged) <= 1e-5
    assert all(not m._forward_hooks for m in model.modules())
    radapter.merge_adapters(model, 0.0)  # alpha = 0 gives back the original tensors, bit for bit
    assert all(torch.equal(v, base_state[k]) for k, v in radapter.adapters.fingerprint.base_state_dict(model).items())
    assert torch.equal(model(x), base)
    radapter.merge_adapters(model, 0.6)
    radapter.unmerge_adapters(model)
    assert all(torch.equal(v, base_state[k]) for k, v in radapter.adapters.fingerprint.base_state_dict(model).items())
    assert torch.equal(model(x), unmerged)


def test_conv_bn_link_follows_deepcopy():
    """The BN -> conv link is not a registered child; a copied model must fold into its own conv."""
    model = radapter.add_adapters(ToyConvBN(), CONFIG)
    randomize_adapters(model)
    x = torch.randn(2, 3, 6, 6)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    unmerged = twin(x)
    radapter.merge_adapters(twin, 1.0)
    assert _rel(twin(x), unmerged) <= 1e-5
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert sorted(model.state_dict()) == sorted(twin.state_dict())  # the link adds no state


def test_conv_bn_touches_only_conv_weight_and_bn_bias():
    model = radapter.add_adapters(ToyConvBN(), CONFIG)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.merge_adapters(model, 1.0)
    after = radapter.adapters.fingerprint.base_state_dict(model)
    changed = sorted(k for k, v in after.items() if not torch.equal(v, before[k]))
    assert changed == ["blocks.0.bn.bias", "blocks.0.proj.weight", "blocks.1.bn.bias", "blocks.1.proj.weight"]


def test_conv_bn_rules_are_checked():
    radapter.register_placement({"name": "toy_conv_bn_no_target",
                                 "sites": [{"tower": "image", "kind": "conv_bn", "pattern": r"blocks\.\d+\.bn"}]})
    radapter.register_placement({"name": "toy_conv_bn_missing", "sites": [
        {"tower": "image", "kind": "conv_bn", "pattern": r"blocks\.\d+\.bn", "fold_into": "nope"}]})
    radapter.register_placement({"name": "toy_conv_bn_depthwise", "sites": [
        {"tower": "image", "kind": "conv_bn", "pattern": r"blocks\.\d+\.bn", "fold_into": "dw"}]})
    radapter.register_placement({"name": "toy_linear_fold", "sites": [
        {"tower": "image", "kind": "conv1x1", "pattern": r"blocks\.\d+\.proj", "fold_into": "bn"}]})
    cases = {"toy_conv_bn_no_target": "needs 'fold_into'", "toy_conv_bn_missing": "names no sibling",
             "toy_conv_bn_depthwise": "ungrouped", "toy_linear_fold": "folds into itself"}
    for name, message in cases.items():
        with pytest.raises(radapter.PlacementError, match=message):
            resolve_sites(ToyConvBN(), radapter.RAdapterConfig(placement=name, towers=("image",)))


def test_conv_bn_refuses_an_activation_after_the_norm():
    model = ToyConvBN(bn=BatchNormAct2d(8, act_layer=nn.ReLU))
    with pytest.raises(radapter.PlacementError, match="applies ReLU"):
        radapter.add_adapters(model, CONFIG)
    fine = ToyConvBN(bn=BatchNormAct2d(8, apply_act=False))
    assert len(resolve_sites(fine, CONFIG)) == 2


def test_conv_bn_zero_scale_channel_cannot_merge():
    model = radapter.add_adapters(ToyConvBN(), CONFIG)
    randomize_adapters(model)
    with torch.no_grad():
        model.blocks[1].bn.weight[3] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(radapter.RAdapterError, match="zero scale"):
        radapter.merge_adapters(model, 0.5)
    assert radapter.merged_alpha(model) is None  # planned before writing: nothing was touched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
