import pytest
import torch

import radapter
from radapter.adapters.adapter import Adapter
from radapter.adapters.ema import ema_momentum


def test_zero_init_keeps_pretrained_outputs(tiny):
    model, _, tok = tiny
    # Frozen weights switch nn.MultiheadAttention to its fused kernel (~1e-6 apart): compare like with like.
    model.requires_grad_(False)
    x, t = torch.randn(2, 3, 32, 32), tok(["a cat", "a dog"])
    with torch.no_grad():
        before = (model.encode_image(x), model.encode_text(t))
        radapter.add_adapters(model, radapter.RAdapterConfig())
        after = (model.encode_image(x), model.encode_text(t))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_full_and_low_rank_shapes_and_scale():
    full = Adapter(16, radapter.RAdapterConfig())
    low = Adapter(16, radapter.RAdapterConfig(rank=4))
    assert full.weight.shape == (16, 16) and not full.low_rank
    assert low.lora_A.shape == (4, 16) and low.lora_B.shape == (16, 4) and low.low_rank
    assert full.scale.item() == pytest.approx(0.1) and low.scale.item() == pytest.approx(0.1)
    assert torch.count_nonzero(low.delta_matrix()) == 0
    # rank >= d is full rank (the authors' inverted test built full adapters for every rank)
    assert not Adapter(16, radapter.RAdapterConfig(rank=16)).low_rank


def test_branch_is_linear_and_bias_free():
    a = Adapter(8, radapter.RAdapterConfig(drop_prob=0.0)).eval()
    with torch.no_grad():
        a.weight.normal_()
        a.update_ema(0.0)
    x = torch.randn(5, 8)
    assert torch.allclose(a(x), x @ a.delta_matrix().t(), atol=1e-6)
    assert torch.count_nonzero(a(torch.zeros(3, 8))) == 0


def _trained_adapter(mode: str, p: float = 0.5) -> Adapter:
    a = Adapter(4, radapter.RAdapterConfig(drop_prob=p, drop_mode=mode, ema_momentum=None))
    with torch.no_grad():
        a.weight.copy_(torch.eye(4))
        a.scale.fill_(1.0)
    return a


def test_adapter_drop_is_per_sample_in_training_only():
    torch.manual_seed(0)
    a = _trained_adapter("adapter")
    x = torch.ones(256, 3, 4)  # (batch, tokens, features)
    out = a(x, batch_dim=0, channel_dim=-1)
    per_sample = out.flatten(1)
    # each sample is either fully dropped (0) or fully kept (rescaled by 1/(1-p) = 2)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.3 < (per_sample[:, 0] > 0).float().mean() < 0.7
    a.eval()
    assert torch.equal(a(x), x)  # no dropping at inference


def test_token_drop_mode_shares_mask_across_batch():
    torch.manual_seed(0)
    a = _trained_adapter("token")
    out = a(torch.ones(8, 64, 4), batch_dim=0, channel_dim=-1)
    assert torch.equal(out[0], out[7])  # same token mask for all samples
    kept = out[0, :, 0] > 0
    assert 0 < kept.sum() < 64
    assert torch.all(out[:, kept] == 2.0) and torch.all(out[:, ~kept] == 0.0)


def test_drop_without_rescale():
    torch.manual_seed(0)
    a = Adapter(4, radapter.RAdapterConfig(drop_prob=0.5, drop_rescale=False))
    with torch.no_grad():
        a.weight.copy_(torch.eye(4))
        a.scale.fill_(1.0)
    assert set(a(torch.ones(64, 4)).unique().tolist()) == {0.0, 1.0}


def test_channel_first_branch_acts_on_channels():
    a = Adapter(3, radapter.RAdapterConfig(drop_prob=0.0)).eval()
    with torch.no_grad():
        a.weight.normal_()
        a.update_ema(0.0)
    x = torch.randn(2, 3, 5, 5)
    expected = torch.einsum("oc,bchw->bohw", a.delta_matrix(), x)
    assert torch.allclose(a(x, batch_dim=0, channel_dim=1), expected, atol=1e-6)


def test_ema_update_and_warmup():
    assert ema_momentum(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_momentum(0.999, 10_000, warmup=True) == pytest.approx(0.999)
    assert ema_momentum(0.9, 0, warmup=False) == 0.9
    a = Adapter(2, radapter.RAdapterConfig(ema_momentum=0.9))
    with torch.no_grad():
        a.weight.fill_(1.0)
    a.update_ema(0.9)
    assert torch.allclose(a.ema_weight, torch.full((2, 2), 0.1))
    assert int(a.ema_updates) == 1


def test_eval_uses_ema_copy_train_uses_live():
    a = Adapter(2, radapter.RAdapterConfig(drop_prob=0.0))
    with torch.no_grad():
        a.weight.fill_(1.0)
    x = torch.ones(1, 2)
    assert torch.allclose(a.train()(x), torch.full((1, 2), 0.2))
    assert torch.count_nonzero(a.eval()(x)) == 0  # EMA copy still zero
    no_ema = Adapter(2, radapter.RAdapterConfig(drop_prob=0.0, ema_momentum=None))
    with torch.no_grad():
        no_ema.weight.fill_(1.0)
    assert torch.allclose(no_ema.eval()(x), torch.full((1, 2), 0.2))


def test_model_level_update_ema_with_warmup(tiny):
    model, _, _ = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(ema_momentum=0.999))
    _, _, first = next(radapter.iter_adapters(model))
    with torch.no_grad():
        first.weight.fill_(1.0)
    radapter.update_ema(model)  # warm-up momentum at step 0 is 0.1
    assert torch.allclose(first.ema_weight, torch.full_like(first.ema_weight, 0.9))


def test_config_validation_and_roundtrip():
    cfg = radapter.RAdapterConfig(rank=8, drop_mode="token", towers=["image"])
    assert radapter.RAdapterConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"rank": 0}, {"drop_prob": 1.0}, {"drop_mode": "x"}, {"ema_momentum": 1.5}, {"towers": ()}):
        with pytest.raises(ValueError):
            radapter.RAdapterConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        radapter.RAdapterConfig.from_dict({"rnak": 4})



@pytest.mark.parametrize("learn_scale", [True, False])
def test_adapter_backward_keeps_only_its_input_and_small_tensors(learn_scale):
    torch.manual_seed(0)
    adapter = Adapter(16, radapter.RAdapterConfig(learn_scale=learn_scale, drop_prob=0.5)).train()
    adapter.scale.requires_grad_(learn_scale)
    with torch.no_grad():
        adapter.weight.normal_()
    x = torch.randn(4, 50, 16, requires_grad=True)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = adapter(x)
    assert [n for ptr, n in kept.items() if n >= x.numel() and ptr != x.untyped_storage().data_ptr()] == []
    # nor a scaled copy of the matrix: the parameters themselves are kept
    own = {t.untyped_storage().data_ptr() for t in (x, *adapter.parameters())}
    assert [n for ptr, n in kept.items() if n >= adapter.weight.numel() and ptr not in own] == []
    # the same values and gradients as the plain formula, with the mask the draw made
    keep = (y.detach().abs().sum(dim=(1, 2)) > 0).float().view(4, 1, 1) / 0.5
    xr = x.detach().clone().requires_grad_()
    ref = adapter.scale * (xr @ adapter.weight.t()) * keep
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, adapter.weight, *([adapter.scale] if learn_scale else [])], g)
    want = torch.autograd.grad(ref, [xr, adapter.weight, *([adapter.scale] if learn_scale else [])], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


LAYOUTS = ["nchw", "channels_last", "sequence_first", "batch_last_features"]


def _input_in_layout(layout: str, batch: int) -> tuple[torch.Tensor, int]:
    """An input with 8 features in ``layout``, and its feature axis."""
    if layout == "nchw":
        return torch.randn(batch, 8, 5, 6), 1
    if layout == "channels_last":
        return torch.randn(batch, 8, 5, 6).contiguous(memory_format=torch.channels_last), 1
    if layout == "sequence_first":  # what batch-first MHA returns
        return torch.randn(7, batch, 8).transpose(0, 1), -1
    return torch.randn(batch, 7, 8), -1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [None, 3])
def test_branch_keeps_the_input_layout_and_matches_the_formula(layout, rank):
    torch.manual_seed(0)
    a = Adapter(8, radapter.RAdapterConfig(rank=rank, drop_prob=0.5)).train()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x0, channel_dim = _input_in_layout(layout, batch=4)
    x = x0.clone().requires_grad_()
    torch.manual_seed(1)
    y = a(x, batch_dim=0, channel_dim=channel_dim)
    assert y.stride() == x0.stride()  # no layout change handed on to the frozen layers around it
    g = torch.randn_like(y)
    params = [p for p in a.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [x, *params], g)
    assert got[0].stride() == x0.stride()

    xr = x0.clone().requires_grad_()
    torch.manual_seed(1)
    keep = a._drop_mask(xr, 0, channel_dim)
    matrix = a.lora_B @ a.lora_A if rank else a.weight
    ref = torch.einsum("oc,...c->...o", matrix, xr.movedim(channel_dim, -1)).movedim(-1, channel_dim) * a.scale * keep
    torch.testing.assert_close(y, ref)
    for u, v in zip(got, torch.autograd.grad(ref, [xr, *params], g), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,channel_dim", [((4, 7, 8), -1), ((4, 8, 5, 5), 1)])
def test_branch_backward_under_autocast(shape, channel_dim):
    # The product runs in bf16 under autocast; backward (outside autocast) must cast alike.
    torch.manual_seed(0)
    a = Adapter(8, radapter.RAdapterConfig(drop_prob=0.0)).train()
    with torch.no_grad():
        a.weight.normal_()
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x, 0, channel_dim)
    got = torch.autograd.grad(y.float().square().sum(), [x, a.weight, a.scale])
    want = torch.autograd.grad(a(x, 0, channel_dim).square().sum(), [x, a.weight, a.scale])
    for u, v in zip(got, want, strict=True):
        assert u.dtype == v.dtype == torch.float32
        torch.testing.assert_close(u, v, rtol=0.05, atol=0.05 * v.abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank,learn_scale,rescale", [(None, True, True), (3, False, True), (None, False, False)])
def test_add_to_runs_the_kept_samples_only_and_matches_the_full_branch(layout, rank, learn_scale, rescale):
    torch.manual_seed(0)
    a = Adapter(8, radapter.RAdapterConfig(rank=rank, drop_prob=0.5, learn_scale=learn_scale,
                                           drop_rescale=rescale)).train()
    a.scale.requires_grad_(learn_scale)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x0, channel_dim = _input_in_layout(layout, batch=6)
    params = [p for p in a.parameters() if p.requires_grad]
    x = x0.clone().requires_grad_()
    saved: list[torch.Tensor] = []
    torch.manual_seed(3)  # this draw keeps some samples and drops others
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = a.add_to(x, 0, channel_dim)
    assert y.stride() == x0.stride()
    xr = x0.clone().requires_grad_()
    torch.manual_seed(3)
    ref = xr + a(xr, 0, channel_dim)
    dropped = (ref - xr).detach().flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < len(dropped)
    torch.testing.assert_close(y, ref)
    # backward keeps a copy of the kept samples' rows (and their rank-r products), nothing else of size
    kept_rows = int((~dropped).sum()) * x0[0].numel()
    floats = [t.numel() for t in saved if t.is_floating_point() and not any(t is p for p in a.parameters())]
    assert sum(floats) == kept_rows + (kept_rows * rank // 8 if rank else 0)
    g = torch.randn_like(y)
    for u, v in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(ref, [xr, *params], g), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,channel_dim", [((3, 5, 4), -1), ((3, 4, 2, 2), 1)])
def test_add_to_when_every_sample_is_dropped_or_kept_and_outside_training(shape, channel_dim):
    a = _trained_adapter("adapter", p=0.5)
    x = torch.randn(*shape)
    kept_counts = set()
    for seed in range(40):  # draws of 3 samples at p = 0.5: all dropped, some, all kept
        torch.manual_seed(seed)
        y = a.add_to(x, 0, channel_dim)
        torch.manual_seed(seed)
        ref = x + a(x, 0, channel_dim)
        torch.testing.assert_close(y, ref)
        kept_counts.add(int((ref != x).flatten(1).any(1).sum()))
        # a gradient (zero when every sample dropped the adapter) every step, as with the mask
        got, want = (torch.autograd.grad(t.sum(), a.weight) for t in (y, ref))
        torch.testing.assert_close(got[0], want[0])
    assert {0, 3} <= kept_counts
    a.eval()
    torch.testing.assert_close(a.add_to(x, 0, channel_dim), x + x)  # identity adapter, no dropping at inference
    token = _trained_adapter("token")
    if channel_dim == -1:
        torch.manual_seed(1)
        y = token.add_to(x)
        torch.manual_seed(1)
        torch.testing.assert_close(y, x + token(x))


def test_add_to_under_deterministic_algorithms_gives_the_same_result():
    a = _trained_adapter("adapter", p=0.5)
    x = torch.randn(6, 5, 4, requires_grad=True)
    outs = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            torch.manual_seed(3)
            y = a.add_to(x)
            outs.append((y, *torch.autograd.grad(y.square().sum(), [x, a.weight])))
        finally:
            torch.use_deterministic_algorithms(False)
    dropped = int(((outs[0][0] - x).detach().flatten(1).abs().amax(1) == 0).sum())
    assert 0 < dropped < 6  # the draw takes the row-subset path
    for u, v in zip(*outs, strict=True):
        torch.testing.assert_close(u, v)
