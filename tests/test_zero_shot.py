import pytest
import torch
import torch.nn.functional as F

import radapter


def test_openai_templates_are_the_80_imagenet_prompts():
    assert len(radapter.OPENAI_TEMPLATES) == 80
    assert all("{}" in t for t in radapter.OPENAI_TEMPLATES)
    assert "a photo of a {}." in radapter.OPENAI_TEMPLATES


def test_head_is_normalised_template_average(tiny):
    model, _, tok = tiny
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    head = radapter.zero_shot_classifier(model, tok, ["cat", "dog", "red car"], templates)
    assert head.weight.shape == (3, 32)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        e = F.normalize(model.encode_text(tok(["a photo of a dog.", "a drawing of a dog."])), dim=-1)
    assert torch.allclose(head.weight[1], F.normalize(e.mean(0), dim=0), atol=1e-5)
    feats = torch.randn(5, 32)
    logits = head(feats)
    expected = model.logit_scale.exp() * F.normalize(feats, dim=-1) @ head.weight.t()
    assert logits.shape == (5, 3) and torch.allclose(logits, expected, atol=1e-4)
    assert head.classnames == ["cat", "dog", "red car"]


def test_head_batches_do_not_change_result(tiny):
    model, _, tok = tiny
    a = radapter.zero_shot_classifier(model, tok, ["a", "b", "c"], radapter.OPENAI_TEMPLATES[:7], batch_size=5)
    b = radapter.zero_shot_classifier(model, tok, ["a", "b", "c"], radapter.OPENAI_TEMPLATES[:7], batch_size=64)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


@pytest.mark.parametrize("names", [[], ["cat", ""], ["cat", "cat"]])
def test_bad_class_lists_are_clear_errors(tiny, names):
    model, _, tok = tiny
    with pytest.raises(ValueError, match="class names"):
        radapter.zero_shot_classifier(model, tok, names, ["{}"])


def test_head_keeps_training_mode(tiny):
    model, _, tok = tiny
    model.train()
    radapter.zero_shot_classifier(model, tok, ["cat"], ["{}"])
    assert model.training


def test_read_templates(tmp_path):
    from radapter.evaluation.zero_shot import read_templates

    assert read_templates("openai") == radapter.OPENAI_TEMPLATES
    assert read_templates("simple") == radapter.SIMPLE_TEMPLATES
    (tmp_path / "t.txt").write_text("a {}.\n\nan image of {}\n")
    assert read_templates(str(tmp_path / "t.txt")) == ("a {}.", "an image of {}")
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="one template per line"):
        read_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="not 'openai'"):
        read_templates(str(tmp_path / "missing.txt"))
