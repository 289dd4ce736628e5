from pathlib import Path

import numpy as np
import pytest
import torch

import radapter
from radapter.data.sets import SegmentationSet
from radapter.evaluation.segmentation import (
    _dilated,
    _vit_dense,
    can_dilate,
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


FIXTURE_EMOJI = Path(__file__).parent / "fixtures" / "emoji"
# Known-answer test on the offline default model. The threshold is 0.07 below the lowest IoU
# measured when it was written (0.32 to 0.57 over these 12 masks, docs/segmentation.md): 80 px
# objects on a 14x14 feature grid per window cannot be traced much tighter. The previous CNN
# path (cosine, no prior, stride 32, scale 1) reached 0.10 to 0.38 here, so it fails.
MIN_IOU = 0.25


def _two_emoji(style: str, left: str, right: str, size: int = 224, obj: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Two fixture emoji (by code point) pasted left and right on a plain light background; mask 1 = left."""
    from PIL import Image

    folder = FIXTURE_EMOJI / f"emoji-datasource-{style}" / "package" / "img" / style / "64"
    canvas = np.full((size, size, 3), 235.0, np.float32)
    mask = np.zeros((size, size), np.uint8)
    for k, (code, (r, c)) in enumerate(((left, (72, 16)), (right, (72, 128))), start=1):
        with Image.open(folder / f"{code}.png") as im:
            rgba = np.asarray(im.convert("RGBA").resize((obj, obj), Image.LANCZOS)).astype(np.float32)
        a = rgba[:, :, 3:] / 255.0
        canvas[r:r + obj, c:c + obj] = a * rgba[:, :, :3] + (1 - a) * canvas[r:r + obj, c:c + obj]
        mask[r:r + obj, c:c + obj][rgba[:, :, 3] >= 128] = k
    return canvas.round().astype(np.uint8), mask


@pytest.fixture(scope="module")
def offline_default():
    return radapter.load_model()


HOT_DOG, TREE = ("1f32d", "hot dog"), ("1f332", "evergreen tree")
SANTA, MICROPHONE = ("1f385", "father christmas"), ("1f399-fe0f", "studio microphone")


def _own_object_ious(model, tok, style: str, a: tuple[str, str], b: tuple[str, str], **kw) -> list[tuple[float, bool]]:
    """``(IoU with its own object, mask mostly on its own object)`` for each class, in both placements."""
    out = []
    for left, right in ((a, b), (b, a)):
        image, target = _two_emoji(style, left[0], right[0])
        seg = segment(model, tok, image, [left[1], right[1]], **kw)
        hits = own_object_hits(seg.labels, target)
        for k in (1, 2):
            pred, own = seg.labels == k, target == k
            out.append((float(np.sum(pred & own) / np.sum(pred | own)), hits[k - 1]))
    return out


@pytest.mark.parametrize(("style", "a", "b"), [("google", HOT_DOG, TREE), ("google", SANTA, MICROPHONE),
                                               ("twitter", HOT_DOG, TREE)])
def test_each_class_mask_lands_on_its_own_object(offline_default, style, a, b):
    """Both placements of the same two objects: salience alone cannot pass both, the text must pick."""
    model, _, tok = offline_default
    for iou, hit in _own_object_ious(model, tok, style, a, b):
        assert hit and iou > MIN_IOU, (style, a[1], b[1], iou, hit)


def test_dilation_doubles_the_grid_and_restores_the_tower(offline_default):
    model, _, _ = offline_default
    assert can_dilate(model)
    trunk = model.visual.trunk
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        before = trunk.forward_features(x)
        with _dilated(trunk):
            assert trunk.forward_features(x).shape[-2:] == (14, 14)
        assert torch.equal(trunk.forward_features(x), before)


def test_the_known_answer_check_fails_when_the_text_says_nothing(offline_default):
    """Control: with uninformative names the same check must fail, or it would not test the text."""
    model, _, tok = offline_default
    results = _own_object_ious(model, tok, "google", (HOT_DOG[0], "object"), (TREE[0], "thing"))
    assert not all(hit and iou > MIN_IOU for iou, hit in results)


def test_own_object_rate_over_all_pairs_of_fixture_objects(offline_default):
    """Less hand-picked: the first fixture emoji of each object category (not flags, symbols or
    skin tones), every pair in both placements (84 class masks). Salience alone scores at most 0.5
    here; 0.95 when written, 0.65 for the previous CNN path (cosine, no prior, stride 32)."""
    import itertools
    import json

    model, _, tok = offline_default
    meta = json.loads((FIXTURE_EMOJI / "emoji-datasource-google" / "package" / "emoji.json").read_text())
    first: dict[str, tuple[str, str]] = {}
    for e in meta:
        if e["category"] not in ("Flags", "Symbols", "Component"):
            first.setdefault(e["category"], (e["image"].removesuffix(".png"), e["name"].lower()))
    assert len(first) == 7
    hits = [hit for a, b in itertools.combinations(first.values(), 2)
            for _, hit in _own_object_ious(model, tok, "google", a, b)]
    assert np.mean(hits) > 0.8, np.mean(hits)
