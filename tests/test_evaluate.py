"""Metrics worked out by hand, and the exactly-once checks on gathered predictions."""

import csv
import logging

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from pipeline.config import ConfigError
from pipeline.evaluate import (
    Predictions,
    calibrate_threshold,
    compute_metrics,
    gather_predictions,
    write_results,
)


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
    with pytest.raises(ConfigError, match="manifest lists 3"):
        gather_predictions(pred, 3, "val")
    twice = Predictions(["a", "a"], pred.probs, pred.labels)
    with pytest.raises(RuntimeError, match="scored twice"):
        gather_predictions(twice, 2, "val")


def test_calibrated_threshold_by_hand():
    # Negatives 0.1 0.2 0.3 0.45, positives 0.4 0.6 0.7. Threshold 0.6: TPR 2/3,
    # FPR 0, so TPR - FPR = 0.667; threshold 0.4: TPR 1, FPR 1/4 -> 0.75, the best.
    # With at most 10% false positives, 0.6 is the threshold that catches the most.
    pred = binary([0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7], [0, 0, 0, 0, 1, 1, 1])
    assert calibrate_threshold(pred, "balanced_accuracy") == pytest.approx(0.4)
    assert calibrate_threshold(pred, "target_fpr", target_fpr=0.1) == pytest.approx(0.6)
    assert calibrate_threshold(pred, "none") is None
    m = compute_metrics(pred, "bce_with_logits", ["real", "fake"], 0.5, 0.4)
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["calibrated_threshold"] == 0.4
    assert m["calibrated_accuracy"] == pytest.approx(6 / 7)
    assert m["calibrated_per_class_accuracy"] == {"real": 0.75, "fake": 1.0}


def test_multilabel_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(50, 2)).astype(np.float32)
    probs = np.clip(labels * 0.6 + rng.random((50, 2)) * 0.5, 0, 1).astype(np.float32)
    pred = Predictions([str(i) for i in range(50)], probs, labels)
    m = compute_metrics(pred, "bce_with_logits", ["even", "big"], threshold=0.5)
    ap = [average_precision_score(labels[:, j], probs[:, j]) for j in range(2)]
    assert m["per_label_ap"] == {"even": pytest.approx(ap[0]), "big": pytest.approx(ap[1])}
    assert m["mean_ap"] == pytest.approx(np.mean(ap))
    acc = ((probs >= 0.5) == labels).mean(axis=0)
    assert m["per_class_accuracy"]["big"] == pytest.approx(acc[1])


def test_confusion_matrix_rows_true_columns_predicted():
    probs = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    pred = Predictions(list("abcd"), probs, np.array([0, 1, 2, 2]))
    m = compute_metrics(pred, "cross_entropy", ["x", "y", "z"])
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert "top5" not in m  # K = 3


def test_results_table_has_one_row_per_set(tmp_path):
    pred = binary([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    metrics = compute_metrics(pred, "bce_with_logits", ["real", "fake"])
    write_results({"progan": metrics, "stylegan": metrics}, tmp_path / "eval")
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [r["set"] for r in rows] == ["progan", "stylegan"]
    assert float(rows[0]["roc_auc"]) == pytest.approx(0.75)
    assert rows[1]["per_class_accuracy/fake"] == "0.5"
