"""Metrics worked out by hand, and the exactly-once checks on gathered predictions."""

import logging

import numpy as np
import pytest

from pipeline.evaluate import Predictions, compute_metrics, gather_predictions


def binary(scores, labels):
    scores = np.asarray(scores, np.float32)[:, None]
    return Predictions([f"k{i}" for i in range(len(labels))], scores, np.asarray(labels))


def test_binary_metrics_by_hand():
    # Scores 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1: of the four (neg, pos) pairs,
    # three are ordered right, so ROC-AUC = 0.75; precision at the two positives is
    # 1/1 and 2/3, so AP = (1 + 2/3) / 2.
    pred = binary([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    m = compute_metrics(pred, "bce_with_logits", ["real", "fake"], threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(0.75)  # only 0.35 (a positive) is missed
    assert m["per_class_accuracy"] == {"real": 1.0, "fake": 0.5}
    m = compute_metrics(pred, "bce_with_logits", ["real", "fake"], threshold=0.3)
    assert m["accuracy"] == pytest.approx(0.75)  # now 0.4 (a negative) is wrong
    assert m["per_class_accuracy"] == {"real": 0.5, "fake": 1.0}


def test_two_logit_head_uses_the_second_column():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    pred = Predictions(["a", "b", "c"], probs, np.array([0, 1, 1]))
    m = compute_metrics(pred, "cross_entropy", ["real", "fake"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(1.0)


def test_multiclass_top1_top5_per_class():
    probs = np.eye(7, dtype=np.float32)[[0, 1, 2, 3, 4, 5, 6, 0]]
    probs[7] = np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02])
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 4])  # the last: class 4 is the 5th guess
    pred = Predictions([str(i) for i in range(8)], probs, labels)
    m = compute_metrics(pred, "cross_entropy", [str(c) for c in range(7)])
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["top5"] == pytest.approx(1.0)
    assert m["per_class_accuracy"]["4"] == pytest.approx(0.5)
    probs[7] = np.array([0.3, 0.25, 0.2, 0.1, 0.05, 0.08, 0.02])  # now class 4 is 6th
    m = compute_metrics(pred, "cross_entropy", [str(c) for c in range(7)])
    assert m["top5"] == pytest.approx(7 / 8)


def test_constant_predictions_warn_c05(caplog):
    pred = binary([0.9, 0.8, 0.95], [0, 1, 1])
    with caplog.at_level(logging.WARNING):
        compute_metrics(pred, "bce_with_logits", ["real", "fake"])
    assert "every sample was predicted as class 'fake'" in caplog.text


def test_duplicates_and_missing_samples_are_errors():
    pred = binary([0.1, 0.2], [0, 1])
    assert gather_predictions(pred, 2, "val").keys == ["k0", "k1"]
    with pytest.raises(RuntimeError, match="manifest lists 3"):
        gather_predictions(pred, 3, "val")
    twice = Predictions(["a", "a"], pred.probs, pred.labels)
    with pytest.raises(RuntimeError, match="scored twice"):
        gather_predictions(twice, 2, "val")
