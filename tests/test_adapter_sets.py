"""Named adapter sets, the kept site list, one default alpha, the fused EMA, checkpoint checks."""

import copy
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import radapter
from tests.conftest import encode_both, randomize_adapters, relative_max_diff


def _inputs(tok):
    torch.manual_seed(123)
    return torch.randn(2, 3, 32, 32), tok(["a red square", "a photo of a dog"])


@pytest.fixture
def two_sets(tiny):
    model, _, tok = tiny
    model.requires_grad_(False)
    x, t = _inputs(tok)
    base = encode_both(model, x, t)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.add_adapters(model, radapter.RAdapterConfig())
    randomize_adapters(model, seed=1)
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=4, towers=("image",)), adapter_name="small")
    radapter.set_adapter(model, "small")
    randomize_adapters(model, seed=2)
    radapter.set_adapter(model, "default")
    return model, x, t, base, base_weights


def _alone(sets_model, name):
    """The same adapters on a fresh copy of the base, as the only set."""
    fresh = copy.deepcopy(sets_model)
    for other in radapter.list_adapters(fresh):
        if other != name:
            radapter.delete_adapter(fresh, other)
    return fresh


def test_sets_switch_and_each_behaves_as_if_alone(two_sets):
    model, x, t, _, _ = two_sets
    assert radapter.list_adapters(model) == ["default", "small"] and radapter.active_adapter(model) == "default"
    out_default = encode_both(model, x, t)
    radapter.set_adapter(model, "small")
    out_small = encode_both(model, x, t)
    assert relative_max_diff(out_default, out_small) > 1e-3
    assert relative_max_diff(out_small, encode_both(_alone(model, "small"), x, t)) <= 1e-6
    # only the active set trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".radapter.small." in n for n in trainable)
    assert radapter.adapter_parameters(model) and radapter.trainable_summary(model).adapters == 4


def test_set_adapter_keeps_a_merged_model_merged(two_sets):
    model, x, t, _, _ = two_sets
    radapter.merge_adapters(model, 0.4)
    radapter.set_adapter(model, "small")  # image-only set: merged at the image alpha
    assert radapter.merged_alphas(model) == {"image": 0.4}
    reference = _alone(model, "small")
    radapter.merge_adapters(reference, 0.4)
    assert relative_max_diff(encode_both(model, x, t), encode_both(reference, x, t)) <= 1e-6
    radapter.set_adapter(model, "default")
    assert radapter.merged_alphas(model) == {"image": 0.4, "text": None}


def test_delete_and_unload_restore_the_base_exactly(two_sets):
    model, x, t, base, base_weights = two_sets
    radapter.merge_adapters(model, 0.7)
    radapter.delete_adapter(model, "default")  # the active one: "small" takes over, unmerged
    assert radapter.list_adapters(model) == ["small"] and radapter.merged_alpha(model) is None
    with pytest.raises(radapter.RAdapterError, match="no adapter set"):
        radapter.set_adapter(model, "default")
    radapter.merge_adapters(model, 0.3)
    radapter.unload(model)
    assert not radapter.has_adapters(model)
    assert model.state_dict().keys() == base_weights.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_weights[k]), k
    assert all(not m._forward_hooks for m in model.modules())
    assert (encode_both(model, x, t) - base).abs().max() <= 1e-6
    radapter.add_adapters(model)  # a plain model again: adapters can be added anew


def test_merge_and_unload_is_a_plain_merged_model(two_sets):
    model, x, t, _, _ = two_sets
    reference = copy.deepcopy(model)
    radapter.merge_adapters(reference, 0.6)
    plain = radapter.merge_and_unload(model, 0.6)
    assert not radapter.has_adapters(plain) and not any(".radapter." in k for k in plain.state_dict())
    assert torch.equal(encode_both(plain, x, t), encode_both(reference, x, t))


def test_the_site_list_is_kept_not_searched(two_sets, monkeypatch):
    model, *_ = two_sets

    def no_walk(self, *a, **k):
        raise AssertionError("walked the module tree")

    monkeypatch.setattr(torch.nn.Module, "named_modules", no_walk)
    assert len(list(radapter.iter_adapters(model))) == 8
    radapter.merge_adapters(model, 0.5)
    radapter.update_ema(model.train())
    radapter.unmerge_adapters(model)


def test_adapted_and_merged_models_pickle_deepcopy_and_save(two_sets, tmp_path):
    model, x, t, _, _ = two_sets
    for merged in (False, True):
        if merged:
            radapter.merge_adapters(model, {"image": 0.3, "text": 0.8})
        want = encode_both(model, x, t)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for copy_ in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
            assert torch.equal(encode_both(copy_, x, t), want)
            assert radapter.list_adapters(copy_) == ["default", "small"]
            radapter.merge_adapters(copy_, 0.0)
            radapter.unmerge_adapters(copy_)
    radapter.unmerge_adapters(model)
    assert relative_max_diff(encode_both(copy_, x, t), encode_both(model, x, t)) <= 1e-6


# ---------------------------------------------------------------- one default alpha
def test_saved_default_alpha_is_what_merge_uses(tiny, tmp_path):
    model, _, _ = tiny
    fresh = copy.deepcopy(model)
    radapter.add_adapters(model)
    randomize_adapters(model)
    path = radapter.save_adapters(model, tmp_path / "a.safetensors", default_alpha=0.8)
    info = radapter.adapter_file_info(path)
    assert info["default_alpha"] == 0.8 and info["adapter_config"]["default_alpha"] == 0.8
    radapter.load_adapters(fresh, path)
    radapter.merge_adapters(fresh)
    assert radapter.merged_alpha(fresh) == 0.8


def test_files_whose_config_lacks_the_default_alpha_use_the_metadata(tiny, tmp_path):
    model, _, _ = tiny
    fresh = copy.deepcopy(model)
    radapter.add_adapters(model)
    path = radapter.save_adapters(model, tmp_path / "a.safetensors", default_alpha=0.3)
    tensors = load_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    cfg = json.loads(header["adapter_config"])
    cfg["default_alpha"] = 0.5  # as files written before the config carried it
    header["adapter_config"] = json.dumps(cfg)
    save_file(tensors, str(path), metadata=header)
    radapter.load_adapters(fresh, path)
    radapter.merge_adapters(fresh)
    assert radapter.merged_alpha(fresh) == 0.3


# ---------------------------------------------------------------- the fused EMA
def test_ema_update_is_one_fused_step_without_host_syncs(tiny, monkeypatch):
    model, _, _ = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(ema_momentum=0.9))
    model.train()
    randomize_adapters(model)  # one per-adapter EMA step (momentum 0): the counters read 1
    reference = copy.deepcopy(model)
    radapter.update_ema(model)  # the first fused step reads the counter once
    for name in ("__int__", "item", "__index__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name: pytest.fail(f"host sync via {_n}"))
    for _ in range(3):
        radapter.update_ema(model)
    monkeypatch.undo()
    for step in range(1, 5):  # the per-adapter rule with the warm-up momentum
        m = min(0.9, (1 + step) / (10 + step))
        for _, _, a in radapter.iter_adapters(reference):
            for n in a.param_names:
                getattr(a, f"ema_{n}").lerp_(getattr(a, n), 1 - m)
    for (_, _, a), (_, _, b) in zip(radapter.iter_adapters(model), radapter.iter_adapters(reference), strict=True):
        assert int(a.ema_updates) == 5
        for n in a.param_names:
            assert torch.allclose(getattr(a, f"ema_{n}"), getattr(b, f"ema_{n}"), atol=1e-7)


def test_ema_counter_is_read_back_after_a_load(tiny):
    model, _, _ = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(ema_momentum=0.99))
    for _ in range(3):
        radapter.update_ema(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    radapter.update_ema(model)
    model.load_state_dict(state)  # a resume: the counter goes back to 3
    radapter.update_ema(model)
    assert all(int(a.ema_updates) == 4 for _, _, a in radapter.iter_adapters(model))


# ---------------------------------------------------------------- fingerprints and file checks
def test_fingerprint_ignores_an_exact_cast_and_names_a_lossy_one(tiny, tmp_path):
    model, _, _ = tiny
    trained = copy.deepcopy(model)
    radapter.add_adapters(trained)
    path = radapter.save_adapters(trained, tmp_path / "a.safetensors")
    radapter.load_adapters(copy.deepcopy(model).double(), path)  # float64 holds the float32 base exactly
    with pytest.raises(radapter.CheckpointError, match=r"weights are bfloat16 .* load the base in float32"):
        radapter.load_adapters(copy.deepcopy(model).to(torch.bfloat16), path)


def _rewrite(path, tensors=None, **meta):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    header.update(meta)
    save_file(tensors if tensors is not None else load_file(path), str(path), metadata=header)


def _bad_adapter_file(model, path, change):
    """An adapter file of ``model`` (adapters added to a copy) spoilt by ``change``: metadata
    overrides, or ``"nan-tensor"`` / ``"inf-tensor"`` for one non-finite weight."""
    trained = copy.deepcopy(model)
    radapter.add_adapters(trained)
    path = radapter.save_adapters(trained, path)
    if isinstance(change, dict):
        _rewrite(path, **change)
    else:
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith(".weight"))
        tensors[key][0, 0] = float("nan") if change == "nan-tensor" else float("inf")
        _rewrite(path, tensors)
    return path


@pytest.mark.parametrize("change", [
    {"default_alpha": "abc"}, {"default_alpha": "7.5"}, {"default_alpha": "nan"}, {"training": "{not json"},
    "nan-tensor", "inf-tensor",
])
def test_bad_adapter_files_are_checkpoint_errors_that_change_nothing(tiny, tmp_path, change):
    model, _, _ = tiny
    path = _bad_adapter_file(model, tmp_path / "a.safetensors", change)
    with pytest.raises(radapter.CheckpointError, match=str(path.name)):
        radapter.adapter_file_info(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(radapter.CheckpointError):
        radapter.load_adapters(model, path)
    assert not radapter.has_adapters(model) and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("change", [{"default_alpha": "abc"}, {"training": "{not json"}, "nan-tensor"])
def test_cli_errors_name_the_bad_adapter_file(tiny, tmp_path, capsys, change):
    from radapter.cli import main

    model, _, _ = tiny
    path = _bad_adapter_file(model, tmp_path / "odd-name.safetensors", change)
    for argv in (["info", str(path)], ["export", "--model", radapter.TINY_MODEL, "--adapter", str(path),
                                       "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "odd-name.safetensors" in err[0], err
    assert not (tmp_path / "out").exists()
