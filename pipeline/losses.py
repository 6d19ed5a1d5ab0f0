"""Losses and the contract between the head, the loss and the labels.

Shapes: B batch, K = model.num_classes (the number of logits).

The one rule for targets: the shards store a class index per sample
(`labels_B`, int64); the loss decides how it is shaped and typed.
  - `bce_with_logits` and `bce` with K = 1: float targets shaped like the logits,
    `[B, 1]`, holding 0.0 or 1.0 (a `[B]` target against `[B, 1]` logits would
    broadcast to `[B, B]` and train on garbage, so it is never passed as is).
  - `cross_entropy` with K >= 2: the int64 class indices `[B]`.
`bce` applies the sigmoid itself and runs in float32 with autocast off, because
BCELoss is refused under autocast and is unstable in half precision.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError, LossConfig

log = logging.getLogger(__name__)

BINARY_LOSSES = ("bce_with_logits", "bce")


class HeadLoss(nn.Module):
    """The configured loss; takes logits `[B, K]` and class indices `[B]`."""

    def __init__(self, config: LossConfig, num_classes: int) -> None:
        super().__init__()
        self.name = config.name
        self.num_classes = num_classes
        self.label_smoothing = config.label_smoothing
        weight = torch.tensor(config.class_weights) if config.class_weights else None
        pos_weight = torch.tensor([config.pos_weight]) if config.pos_weight else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def targets(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Shape and type class indices for this loss (the one rule above)."""
        if self.name in BINARY_LOSSES:
            return labels_B.to(torch.float32).view(-1, 1)
        return labels_B.to(torch.long).view(-1)

    def forward(self, logits_BK: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        target = self.targets(labels_B)
        check_shapes(self.name, logits_BK, target)
        logits_BK = logits_BK.float()
        if self.name == "cross_entropy":
            return F.cross_entropy(
                logits_BK, target, weight=self.class_weight, label_smoothing=self.label_smoothing
            )
        if self.name == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(
                logits_BK, target, pos_weight=self.pos_weight
            )
        return self._bce(logits_BK, target)

    def _bce(self, logits_BK: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits_BK.device.type, enabled=False):
            probs = torch.sigmoid(logits_BK.float())
            weight = None
            if self.pos_weight is not None:
                # BCELoss has no pos_weight; weighting positive samples is the same thing.
                weight = 1 + (self.pos_weight - 1) * target
            return F.binary_cross_entropy(probs, target, weight=weight)


def check_shapes(name: str, logits_BK: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse a logits/target pair that would broadcast instead of matching."""
    if name in BINARY_LOSSES:
        ok = logits_BK.shape == target.shape
    else:
        ok = logits_BK.dim() == 2 and target.shape == logits_BK.shape[:1]
    if not ok:
        raise ValueError(
            f"loss {name}: logits of shape {tuple(logits_BK.shape)} do not fit targets of "
            f"shape {tuple(target.shape)} ({target.dtype}); check model.num_classes"
        )


def build_loss(config: LossConfig, num_classes: int) -> HeadLoss:
    if config.name == "bce":
        log.info("loss bce: sigmoid + BCELoss computed in float32 outside autocast")
    return HeadLoss(config, num_classes)


def probabilities(logits_BK: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Sigmoid for BCE heads, softmax for cross-entropy heads; float32 `[B, K]`."""
    logits_BK = logits_BK.float()
    if loss_name in BINARY_LOSSES:
        return torch.sigmoid(logits_BK)
    return torch.softmax(logits_BK, dim=1)


def positive_probability(probs_BK: torch.Tensor) -> torch.Tensor:
    """Probability of class 1 in a binary task, whatever the head: `[B]`."""
    return probs_BK[:, 0] if probs_BK.shape[1] == 1 else probs_BK[:, 1]


def check_contract(config: Config, num_classes_in_data: int, label_format: str) -> None:
    """Check model.num_classes, loss.* and the data's labels fit, before anything heavy.

    Raises ConfigError with every violation, each naming keys, values and the fix.
    """
    problems = _contract_problems(config, num_classes_in_data, label_format)
    if problems:
        raise ConfigError("head/loss/labels do not fit:\n  " + "\n  ".join(problems))


def _contract_problems(config: Config, classes: int, label_format: str) -> list[str]:
    k, loss = config.model.num_classes, config.loss
    problems = []
    if label_format != "index":
        problems.append(f"the shards' label_format={label_format!r} is not supported yet")
    if loss.name == "cross_entropy" and k < 2:
        problems.append(
            f"cross_entropy needs model.num_classes >= 2; got model.num_classes={k}. "
            "For one output use loss.name=bce_with_logits, or set model.num_classes=2"
        )
    elif loss.name == "cross_entropy" and k != classes:
        problems.append(
            f"model.num_classes={k} but the shards hold {classes} classes; "
            f"set model.num_classes={classes}"
        )
    if loss.name in BINARY_LOSSES and k == 1 and classes != 2:
        problems.append(
            f"loss.name={loss.name} with model.num_classes=1 is a binary head, but the shards "
            f"hold {classes} classes; use loss.name=cross_entropy model.num_classes={classes}"
        )
    if loss.name in BINARY_LOSSES and k > 1:
        problems.append(
            f"loss.name={loss.name} with model.num_classes={k} needs multi-hot labels, but the "
            "shards hold one class index per sample; use model.num_classes=1 for a binary "
            f"task or loss.name=cross_entropy for {classes} classes"
        )
    problems += _weight_problems(config, classes)
    return problems


def _weight_problems(config: Config, classes: int) -> list[str]:
    loss, problems = config.loss, []
    if loss.pos_weight is not None and loss.name == "cross_entropy":
        problems.append(
            "loss.pos_weight applies to bce_with_logits and bce; "
            "for cross_entropy use loss.class_weights"
        )
    if loss.class_weights is not None and loss.name != "cross_entropy":
        problems.append(
            f"loss.class_weights applies to cross_entropy; for loss.name={loss.name} "
            "use loss.pos_weight"
        )
    elif loss.class_weights is not None and len(loss.class_weights) != classes:
        problems.append(
            f"loss.class_weights has {len(loss.class_weights)} values; "
            f"the shards hold {classes} classes, give one weight per class"
        )
    if loss.label_smoothing and loss.name != "cross_entropy":
        problems.append("loss.label_smoothing applies to cross_entropy only; set it to 0")
    return problems
