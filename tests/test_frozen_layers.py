import copy
import io
import pickle

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import radapter
from radapter.adapters.frozen_layers import lean_frozen_layers


class ConvNet(nn.Module):
    """Conv -> BN+ReLU6 (timm) -> depthwise conv -> BN -> batch-first self-attention over pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.dw(self.bn1(self.conv1(x))))
        tokens = h.flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens, need_weights=False)[0]


def _frozen_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stock = ConvNet()
    for bn in (stock.bn1, stock.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    stock.eval().requires_grad_(False)
    lean = copy.deepcopy(stock)
    assert lean_frozen_layers(lean) == 5 and lean_frozen_layers(lean) == 0  # idempotent
    return stock, lean


def _saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_lean_layers_match_stock_outputs_and_input_gradients_and_keep_less():
    stock, lean = _frozen_pair()
    x = torch.randn(2, 3, 16, 16)
    xs, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yl = stock(xs), lean(xl)
    torch.testing.assert_close(yl, ys, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ys)
    ys.backward(g)
    yl.backward(g)
    torch.testing.assert_close(xl.grad, xs.grad, rtol=1e-4, atol=1e-5)
    kept_stock = _saved_bytes(lambda: stock(x.clone().requires_grad_())) - sum(
        p.untyped_storage().nbytes() for p in stock.parameters())
    kept_lean = _saved_bytes(lambda: lean(x.clone().requires_grad_())) - sum(
        p.untyped_storage().nbytes() for p in lean.parameters())
    assert kept_lean < 0.7 * kept_stock, (kept_lean, kept_stock)


def test_lean_layers_leave_inference_and_trainable_layers_alone():
    stock, lean = _frozen_pair()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(lean(x), stock(x))  # inference: the stock forward, bit for bit
    stock.requires_grad_(True)
    lean.requires_grad_(True)
    ys, yl = stock(x), lean(x)
    assert torch.equal(yl, ys)  # trainable weights: the patches step aside
    ys.sum().backward()
    yl.sum().backward()
    for (name, ps), pl in zip(stock.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(pl.grad, ps.grad, msg=name)
    lean.train()
    assert torch.equal(lean(x), stock.train()(x))  # BatchNorm in training mode: the stock forward


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_a_lean_model_uses_its_own_weights_and_stays_lean(how):
    _, lean = _frozen_pair()
    if how == "deepcopy":
        twin = copy.deepcopy(lean)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(lean))
    else:
        buf = io.BytesIO()
        torch.save(lean, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.conv1.forward.args[0] is twin.conv1  # bound to the copy, still the lean path
    assert twin.bn2.forward.args[0] is twin.bn2 and twin.attn._forward_pre_hooks
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    assert torch.equal(twin(x), lean(x))
    # The copy keeps as little for backward as the original and gives the same input gradients.
    kept = [_saved_bytes(lambda m=m: m(x)) for m in (lean, twin)]
    assert kept[0] == kept[1], kept
    grads = [torch.autograd.grad(m(x).square().sum(), x)[0] for m in (lean, twin)]
    assert torch.equal(grads[0], grads[1])
    with torch.no_grad():
        twin.conv1.weight.zero_()
    assert not torch.equal(twin(x), lean(x))


def test_adapter_gradients_are_unchanged_by_the_lean_layers():
    torch.manual_seed(0)
    base, _, tok = radapter.load_model(radapter.TINY_MODEL)
    config = radapter.RAdapterConfig(drop_prob=0.0)
    lean = radapter.add_adapters(copy.deepcopy(base), config)
    assert not any(getattr(m, "_radapter_lean", False) for m in lean.modules())  # opt-in: add_adapters leaves it
    assert radapter.lean_frozen_layers(lean) > 0
    stock = radapter.add_adapters(copy.deepcopy(base), config)  # the same adapters without the patches
    with torch.no_grad():
        for (_, _, a), (_, _, b) in zip(radapter.iter_adapters(lean), radapter.iter_adapters(stock), strict=True):
            a.weight.normal_(0, 0.05)
            b.weight.copy_(a.weight)
    images, texts = torch.randn(4, 3, 32, 32), tok(["a cat", "a dog", "a car", "a tree"])
    grads = []
    for model in (lean, stock):
        model.eval()
        for _, _, a in radapter.iter_adapters(model):
            a.train()
        loss = radapter.clip_loss(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                                  torch.tensor(100.0))
        loss.backward()
        grads.append([p.grad for p in radapter.adapter_parameters(model)])
    for gl, gs in zip(*grads, strict=True):
        torch.testing.assert_close(gl, gs, rtol=1e-4, atol=1e-6)


def _copies_inside(op: str, fn) -> list[str]:
    """Copy/clone ops that ``fn`` runs inside ``op`` (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = []
    for e in prof.events():
        if e.name in ("aten::clone", "aten::copy_"):
            parent = e.cpu_parent
            while parent is not None and parent.name != op:
                parent = parent.cpu_parent
            if parent is not None:
                found.append(e.name)
    return found


def test_frozen_conv_backward_copies_nothing_for_a_channels_last_weight():
    # Weights stored channels-last (as the offline default model's are) make the conv kernel
    # work channels-last; the input placeholder must come in that layout or it is copied.
    torch.manual_seed(0)
    stock = nn.Conv2d(16, 8, 1, bias=False).requires_grad_(False)
    w = torch.empty_strided((8, 16, 1, 1), (16, 1, 16, 16))  # a 1x1 kernel in channels-last strides
    stock.weight.data = w.copy_(stock.weight.data)
    lean = copy.deepcopy(stock)
    lean_frozen_layers(lean)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    y = lean(x)
    assert not y.is_contiguous()  # the kernel chose channels-last
    g = torch.randn_like(y)  # a gradient in the output's layout, as autograd hands it on
    got = []
    assert _copies_inside("aten::convolution_backward", lambda: got.extend(torch.autograd.grad(y, x, g))) == []
    want = torch.autograd.grad(stock(x), x, g)[0]
    torch.testing.assert_close(got[0], want)
    assert got[0].stride() == want.stride()


def test_lean_layers_backward_under_autocast_matches_stock():
    stock, lean = _frozen_pair()
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for model in (stock, lean):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi)
        grads.append(torch.autograd.grad(y.float().square().sum(), xi)[0])
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.05 * grads[0].abs().max().item())


@pytest.mark.parametrize("method", ["r-adapter", "drm", "lora", "full-ft"])
def test_training_turns_the_lean_layers_on_for_peft_methods(method):
    from train.config import TrainConfig
    from train.structures import prepare_trainable

    model, _, _ = radapter.load_model(radapter.TINY_MODEL)
    prepare_trainable(model, TrainConfig(method=method, model=radapter.TINY_MODEL, rank=4, lora_rank=2))
    lean = any(getattr(m, "_radapter_lean", False) for m in model.modules())
    assert lean == (method != "full-ft")  # full fine-tuning trains every layer: nothing to lean
