import copy
import pickle

import pytest
import torch
from open_clip.model import CLIP

import radapter
from radapter.models.text_padding import trim_text_padding, trimmed_length


@pytest.fixture
def clip_tiny():
    torch.manual_seed(0)
    model, _, tok = radapter.load_model(radapter.TINY_MODEL)
    return model, tok


def test_trimmed_text_features_equal_the_stock_ones_and_run_fewer_positions(clip_tiny):
    model, tok = clip_tiny
    assert model.encode_text.func.__name__ == "_encode_text_trimmed"  # load_model applied it
    tokens = tok(["a photo of a cat.", "a dog", "a very long caption about a small red bird on a branch"])
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        got = model.encode_text(tokens, normalize=True)
    handle.remove()
    assert seen == [trimmed_length(model, tokens)] and seen[0] < tokens.shape[1]
    with torch.no_grad():
        want = CLIP.encode_text(model, tokens, normalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adapter_gradients_through_trimmed_text_equal_the_stock_ones(clip_tiny):
    model, tok = clip_tiny
    radapter.add_adapters(model, radapter.RAdapterConfig(drop_prob=0.0, towers=("text",)))
    with torch.no_grad():
        for p in radapter.adapter_parameters(model):
            p.normal_(std=0.05)
    for _, _, adapter in radapter.iter_adapters(model):
        adapter.train()  # live weights (eval mode reads the EMA copy)
    tokens = tok(["red", "a green square", "blue"])
    params = radapter.adapter_parameters(model)
    got = torch.autograd.grad(model.encode_text(tokens).square().sum(), params)
    want = torch.autograd.grad(CLIP.encode_text(model, tokens).square().sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trimming_applies_only_where_it_is_exact(clip_tiny):
    model, _ = clip_tiny
    copied = copy.deepcopy(model)
    assert copied.encode_text.args[0] is copied
    pickled = pickle.loads(pickle.dumps(model))
    assert pickled.encode_text.args[0] is pickled
    bidirectional = copy.deepcopy(model)
    del bidirectional.encode_text
    bidirectional.attn_mask = None
    assert not trim_text_padding(bidirectional)
    eos_without_id = copy.deepcopy(model)
    del eos_without_id.encode_text
    eos_without_id.text_pool_type, eos_without_id.text_eos_id = "eos", None
    assert not trim_text_padding(eos_without_id)
    assert not trim_text_padding(torch.nn.Linear(2, 2))
