"""wandb charts of one evaluation: PR and ROC curves, confusion matrix, results, samples.

Built on the main process from the gathered predictions, only when wandb is on.
Curves are interpolated at CURVE_POINTS points, so a chart costs one sort per
class whatever the size of the set, and needs no pandas (wandb.plot's own curve
helpers import it). Charts use wandb's stock Vega specs, as wandb.plot does.

Legend: N samples, K outputs, S image side.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from pipeline.evaluate import Predictions, binary_scores, class_indices, task_of

CURVE_POINTS = 101
MAX_CURVE_CLASSES = 10  # one-vs-rest curves beyond this many classes are unreadable
MAX_MATRIX_CLASSES = 50  # a K x K table grows fast; larger heads keep the numbers only
SAMPLE_IMAGES = 16
CURVE_SPEC = "wandb/area-under-curve/v0"
MATRIX_SPEC = "wandb/confusion_matrix/v1"


def eval_media(results: dict[str, dict[str, Any]], preds: dict[str, Predictions],
               class_names: list[str], loss_name: str) -> dict[str, Any]:
    """Charts for every eval set, keyed `eval/<set>/<chart>`, plus `eval/results`."""
    import wandb

    media: dict[str, Any] = {"eval/results": results_table(wandb, results)}
    for name, pred in preds.items():
        threshold = results[name].get("threshold", 0.5)
        media.update(set_charts(wandb, name, pred, class_names, loss_name, threshold))
    return media


def set_charts(wandb: Any, name: str, pred: Predictions, class_names: list[str],
               loss_name: str, threshold: float) -> dict[str, Any]:
    task = task_of(loss_name, pred.probs.shape[1])
    columns = curve_columns(pred, task, class_names)
    charts = {}
    if columns:
        rows = [[c, *p] for c, y, s in columns for p in pr_points(y, s)]
        charts[f"eval/{name}/pr_curve"] = curve_chart(
            wandb, rows, "recall", "precision", f"PR curve ({name})")
    if task == "binary" and columns:
        rows = [[c, *p] for c, y, s in columns for p in roc_points(y, s)]
        charts[f"eval/{name}/roc_curve"] = curve_chart(
            wandb, rows, "fpr", "tpr", f"ROC curve ({name})")
    if task != "multilabel" and len(class_names) <= MAX_MATRIX_CLASSES:
        predicted = predicted_classes(pred, task, threshold)
        charts[f"eval/{name}/confusion_matrix"] = matrix_chart(
            wandb, class_indices(pred.labels), predicted, class_names, name)
    return charts


def curve_columns(pred: Predictions, task: str,
                  class_names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(class name, 0/1 truth [N], score [N]) for each class a curve is drawn for."""
    if task == "binary":
        pairs = [(class_names[1], class_indices(pred.labels) == 1, binary_scores(pred.probs))]
    elif task == "multiclass":
        labels = class_indices(pred.labels)
        pairs = [(n, labels == k, pred.probs[:, k]) for k, n in enumerate(class_names)]
    else:
        pairs = [(n, pred.labels[:, k] > 0.5, pred.probs[:, k]) for k, n in enumerate(class_names)]
    # A curve needs both outcomes present
    defined = [(n, y.astype(np.int64), s) for n, y, s in pairs if 0 < y.sum() < len(y)]
    return defined[:MAX_CURVE_CLASSES]


def pr_points(truth: np.ndarray, score: np.ndarray) -> list[tuple[float, float]]:
    """(recall, precision) at CURVE_POINTS recalls; precision is the best at that recall
    or above (the usual interpolation, which also makes the curve monotone)."""
    precision, recall, _ = precision_recall_curve(truth, score)
    order = np.argsort(recall, kind="stable")
    recall, precision = recall[order], precision[order]
    best_above = np.maximum.accumulate(precision[::-1])[::-1]
    grid = np.linspace(0, 1, CURVE_POINTS)
    index = np.minimum(np.searchsorted(recall, grid, side="left"), len(recall) - 1)
    return [(round(float(r), 4), round(float(p), 4)) for r, p in zip(grid, best_above[index])]


def roc_points(truth: np.ndarray, score: np.ndarray) -> list[tuple[float, float]]:
    """(fpr, tpr) at CURVE_POINTS false-positive rates: the best TPR at that FPR or below."""
    fpr, tpr, _ = roc_curve(truth, score)
    grid = np.linspace(0, 1, CURVE_POINTS)
    index = np.searchsorted(fpr, grid, side="right") - 1
    return [(round(float(f), 4), round(float(t), 4)) for f, t in zip(grid, tpr[index])]


def predicted_classes(pred: Predictions, task: str, threshold: float) -> np.ndarray:
    if task == "binary":
        return (binary_scores(pred.probs) >= threshold).astype(np.int64)
    return pred.probs.argmax(axis=1)


def curve_chart(wandb: Any, rows: list[list[Any]], x: str, y: str, title: str) -> Any:
    table = wandb.Table(columns=["class", x, y], data=rows)
    return wandb.plot_table(
        CURVE_SPEC, table, {"x": x, "y": y, "class": "class"},
        {"title": title, "x-axis-title": x, "y-axis-title": y},
    )


def matrix_chart(wandb: Any, labels: np.ndarray, predicted: np.ndarray,
                 class_names: list[str], name: str) -> Any:
    """Rows: true class, columns: predicted, as in evaluate's confusion_matrix."""
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(class_names))))
    rows = [[class_names[i], class_names[j], int(matrix[i, j])]
            for i in range(len(class_names)) for j in range(len(class_names))]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table(MATRIX_SPEC, table, fields, {"title": f"Confusion matrix ({name})"})


def results_table(wandb: Any, results: dict[str, dict[str, Any]]) -> Any:
    """One row per eval set, one column per scalar metric any set has."""
    columns = list(dict.fromkeys(
        key for metrics in results.values() for key, value in metrics.items()
        if isinstance(value, (int, float)) or value is None))
    rows = [[name, *(_number(metrics.get(key)) for key in columns)]
            for name, metrics in results.items()]
    return wandb.Table(columns=["set", *columns], data=rows)


def _number(value: Any) -> float | None:
    # One type per column: ints and floats become floats, missing values None
    return None if value is None else float(value)


def sample_images(batch: dict[str, Any], pred: Predictions, class_names: list[str],
                  loss_name: str) -> list[Any]:
    """The batch's images with the model's probabilities as captions (first SAMPLE_IMAGES)."""
    import wandb

    task = task_of(loss_name, pred.probs.shape[1])
    images = []
    for image_3SS, key in list(zip(batch["image"], batch["key"]))[:SAMPLE_IMAGES]:
        index = bisect.bisect_left(pred.keys, key)  # gather_predictions sorts the keys
        if index == len(pred.keys) or pred.keys[index] != key:
            continue
        caption = _caption(pred.probs[index], pred.labels[index], class_names, task)
        # The loader's images are uint8 until the model's device normalizes them
        pixels_SS3 = image_3SS.permute(1, 2, 0).numpy()
        images.append(wandb.Image(pixels_SS3, caption=caption))
    return images


def _caption(probs_K: np.ndarray, label: Any, class_names: list[str], task: str) -> str:
    if task == "binary":
        score = float(binary_scores(probs_K[None])[0])
        truth = class_names[int(class_indices(np.asarray(label)[None])[0])]
        return f"p({class_names[1]})={score:.2f} | true {truth}"
    if task == "multiclass":
        best = int(probs_K.argmax())
        truth = class_names[int(class_indices(np.asarray(label)[None])[0])]
        return f"{class_names[best]} {probs_K[best]:.2f} | true {truth}"
    best = int(probs_K.argmax())
    return f"{class_names[best]} {probs_K[best]:.2f}"
