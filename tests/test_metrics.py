import numpy as np
import pytest
from sklearn.metrics import f1_score

from radapter.evaluation.metrics import IoUAccumulator, expected_calibration_error, macro_f1, recall_at_k, top1


def test_top1_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    assert top1(preds, labels) == pytest.approx(np.mean(preds == labels))
    assert macro_f1(preds, labels) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins (15 equal-width): 0.9 alone, 0.8 alone, 0.6 alone, 0.7 alone
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_recall_at_k_with_several_captions_per_image():
    # 2 images; captions 0,1 describe image 0 and caption 2 describes image 1
    sim = np.array([[0.1, 0.9, 0.2],
                    [0.8, 0.3, 0.4]])
    r = recall_at_k(sim, np.array([0, 0, 1]), ks=(1, 2))
    assert r["i2t_r1"] == 0.5  # image 0 -> caption 1 (ok); image 1 -> caption 0 (wrong)
    assert r["i2t_r2"] == 1.0
    # caption 0 -> image 1 (wrong), caption 1 -> image 0 (ok), caption 2 -> image 1 (ok)
    assert r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["t2i_r2"] == 1.0


def test_iou_accumulator():
    acc = IoUAccumulator()
    target = np.array([[1, 1, 0], [2, 2, 0]])
    pred = np.array([[1, 0, 0], [2, 2, 2]])
    acc.add(pred, target, ["cat", "dog"])
    assert acc.per_class() == {"cat": pytest.approx(0.5), "dog": pytest.approx(2 / 3)}
    acc.add(np.zeros((2, 3), int), np.ones((2, 3), int), ["cat"])
    assert acc.per_class()["cat"] == pytest.approx(1 / 8)
    assert acc.miou() == pytest.approx((1 / 8 + 2 / 3) / 2)


def test_worst_group_accuracy_skips_small_groups():
    from radapter.evaluation.metrics import group_accuracies, worst_group_accuracy

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    preds = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0])
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3])  # group 3 has a single image
    assert group_accuracies(preds, labels, groups, min_size=2) == {0: 0.75, 1: 1.0, 2: 0.0}
    assert worst_group_accuracy(preds, labels, groups, min_size=2) == 0.0
    assert worst_group_accuracy(preds, labels, groups, min_size=3) == 0.75
    assert np.isnan(worst_group_accuracy(preds, labels, groups, min_size=10))


def test_classification_metrics_report_worst_group_and_ood_average():
    import torch

    from radapter.evaluation.harness import classification_metrics, summarise

    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(logits, labels, groups=np.array([0, 0, 1, 1]))
    assert m["top1"] == 0.75 and m["worst_group"] == 0.5 and m["group_top1"] == {"0": 1.0, "1": 0.5}
    plain = classification_metrics(logits, labels)
    assert "worst_group" not in plain
    s = summarise(m, {"a": m, "b": {**m, "worst_group": 0.0}})
    assert s["ood_avg"]["worst_group"] == 0.25 and "group_top1" not in s["ood_avg"]
