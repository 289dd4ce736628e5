"""Loaded, adapted and merged models deep-copy, pickle, save whole and change dtype: no hidden patches."""

import copy
import io
import pickle

import pytest
import torch

import radapter


def _round_trips(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buf, weights_only=False)}


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("name", [radapter.TINY_MODEL, "default"])
def test_load_model_results_copy_pickle_and_cast(name):
    torch.manual_seed(0)
    model, _, tok = radapter.load_model() if name == "default" else radapter.load_model(name)
    model.eval()
    size = 224 if name == "default" else 32
    images, tokens = torch.randn(2, 3, size, size), tok(["a photo of a cat", "a dog"])
    want = _features(model, images, tokens)
    radapter.add_adapters(model, radapter.RAdapterConfig(rank=4))
    radapter.lean_frozen_layers(model)  # the training speed-up travels with the copies too
    radapter.merge_adapters(model, 0.5)
    merged = _features(model, images, tokens)
    for how, twin in _round_trips(model).items():
        assert all(torch.equal(a, b) for a, b in zip(_features(twin, images, tokens), merged, strict=True)), how
        radapter.merge_adapters(twin, 0.0)  # adapters still zero: alpha 0 and 0.5 give the base model
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_features(twin, images, tokens), want,
                                                                   strict=True)), how
    model.to(torch.float64)
    radapter.merge_adapters(model, 0.7)
    got = _features(model, images.double(), tokens)
    assert all(g.dtype == torch.float64 and torch.allclose(g.float(), w, atol=1e-4)
               for g, w in zip(got, want, strict=True))
