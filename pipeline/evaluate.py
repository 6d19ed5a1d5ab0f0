"""Evaluation: score every sample of each eval set exactly once, then compute metrics.

Each rank scores its own shards; predictions are gathered with their sample keys,
checked for duplicates and counted against the manifest, so 1 and N processes
give the same numbers. Metrics come from scikit-learn.

Tasks, from the head and the loss:
  binary      one logit (BCE losses) or two logits (cross_entropy): accuracy at
              eval.threshold, per-class accuracy, AP, ROC-AUC, and accuracy at a
              threshold calibrated on eval.calibration_set
  multiclass  cross_entropy with K > 2: top-1, top-5 (K > 5), per-class accuracy,
              confusion matrix (rows: true class, columns: predicted)
  multilabel  BCE losses with K > 1: mean AP, per-label AP, per-label accuracy
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve
from torch import nn

from pipeline.config import ConfigError
from pipeline.losses import BINARY_LOSSES, probabilities

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Scores of one eval set: keys `[N]`, probabilities `[N, K]`, labels `[N]` or `[N, C]`."""

    keys: list[str]
    probs: np.ndarray
    labels: np.ndarray


def task_of(loss_name: str, num_outputs: int) -> str:
    if loss_name in BINARY_LOSSES:
        return "binary" if num_outputs == 1 else "multilabel"
    return "binary" if num_outputs == 2 else "multiclass"


@torch.no_grad()
def predict(model: nn.Module, loader: Any, loss_name: str, device: torch.device) -> Predictions:
    """Score this rank's share of an eval set. `model` must be unwrapped (no DDP)."""
    was_training = model.training
    model.eval()
    keys, probs, labels = [], [], []
    for batch in loader:
        logits = model(loader.normalize(batch["image"].to(device, non_blocking=True)))
        probs.append(probabilities(logits, loss_name).cpu())
        labels.append(batch["label"].cpu())
        keys.extend(batch["key"])
    model.train(was_training)
    if not keys:
        width = model.fc.out_features if hasattr(model, "fc") else 1
        return Predictions([], np.zeros((0, width), np.float32), np.zeros((0,), np.int64))
    return Predictions(keys, torch.cat(probs).numpy(), torch.cat(labels).numpy())


def gather_predictions(local: Predictions, expected: int, set_name: str) -> Predictions:
    """Collect every rank's predictions; refuse duplicates and a total off the manifest."""
    parts = [local]
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    parts = [p for p in parts if p.keys]
    keys = [key for part in parts for key in part.keys]
    if len(set(keys)) != len(keys):
        dupes = len(keys) - len(set(keys))
        raise RuntimeError(f"eval set {set_name!r}: {dupes} samples were scored twice")
    if len(keys) != expected:
        raise ConfigError(
            f"eval set {set_name!r}: scored {len(keys)} samples, but its manifest lists "
            f"{expected}; check the set with `pipeline verify` or rewrite it"
        )
    order = np.argsort(keys)
    probs = np.concatenate([p.probs for p in parts])[order]
    labels = np.concatenate([p.labels for p in parts])[order]
    return Predictions(keys=[keys[i] for i in order], probs=probs, labels=labels)


def class_indices(labels: np.ndarray) -> np.ndarray:
    """Single-label targets as class indices, whatever the label format."""
    if labels.ndim == 2:
        return labels[:, 0].round().astype(np.int64) if labels.shape[1] == 1 else \
            labels.argmax(axis=1)
    return labels.round().astype(np.int64)


def binary_scores(probs: np.ndarray) -> np.ndarray:
    """Positive-class probability: sigmoid(z) for one logit, softmax(z)[:, 1] for two."""
    return probs[:, 0] if probs.shape[1] == 1 else probs[:, 1]


def compute_metrics(
    pred: Predictions,
    loss_name: str,
    class_names: list[str],
    threshold: float = 0.5,
    calibrated_threshold: float | None = None,
) -> dict[str, Any]:
    """Metrics for the head's task (see the module docstring)."""
    task = task_of(loss_name, pred.probs.shape[1])
    if task == "multilabel":
        return _multilabel_metrics(pred, class_names, threshold)
    labels = class_indices(pred.labels)
    if task == "binary":
        metrics = _binary_metrics(binary_scores(pred.probs), labels, class_names, threshold)
        if calibrated_threshold is not None:
            calibrated = _binary_metrics(binary_scores(pred.probs), labels, class_names,
                                         calibrated_threshold)
            metrics["calibrated_threshold"] = calibrated_threshold
            metrics["calibrated_accuracy"] = calibrated["accuracy"]
            metrics["calibrated_per_class_accuracy"] = calibrated["per_class_accuracy"]
    else:
        metrics = _multiclass_metrics(pred.probs, labels, class_names)
    metrics["num_samples"] = len(pred.keys)
    return metrics


def _binary_metrics(score, labels, class_names, threshold) -> dict[str, Any]:
    predicted = (score >= threshold).astype(np.int64)
    both = len(np.unique(labels)) == 2
    _warn_if_constant(predicted, class_names)
    return {
        "accuracy": float((predicted == labels).mean()),
        "ap": float(average_precision_score(labels, score)) if both else None,
        "roc_auc": float(roc_auc_score(labels, score)) if both else None,
        "threshold": threshold,
        "per_class_accuracy": _per_class_accuracy(labels, predicted, class_names),
    }


def _multiclass_metrics(probs, labels, class_names) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    _warn_if_constant(predicted, class_names)
    metrics: dict[str, Any] = {"accuracy": float((predicted == labels).mean())}
    if probs.shape[1] > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        metrics["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    metrics["per_class_accuracy"] = _per_class_accuracy(labels, predicted, class_names)
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(class_names))))
    metrics["confusion_matrix"] = matrix.tolist()
    return metrics


def _multilabel_metrics(pred: Predictions, class_names, threshold) -> dict[str, Any]:
    labels = pred.labels.round().astype(np.int64)
    predicted = (pred.probs >= threshold).astype(np.int64)
    per_label_ap, per_label_acc = {}, {}
    for index, name in enumerate(class_names):
        column = labels[:, index]
        both = len(np.unique(column)) == 2
        per_label_ap[name] = (
            float(average_precision_score(column, pred.probs[:, index])) if both else None
        )
        per_label_acc[name] = float((predicted[:, index] == column).mean())
    defined = [v for v in per_label_ap.values() if v is not None]
    return {
        "accuracy": float(np.mean(list(per_label_acc.values()))),
        "mean_ap": float(np.mean(defined)) if defined else None,
        "per_label_ap": per_label_ap,
        "per_class_accuracy": per_label_acc,
        "threshold": threshold,
        "num_samples": len(pred.keys),
    }


def _per_class_accuracy(labels, predicted, class_names) -> dict[str, float | None]:
    result = {}
    for index, name in enumerate(class_names):
        mask = labels == index
        result[name] = float((predicted[mask] == index).mean()) if mask.any() else None
    return result


def _warn_if_constant(predicted: np.ndarray, class_names: list[str]) -> None:
    # One class for every sample means a dead head (e.g. softmax over one logit).
    values = np.unique(predicted)
    if len(predicted) > 1 and len(values) == 1:
        log.warning(
            "every sample was predicted as class %r; the model has not learned to separate "
            "the classes (check the head, the loss and the learning rate)",
            class_names[int(values[0])],
        )


def calibrate_threshold(pred: Predictions, method: str, target_fpr: float = 0.05) -> float | None:
    """Choose a threshold on a validation set: best balanced accuracy, or a target FPR.

    A sample is positive when its score >= the threshold, as in `roc_curve`.
    """
    labels = class_indices(pred.labels)
    if method == "none" or len(np.unique(labels)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(labels, binary_scores(pred.probs))
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "balanced_accuracy":
        # Balanced accuracy is (TPR + 1 - FPR) / 2: maximise TPR - FPR.
        best = int(np.argmax(tpr - fpr))
    else:
        allowed = np.flatnonzero(fpr <= target_fpr)
        best = int(allowed[np.argmax(tpr[allowed])]) if len(allowed) else 0
    return float(thresholds[best])


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A short fixed-width table: one row per eval set."""
    lines = [f"{'set':<12} {'n':>6} {'acc':>7} {'ap':>7} {'roc_auc':>7} {'cal_acc':>7}"
             "  per-class accuracy"]
    for name, m in results.items():
        per_class = ", ".join(f"{c}={_fmt(v)}" for c, v in m["per_class_accuracy"].items())
        ap = m.get("ap", m.get("mean_ap"))
        lines.append(
            f"{name:<12} {m['num_samples']:>6} {_fmt(m['accuracy']):>7} {_fmt(ap):>7} "
            f"{_fmt(m.get('roc_auc')):>7} {_fmt(m.get('calibrated_accuracy')):>7}  {per_class}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_results(results: dict[str, dict[str, Any]], stem: Path) -> None:
    """Write `<stem>.json` (everything) and `<stem>.csv` (one row per eval set)."""
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    rows = [_csv_row(name, m) for name, m in results.items()]
    columns = list(dict.fromkeys(col for row in rows for col in row))
    with stem.with_suffix(".csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _csv_row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"set": name}
    for key, value in metrics.items():
        if isinstance(value, dict):
            row.update({f"{key}/{sub}": v for sub, v in value.items()})
        elif not isinstance(value, list):
            row[key] = value
    return row


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`pipeline eval`: evaluate a run's checkpoint on its (or the given) eval sets."""
    from pipeline.train import evaluate_run

    sets = dict(_named_set(item) for item in args.set) if args.set else None
    results = evaluate_run(Path(args.run_dir), args.checkpoint, sets, args.override)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _named_set(item: str) -> tuple[str, str]:
    name, sep, shards = item.partition("=")
    if not sep or not name or not shards:
        raise ConfigError(f"--set {item!r} is not of the form NAME=SHARDS")
    return name, shards


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pipeline eval")
    parser.add_argument("--run-dir", required=True, help="run folder (holds config.yaml)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the latest)")
    parser.add_argument(
        "--set", action="append", metavar="NAME=SHARDS", help="eval set; repeatable"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("override", nargs="*", help="config overrides key.sub=value")
    return parser


if __name__ == "__main__":
    import sys

    sys.exit(main())
