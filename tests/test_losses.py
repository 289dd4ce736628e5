import math

import pytest
import torch
import torch.nn.functional as F

import radapter


def _direct_mpm_nce(img, txt, labels, eps, margin, tau):
    """Straight from the paper's definition, with Python loops."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = len(labels)

    def direction(a, b):
        total = 0.0
        for i in range(n):
            pos = [j for j in range(n) if labels[j] == labels[i]]
            neg = [j for j in range(n) if labels[j] != labels[i]]
            logits = [(float(a[i] @ b[j]) + (0.0 if j in pos else margin)) / tau for j in range(n)]
            log_z = math.log(sum(math.exp(v - max(logits)) for v in logits)) + max(logits)
            for j in range(n):
                if j in pos:
                    target = (1 - eps) / len(pos) if neg else 1 / len(pos)
                else:
                    target = eps / len(neg)
                total -= target * (logits[j] - log_z)
        return total / n

    return 0.5 * (direction(img, txt) + direction(txt, img))


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0, 0, 1, 2, 2, 2], [5, 5, 5]])
@pytest.mark.parametrize(("eps", "margin"), [(0.0, 0.0), (0.02, 0.05), (0.1, 0.2)])
def test_mpm_nce_matches_direct_computation(labels, eps, margin):
    torch.manual_seed(len(labels))
    img, txt = torch.randn(len(labels), 8), torch.randn(len(labels), 8)
    got = radapter.mpm_nce_loss(img, txt, torch.tensor(labels), eps=eps, margin=margin, temperature=0.1)
    assert float(got) == pytest.approx(_direct_mpm_nce(img, txt, labels, eps, margin, 0.1), rel=1e-5)


def test_mpm_nce_reduces_to_infonce_with_single_positives():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    mpm = radapter.mpm_nce_loss(img, txt, torch.arange(6), eps=0.0, margin=0.0, temperature=0.01)
    assert float(mpm) == pytest.approx(float(radapter.clip_loss(img, txt, 100.0)), rel=1e-5)


def test_mpm_nce_targets_hand_made():
    from radapter.losses import mpm_nce_targets

    pos, target = mpm_nce_targets(torch.tensor([0, 0, 1]), eps=0.1)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert torch.allclose(target, torch.tensor([[0.45, 0.45, 0.1], [0.45, 0.45, 0.1], [0.05, 0.05, 0.9]]))
    assert torch.allclose(target.sum(1), torch.ones(3))


def test_margin_penalises_close_negatives():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    labels = torch.tensor([0, 1])
    lo = radapter.mpm_nce_loss(img, txt, labels, eps=0.0, margin=0.0, temperature=0.1)
    hi = radapter.mpm_nce_loss(img, txt, labels, eps=0.0, margin=0.1, temperature=0.1)
    assert hi > lo


def test_mpm_nce_gradient_and_shape_errors():
    img = torch.randn(4, 8, requires_grad=True)
    radapter.mpm_nce_loss(img, torch.randn(4, 8), torch.tensor([0, 1, 0, 1])).backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="matching"):
        radapter.mpm_nce_loss(torch.randn(4, 8), torch.randn(3, 8), torch.arange(4))


def test_infonce_matches_direct_computation():
    torch.manual_seed(1)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * 20.0
    direct = 0.0
    for i in range(5):
        direct -= float(sims[i, i] - torch.logsumexp(sims[i], 0)) / 10
        direct -= float(sims[i, i] - torch.logsumexp(sims[:, i], 0)) / 10
    assert float(radapter.clip_loss(img, txt, 20.0)) == pytest.approx(direct, rel=1e-5)


def test_cross_entropy_matches_direct_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    direct = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 2]) / 2
    assert float(radapter.cross_entropy(logits, labels)) == pytest.approx(float(direct))
    smoothed = radapter.cross_entropy(logits, labels, label_smoothing=0.3)
    assert float(smoothed) != pytest.approx(float(direct))
