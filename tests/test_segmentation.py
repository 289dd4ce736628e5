import numpy as np
import pytest
import torch

import radapter
from radapter.data.sets import SegmentationSet
from radapter.segmentation import (
    _vit_dense,
    evaluate_segmentation,
    overlay,
    own_object_hits,
    saliency_mask,
    segment,
)
from tests.conftest import randomize_adapters


def test_plain_dense_path_matches_open_clip_tokens(tiny):
    model, _, _ = tiny
    x = torch.randn(2, 3, 32, 32)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = model.visual(x)
    model.visual.output_tokens = False
    ours = _vit_dense(model.visual, x, "plain")
    assert torch.allclose(ours.reshape(2, -1, ours.shape[-1]), tokens @ model.visual.proj, atol=1e-5)


@pytest.mark.parametrize("method", ["clearclip", "sclip", "maskclip", "plain"])
def test_segment_outputs(tiny, method):
    model, _, tok = tiny
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    seg = segment(model, tok, image, ["cat", "dog", "car"], method=method)
    assert seg.labels.shape == (40, 56) and seg.probs.shape == (3, 40, 56)
    assert seg.labels.min() >= 0 and seg.labels.max() <= 3
    assert np.allclose(seg.probs.sum(0), 1.0, atol=1e-4)  # a softmax over the classes at every pixel
    assert set(seg.masks()) == {"cat", "dog", "car"} and set(seg.scores()) == {"cat", "dog", "car"}
    assert overlay(image, seg).shape == image.shape


def test_segment_input_errors(tiny):
    model, _, tok = tiny
    with pytest.raises(ValueError, match="class names"):
        segment(model, tok, np.zeros((8, 8, 3), np.uint8), [])
    with pytest.raises(ValueError, match="RGB"):
        segment(model, tok, np.zeros((8, 8), np.uint8), ["a"])


def test_unmerged_adapters_are_folded_in_and_state_is_restored(tiny):
    model, _, tok = tiny
    radapter.add_adapters(model, radapter.RAdapterConfig())
    randomize_adapters(model, std=0.3)
    image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    unmerged = segment(model, tok, image, ["a", "b"])
    assert radapter.merged_alpha(model) is None
    radapter.merge_adapters(model, 1.0)
    merged = segment(model, tok, image, ["a", "b"])
    assert np.allclose(unmerged.probs, merged.probs, atol=1e-5)


def test_own_object_hits_and_evaluation(tiny):
    target = np.zeros((4, 6), int)
    target[:, :3], target[:, 3:] = 1, 2
    right = target.copy()
    swapped = np.where(target == 1, 2, np.where(target == 2, 1, 0))
    assert own_object_hits(right, target) == [True, True]
    assert own_object_hits(swapped, target) == [False, False]
    model, _, tok = tiny
    rng = np.random.default_rng(0)
    sset = SegmentationSet("toy", (rng.random((2, 32, 32, 3)) * 255).astype(np.uint8),
                           np.stack([target.repeat(8, 0)[:32, :].repeat(6, 1)[:, :32]] * 2).astype(np.uint8),
                           [["red thing", "blue thing"]] * 2)
    res = evaluate_segmentation(model, tok, sset, progress=False)
    assert {"miou", "miou_saliency_baseline", "own_object_rate"} <= res.keys()
    assert 0 <= res["miou"] <= 1 and 0 <= res["own_object_rate"] <= 1
    assert saliency_mask(model, sset.images[0]).shape == (32, 32)


def test_segment_cli_writes_overlay(tmp_path, tiny):
    from PIL import Image

    from radapter.cli import main

    Image.fromarray((np.random.default_rng(0).random((30, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    assert main(["segment", str(tmp_path / "x.png"), "--classes", "cat, dog", "--model", radapter.TINY_MODEL,
                 "--out", str(tmp_path / "o.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (30, 30)
    assert main(["segment", str(tmp_path / "missing.png"), "--classes", "a", "--model", radapter.TINY_MODEL]) == 2
