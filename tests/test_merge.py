import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import radapter
from radapter.adapters.adapter import Adapter
from tests.conftest import adapt_with_reference, encode_both, randomize_adapters, relative_max_diff


def _inputs(tok):
    torch.manual_seed(123)
    return torch.randn(4, 3, 32, 32), tok(["a red square", "a photo of a dog", "x", "a blue circle"])


_encode = encode_both
_rel = relative_max_diff


@pytest.fixture(params=[None, 4], ids=["full-rank", "rank-4"])
def adapted(request, tiny):
    model, _, tok = tiny
    x, t = _inputs(tok)
    base, base_weights = adapt_with_reference(model, x, t, request.param)
    return model, x, t, base, base_weights


def test_alpha_zero_reproduces_pretrained(adapted):
    model, x, t, base, base_weights = adapted
    radapter.merge_adapters(model, 0.0)
    assert (_encode(model, x, t) - base).abs().max() <= 1e-6
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, base_weights[k]), k


def test_alpha_one_merged_equals_unmerged(adapted):
    model, x, t, base, _ = adapted
    unmerged = _encode(model, x, t)
    assert _rel(unmerged, base) > 1e-3  # the adapters really change the model
    radapter.merge_adapters(model, 1.0)
    assert _rel(_encode(model, x, t), unmerged) <= 1e-5


def test_merged_model_runs_no_adapter_code(adapted, monkeypatch):
    model, x, t, _, _ = adapted
    radapter.merge_adapters(model, 0.5)
    assert all(not m._forward_hooks for m in model.modules())

    def boom(*args, **kwargs):
        raise AssertionError("adapter ran in a merged model")

    monkeypatch.setattr(Adapter, "forward", boom)
    _encode(model, x, t)


def test_unmerge_restores_exactly_and_remerge_is_stable(adapted):
    model, x, t, _, base_weights = adapted
    unmerged = _encode(model, x, t)
    radapter.merge_adapters(model, 0.7)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.unmerge_adapters(model)
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, base_weights[k]), k
    assert torch.equal(_encode(model, x, t), unmerged)
    for _ in range(3):
        radapter.merge_adapters(model, 0.2)
        radapter.merge_adapters(model, 0.7)  # re-merge while merged
        radapter.unmerge_adapters(model)
        radapter.merge_adapters(model, 0.7)
        assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
        radapter.unmerge_adapters(model)


def test_alpha_is_wiseft_interpolation(adapted):
    """Merging at alpha equals WiSE-FT between the models merged at 0 and at 1."""
    model, x, t, _, _ = adapted
    radapter.merge_adapters(model, 0.0)
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.merge_adapters(model, 1.0)
    theta_1 = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.merge_adapters(model, 0.3)
    mid = _encode(model, x, t)
    model.load_state_dict(radapter.interpolate_weights(theta_0, theta_1, 0.3))
    assert _rel(_encode(model, x, t), mid) <= 1e-5


def test_remerge_reuses_precomputed_deltas(adapted, monkeypatch):
    model, *_ = adapted
    radapter.merge_adapters(model, 0.5)
    calls = []
    original = Adapter.delta_matrix
    monkeypatch.setattr(Adapter, "delta_matrix", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with FlopCounterMode(display=False) as flops:
        for alpha in (0.1, 0.9, 0.4):
            radapter.merge_adapters(model, alpha)
    assert calls == [] and flops.get_total_flops() == 0
    with FlopCounterMode(display=False) as flops:  # the counter does see a fresh merge's matmuls
        radapter.unmerge_adapters(model)
        randomize_adapters(model, seed=3)
        radapter.merge_adapters(model, 0.4)
    assert flops.get_total_flops() > 0
    assert radapter.merged_alpha(model) == 0.4


def test_deltas_follow_adapter_updates(adapted):
    model, x, t, _, _ = adapted
    radapter.merge_adapters(model, 1.0)
    radapter.unmerge_adapters(model)
    randomize_adapters(model, seed=7)  # e.g. more training + EMA updates
    unmerged = _encode(model, x, t)
    radapter.merge_adapters(model, 1.0)
    assert _rel(_encode(model, x, t), unmerged) <= 1e-5


def test_merge_uses_ema_copy_by_default(tiny):
    model, _, tok = tiny
    x, t = _inputs(tok)
    radapter.add_adapters(model, radapter.RAdapterConfig())
    randomize_adapters(model)  # live == EMA
    with torch.no_grad():
        for _, _, a in radapter.iter_adapters(model):
            a.weight.mul_(3.0)  # live copy moves on, EMA copy stays
    ema_out = _encode(model.eval(), x, t)
    radapter.merge_adapters(model, 1.0)
    assert _rel(_encode(model, x, t), ema_out) <= 1e-5
    radapter.merge_adapters(model, 1.0, use_ema=False)
    assert _rel(_encode(model, x, t), ema_out) > 1e-3


def test_default_alpha_and_release_cache(adapted):
    model, *_ = adapted
    radapter.merge_adapters(model)
    assert radapter.merged_alpha(model) == 0.5
    with pytest.raises(RuntimeError):
        radapter.release_merge_cache(model)
    radapter.unmerge_adapters(model)
    radapter.release_merge_cache(model)
    assert radapter.merged_alpha(model) is None


def test_merge_without_adapters_is_a_clear_error(tiny):
    model, _, _ = tiny
    with pytest.raises(radapter.RAdapterError, match="add_adapters"):
        radapter.merge_adapters(model, 0.5)


def test_interpolate_weights_checks_keys():
    with pytest.raises(ValueError, match="differ"):
        radapter.interpolate_weights({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    out = radapter.interpolate_weights({"a": torch.zeros(2), "n": torch.tensor(3)},
                                       {"a": torch.ones(2), "n": torch.tensor(5)}, 0.25)
    assert torch.allclose(out["a"], torch.full((2,), 0.25)) and int(out["n"]) == 3


def test_adapters_made_under_inference_mode_are_a_clear_error(tiny):
    model, _, _ = tiny
    with torch.inference_mode():
        radapter.add_adapters(model, radapter.RAdapterConfig())
    with pytest.raises(radapter.RAdapterError, match="inference_mode"):
        radapter.merge_adapters(model, 0.5)


# ---------------------------------------------------------------- merge state follows the live weights
def test_merge_after_an_edit_of_the_base_uses_the_new_weights(adapted):
    model, *_ = adapted
    radapter.merge_adapters(model, 0.5)
    radapter.unmerge_adapters(model)
    with torch.no_grad():
        for p in radapter.adapters.fingerprint.base_state_dict(model).values():
            if p.is_floating_point():
                p.add_(1.0)  # an in-place edit of every base tensor
    edited = {k: v.clone() for k, v in radapter.adapters.fingerprint.base_state_dict(model).items()}
    radapter.merge_adapters(model, 0.0)
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, edited[k]), k


def test_load_state_dict_while_merged_is_the_new_base(adapted):
    model, *_, base_weights = adapted
    other = {k: v + 0.5 if v.is_floating_point() else v for k, v in base_weights.items()}
    radapter.merge_adapters(model, 0.7)
    model.load_state_dict(other, strict=False)  # a new base written over merged weights
    radapter.merge_adapters(model, 0.0)
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, other[k]), k
    radapter.unmerge_adapters(model)
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, other[k]), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_state_follows_a_cast_of_the_model(adapted, dtype):
    model, *_ = adapted
    radapter.merge_adapters(model, 0.6)
    reference = copy.deepcopy(model)
    radapter.unmerge_adapters(reference)
    reference.to(dtype)
    radapter.merge_adapters(reference, 0.3)  # cast while unmerged: originals taken again
    model.to(dtype)  # cast while merged: the originals follow
    radapter.merge_adapters(model, 0.3)
    got = radapter.adapters.fingerprint.base_state_dict(model)
    want = radapter.adapters.fingerprint.base_state_dict(reference)
    tol = 0 if dtype == torch.float64 else 2e-2
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.allclose(v.float(), want[k].float(), atol=tol, rtol=tol), k
    radapter.unmerge_adapters(model)
    unmerged = radapter.adapters.fingerprint.base_state_dict(model)
    radapter.unmerge_adapters(reference)
    for k, v in radapter.adapters.fingerprint.base_state_dict(reference).items():
        assert torch.equal(unmerged[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_merge_state_follows_a_move_between_devices(adapted):
    model, x, t, _, _ = adapted
    reference = copy.deepcopy(model)
    radapter.merge_adapters(reference, 0.2)
    want = _encode(reference, x, t)
    radapter.merge_adapters(model, 0.6)
    model.to("cuda")  # moved while merged
    radapter.merge_adapters(model, 0.2)
    model.to("cpu")
    assert _rel(_encode(model, x, t), want) <= 1e-5
    radapter.unmerge_adapters(model)
    radapter.unmerge_adapters(reference)
    assert _rel(_encode(model, x, t), _encode(reference, x, t)) <= 1e-6


# ---------------------------------------------------------------- per-tower alphas
def test_per_tower_alphas_write_what_a_full_merge_writes_per_tower(adapted):
    model, *_ = adapted
    reference = copy.deepcopy(model)
    radapter.merge_adapters(model, {"image": 0.2, "text": 0.9})
    assert radapter.merged_alphas(model) == {"image": 0.2, "text": 0.9}
    with pytest.raises(radapter.RAdapterError, match="different alphas"):
        radapter.merged_alpha(model)
    for alpha, tower in ((0.2, "visual."), (0.9, "transformer.")):
        radapter.merge_adapters(reference, alpha)
        want = radapter.adapters.fingerprint.base_state_dict(reference)
        for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
            if k.startswith(tower):
                assert torch.equal(v, want[k]), k
    radapter.merge_adapters(model, 0.5, towers=("image",))  # the text tower stays at 0.9
    assert radapter.merged_alphas(model) == {"image": 0.5, "text": 0.9}
    radapter.unmerge_adapters(model, towers=("text",))
    assert radapter.merged_alphas(model) == {"image": 0.5, "text": None}
    with pytest.raises(radapter.RAdapterError, match="towers"):
        radapter.merge_adapters(model, {"audio": 0.5})
    with pytest.raises(radapter.RAdapterError, match="finite"):
        radapter.merge_adapters(model, float("nan"))


def test_an_unmerged_tower_runs_its_adapter(adapted):
    model, x, t, _, _ = adapted
    unmerged = _encode(model, x, t)
    radapter.merge_adapters(model, 1.0, towers=("text",))
    assert _rel(_encode(model, x, t), unmerged) <= 1e-5  # image adapters still applied by their hooks
