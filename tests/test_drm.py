"""DRM as trained and served: same loss family as the method, one temperature, checked descriptions."""

import json

import torch

import radapter
from radapter.data.benchmark_spec import get_spec
from radapter.drm import DRMHead
from radapter.evaluation.zero_shot import zero_shot_classifier
from train.config import TrainConfig
from train.description_check import description_candidates
from train.objectives import contrastive_loss, drm_loss
from train.run import run


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    desc = torch.randn(4, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    q = torch.softmax(torch.randn(8, 4, generator=g), 1)
    return img, txt, desc, labels, q


def test_mpm_nce_trains_at_the_models_logit_scale_by_default():
    img, txt, _, labels, _ = _features()
    cfg = TrainConfig(method="r-adapter")
    got = contrastive_loss(img, txt, labels, cfg, scale=19.0)
    want = radapter.mpm_nce_loss(img, txt, labels, temperature=1 / 19.0)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, radapter.mpm_nce_loss(img, txt, labels, temperature=0.01))
    fixed = TrainConfig(method="r-adapter", temperature=0.01)
    assert torch.allclose(contrastive_loss(img, txt, labels, fixed, scale=19.0),
                          radapter.mpm_nce_loss(img, txt, labels, temperature=0.01))


def test_drm_is_the_methods_own_loss_plus_the_worst_case_term():
    img, txt, desc, labels, q = _features()
    for method, family in (("drm", "mpm-nce"), ("full-ft-drm", "clip")):
        cfg = TrainConfig(method=method, drm_lambda=0.0)
        assert cfg.loss_name == family
        loss, _ = drm_loss(img, txt, desc, labels, q, cfg, scale=19.0)
        assert torch.allclose(loss, contrastive_loss(img, txt, labels, cfg, 19.0))
        cfg.drm_lambda = 2.0
        loss2, parts2 = drm_loss(img, txt, desc, labels, q, cfg, scale=19.0)
        assert abs(loss2.item() - (parts2["erm"] + 2.0 * parts2["wrm"])) < 1e-5 and parts2["wrm"] > 0


def test_drm_head_default_part_is_the_zero_shot_head_over_its_templates():
    model, _, tokenizer = radapter.load_model(radapter.TINY_MODEL)
    names, templates = ["red", "blue"], ["a photo of a {}.", "an icon of a {}."]
    head = DRMHead(model, tokenizer, names, ["a red square", "a blue square"], default_template=templates)
    want = zero_shot_classifier(model, tokenizer, names, templates).weight
    assert torch.allclose(head.default, want, atol=1e-6)
    single = DRMHead(model, tokenizer, names, ["a red square", "a blue square"], default_template="a photo of a {}.")
    assert torch.allclose(single.default, zero_shot_classifier(model, tokenizer, names, templates[:1]).weight,
                          atol=1e-6)


def test_description_candidates_come_from_the_spec_without_duplicates():
    spec = get_spec("emoji-backgrounds")
    sets = description_candidates(spec)
    assert sets[0] == spec.description_list() and len(sets) == len({tuple(s) for s in sets}) >= 2
    assert all(len(s) == len(spec.prompt_names) for s in sets)


def test_drm_run_checks_descriptions_on_val_and_saves_its_templates(tmp_path):
    from tests.test_train import _cfg, _folder

    base = tmp_path / "data"
    train = _folder(base / "train", 12, 15, 0)
    (train / "core_descriptions.json").write_text(json.dumps({c: f"a flat square of pure {c} colour"
                                                              for c in ("red", "green", "blue", "yellow")}))
    folders = {"train": train, "val": _folder(base / "val", 4, 15, 1), "test": _folder(base / "test", 4, 15, 2)}
    metrics = run(_cfg(folders, tmp_path / "out", method="drm"))
    check = metrics["description_check"]
    from train.description_check import DEFAULT_PATTERNS

    assert check["split"] == "val" and check["images"] == 16
    assert 0 <= check["default_head_top1"] <= 1 and len(check["candidates"]) == 1 + len(DEFAULT_PATTERNS)
    assert check["candidates"][0]["descriptions"]["red"] == "a flat square of pure red colour"  # the user's own
    assert check["candidates"][3]["descriptions"]["red"] == "red: a flat square of pure red colour."
    best = max(c["top1"] for c in check["candidates"])
    assert check["candidates"][check["chosen"]]["top1"] == best
    chosen = check["candidates"][check["chosen"]]["descriptions"]
    assert json.loads(radapter.adapter_file_info(tmp_path / "out" / "adapter.safetensors")["drm"])["descriptions"] \
        == [chosen[c] for c in ("blue", "green", "red", "yellow")]  # trained on (and shipped with) the chosen set
    info = radapter.adapter_file_info(tmp_path / "out" / "adapter.safetensors")
    from radapter.evaluation.zero_shot import OPENAI_TEMPLATES

    assert json.loads(info["drm"])["templates"] == list(OPENAI_TEMPLATES)  # the captions' templates
