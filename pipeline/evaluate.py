"""Evaluation: score every sample of each eval set exactly once, then compute metrics.

Each rank scores its own shards; predictions are gathered with their sample keys,
checked for duplicates and counted against the manifest, so 1 and N processes
give the same numbers. Metrics come from scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from pipeline.losses import BINARY_LOSSES, positive_probability, probabilities

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Scores of one eval set: keys `[N]`, class-probabilities `[N, K]`, labels `[N]`."""

    keys: list[str]
    probs: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def predict(model: nn.Module, loader: Any, loss_name: str, device: torch.device) -> Predictions:
    """Score this rank's share of an eval set. `model` must be unwrapped (no DDP)."""
    was_training = model.training
    model.eval()
    keys, probs, labels = [], [], []
    for batch in loader:
        logits = model(batch["image"].to(device, non_blocking=True))
        probs.append(probabilities(logits, loss_name).cpu())
        labels.append(batch["label"].cpu())
        keys.extend(batch["key"])
    model.train(was_training)
    k = model.fc.out_features if hasattr(model, "fc") else 1
    return Predictions(
        keys=keys,
        probs=torch.cat(probs).numpy() if probs else np.zeros((0, k), np.float32),
        labels=torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64),
    )


def gather_predictions(local: Predictions, expected: int, set_name: str) -> Predictions:
    """Collect every rank's predictions; refuse duplicates and a total off the manifest."""
    parts = [local]
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    keys = [key for part in parts for key in part.keys]
    if len(set(keys)) != len(keys):
        dupes = len(keys) - len(set(keys))
        raise RuntimeError(f"eval set {set_name!r}: {dupes} samples were scored twice")
    if len(keys) != expected:
        raise RuntimeError(
            f"eval set {set_name!r}: scored {len(keys)} samples, the manifest lists {expected}"
        )
    order = np.argsort(keys)
    probs = np.concatenate([p.probs for p in parts])[order]
    labels = np.concatenate([p.labels for p in parts])[order]
    return Predictions(keys=[keys[i] for i in order], probs=probs, labels=labels)


def compute_metrics(
    pred: Predictions, loss_name: str, class_names: list[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics for the head: binary (AP, ROC-AUC, per-class accuracy) or multiclass."""
    binary = loss_name in BINARY_LOSSES or pred.probs.shape[1] == 2
    if binary:
        predicted = (positive_probability(torch.from_numpy(pred.probs)) >= threshold).numpy()
        metrics = _binary_metrics(pred, predicted.astype(np.int64), threshold)
    else:
        predicted = pred.probs.argmax(axis=1)
        metrics = _multiclass_metrics(pred, predicted)
    metrics["per_class_accuracy"] = _per_class_accuracy(pred.labels, predicted, class_names)
    metrics["num_samples"] = len(pred.keys)
    _warn_if_constant(predicted, class_names)
    return metrics


def _binary_metrics(pred: Predictions, predicted: np.ndarray, threshold: float) -> dict:
    score = positive_probability(torch.from_numpy(pred.probs)).numpy()
    both = len(np.unique(pred.labels)) == 2
    return {
        "accuracy": float((predicted == pred.labels).mean()),
        "ap": float(average_precision_score(pred.labels, score)) if both else None,
        "roc_auc": float(roc_auc_score(pred.labels, score)) if both else None,
        "threshold": threshold,
    }


def _multiclass_metrics(pred: Predictions, predicted: np.ndarray) -> dict:
    metrics = {"accuracy": float((predicted == pred.labels).mean())}
    if pred.probs.shape[1] > 5:
        top5 = np.argsort(-pred.probs, axis=1)[:, :5]
        metrics["top5"] = float((top5 == pred.labels[:, None]).any(axis=1).mean())
    return metrics


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


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A short fixed-width table: one row per eval set."""
    lines = [f"{'set':<12} {'n':>6} {'acc':>7} {'ap':>7} {'roc_auc':>7}  per-class accuracy"]
    for name, m in results.items():
        per_class = ", ".join(f"{c}={_fmt(v)}" for c, v in m["per_class_accuracy"].items())
        lines.append(
            f"{name:<12} {m['num_samples']:>6} {_fmt(m['accuracy']):>7} "
            f"{_fmt(m.get('ap')):>7} {_fmt(m.get('roc_auc')):>7}  {per_class}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`pipeline eval`: evaluate a run's checkpoint on its (or the given) eval sets."""
    from pipeline.train import evaluate_run

    sets = dict(item.split("=", 1) for item in args.set) if args.set else None
    results = evaluate_run(Path(args.run), args.checkpoint, sets, args.override)
    log.info("results:\n%s", summary_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pipeline eval")
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the latest)")
    parser.add_argument(
        "--set", action="append", metavar="NAME=SHARDS", help="eval set; repeatable"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("override", nargs="*", help="config overrides key.sub=value")
    return parser
