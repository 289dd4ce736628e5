import pytest
import torch
from safetensors.torch import save_file

import radapter


def test_tiny_model_loads_with_preprocess_and_tokenizer(tiny):
    model, preprocess, tok = tiny
    assert not model.training
    assert tok(["hello"]).shape == (1, 16)
    assert model.radapter_model_info.model_cfg["vision_cfg"]["width"] == 64
    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_hub_tag_offline_is_one_line_error_with_local_hint():
    with pytest.raises(radapter.ModelLoadError) as err:
        radapter.load_model("ViT-B-32-quickgelu", pretrained="openai")
    msg = str(err.value)
    assert "\n" not in msg and "local-dir:" in msg and "pretrained=" in msg
    with pytest.raises(radapter.ModelLoadError, match="local-dir:"):
        radapter.load_model("hf-hub:timm/ViT-B-32-quickgelu")
    with pytest.raises(radapter.ModelLoadError, match="local-dir:"):
        radapter.load_model("ViT-B-32-quickgelu:openai")


def test_unknown_names_and_bad_paths(tmp_path):
    with pytest.raises(radapter.ModelLoadError, match="did you mean"):
        radapter.load_model("ViT-B-23")
    with pytest.raises(radapter.ModelLoadError, match="neither a tag"):
        radapter.load_model("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(radapter.ModelLoadError, match="say which architecture"):
        radapter.load_model(str(weights))
    with pytest.raises(radapter.ModelLoadError, match="cannot load"):
        radapter.load_model(radapter.TINY_MODEL, pretrained=str(weights))
    with pytest.raises(radapter.ModelLoadError, match=r"config file missing|cannot load"):
        radapter.load_model(str(tmp_path))


def test_local_weights_file_loads(tiny, tmp_path):
    model, _, _ = tiny
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again, _, _ = radapter.load_model(radapter.TINY_MODEL, pretrained=str(path))
    assert radapter.compute_fingerprint(again) == radapter.compute_fingerprint(model)


def test_registered_builders_plug_in(tiny):
    calls = []

    def builder(**kwargs):
        calls.append(kwargs)
        return tiny

    radapter.register_model("my-model", builder)
    assert radapter.load_model("my-model")[0] is tiny[0]
    assert "my-model" in radapter.list_models() and calls


def test_fingerprint_tracks_weights(tiny):
    model, _, _ = tiny
    fp = radapter.compute_fingerprint(model)
    assert fp == radapter.compute_fingerprint(model)
    with torch.no_grad():
        model.visual.proj[0, 0] += 1e-3
    assert radapter.compute_fingerprint(model) != fp
