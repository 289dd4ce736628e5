import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import radapter
from tests.conftest import randomize_adapters


@pytest.fixture
def saved(tiny, tmp_path):
    model, _, tok = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=8))
    randomize_adapters(model)
    with torch.no_grad():  # live weights move on after the last EMA update
        for _, _, a in radapter.iter_adapters(model):
            a.lora_B.mul_(2.0)
    path = radapter.save_adapters(model, tmp_path / "a.safetensors", default_alpha=0.4,
                                  training={"steps": 10, "loss": 1.5}, dataset="toy")
    return model, tok, path


def _fresh():
    torch.manual_seed(0)  # same seed as the `tiny` fixture: same base weights
    return radapter.load_model(radapter.TINY_MODEL)[0]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_roundtrip_saves_ema_copy_and_metadata(saved):
    model, tok, path = saved
    info = radapter.adapter_file_info(path)
    assert info["format"] == "radapter-adapters" and info["default_alpha"] == 0.4
    assert info["adapter_config"]["rank"] == 8 and info["training"] == {"steps": 10, "loss": 1.5}
    assert json.loads(info["dataset"]) == "toy"
    assert info["base_fingerprint"] == radapter.compute_fingerprint(_fresh())
    fresh = _fresh()
    meta = radapter.load_adapters(fresh, path)
    assert meta["default_alpha"] == 0.4
    pairs = zip(radapter.iter_adapters(model), radapter.iter_adapters(fresh), strict=True)
    for (p1, _, a1), (p2, _, a2) in pairs:
        assert p1 == p2
        assert torch.equal(a2.lora_B, a1.ema_lora_B) and not torch.equal(a2.lora_B, a1.lora_B)
        assert torch.equal(a2.ema_lora_B, a1.ema_lora_B)
    x, t = torch.randn(2, 3, 32, 32), tok(["a", "b"])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), fresh.encode_image(x), atol=1e-6)
        assert torch.allclose(model.encode_text(t), fresh.encode_text(t), atol=1e-6)


def test_loading_into_merged_model_remerges(saved):
    _, _, path = saved
    fresh = _fresh()
    radapter.add_adapters(fresh, radapter.RAdapterConfig(rank=8))
    radapter.merge_adapters(fresh, 0.3)
    radapter.load_adapters(fresh, path)
    assert radapter.merged_alpha(fresh) == 0.3
    ref = _fresh()
    radapter.load_adapters(ref, path)
    radapter.merge_adapters(ref, 0.3)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_other_base_model_is_refused_and_nothing_changes(saved):
    _, _, path = saved
    torch.manual_seed(99)
    other = radapter.load_model(radapter.TINY_MODEL)[0]
    before = _snapshot(other)
    with pytest.raises(radapter.CheckpointError, match="trained on base model"):
        radapter.load_adapters(other, path)
    assert radapter.adapters.inject.adapter_state(other) is None
    assert _snapshot(other).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(other).items())


def test_rank_mismatch_is_refused(saved):
    _, _, path = saved
    fresh = _fresh()
    radapter.add_adapters(fresh, radapter.RAdapterConfig())
    before = _snapshot(fresh)
    with pytest.raises(radapter.CheckpointError, match="rank"):
        radapter.load_adapters(fresh, path)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(fresh).items())


def test_site_mismatch_is_refused(saved):
    _, _, path = saved
    fresh = _fresh()
    radapter.add_adapters(fresh, radapter.RAdapterConfig(rank=8, towers=("image",)))
    with pytest.raises(radapter.CheckpointError, match="does not fit"):
        radapter.load_adapters(fresh, path)


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "pickle", "plain-safetensors"])
def test_bad_files_are_clear_errors(saved, tmp_path, kind):
    _, _, good = saved
    path = tmp_path / f"{kind}.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(_Evil()))
    elif kind == "plain-safetensors":
        save_file({"w": torch.zeros(2)}, str(path))
    fresh = _fresh()
    with pytest.raises(radapter.CheckpointError) as err:
        radapter.load_adapters(fresh, path)
    assert "\n" not in str(err.value)
    assert radapter.adapters.inject.adapter_state(fresh) is None


def test_save_is_atomic_and_reserved_keys_refused(saved, tmp_path):
    model, _, path = saved
    with pytest.raises(ValueError, match="reserved"):
        radapter.save_adapters(model, path, format="x")
    assert radapter.adapter_file_info(path)["default_alpha"] == 0.4  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left
