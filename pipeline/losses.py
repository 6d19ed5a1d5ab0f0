"""Losses, and the contract between the head, the loss and the labels.

Shapes: B batch, K = model.num_classes (logits), C = classes in the shards.

The one rule for targets (labels as the loader gives them, see
pipeline/data/labels.py, become what the loss needs):

  label_format   bce_with_logits / bce                cross_entropy
  index          K=1, C=2: float [B, 1]               K=C: int64 [B]
  binary_float   K=1: float [B, 1]                    K=2: int64 [B]
  one_hot        K=1, C=2: column 1 as [B, 1];        K=C: int64 argmax [B]
                 K=C: float [B, K] (one-vs-rest)
  multi_hot      K=C: float [B, K] (multi-label)      refused: several positives

Anything else is refused by `check_contract` before the model is built. A `[B]`
target is never passed against `[B, 1]` logits: that broadcasts to `[B, B]` and
trains on garbage. `bce` applies the sigmoid itself and runs in float32 with
autocast off, because BCELoss is refused under autocast and is unstable in half
precision; it is numerically weaker than `bce_with_logits` (log of a rounded
probability), which should be preferred.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)

BINARY_LOSSES = ("bce_with_logits", "bce")


class HeadLoss(nn.Module):
    """The configured loss; takes logits `[B, K]` and labels as the loader gives them."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        label_format: str = "index",
        pos_weight: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.label_format = label_format
        self.label_smoothing = label_smoothing
        pos = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("pos_weight", pos, persistent=False)
        self.register_buffer("class_weight", weight, persistent=False)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return to_targets(labels, self.name, self.num_classes, self.label_format)

    def forward(self, logits_BK: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = self.targets(labels)
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


def to_targets(labels: torch.Tensor, loss: str, k: int, label_format: str) -> torch.Tensor:
    """The one rule of the module docstring, applied to a batch of labels."""
    if loss == "cross_entropy":
        if label_format == "one_hot":
            return labels.argmax(dim=1)
        if label_format == "multi_hot":
            raise ValueError("cross_entropy cannot take multi-hot labels")
        return labels.round().long().view(-1) if labels.is_floating_point() else labels.view(-1)
    if labels.dim() == 1:
        return labels.float().view(-1, 1)
    if k == 1 and labels.shape[1] == 2:
        return labels[:, 1:].float()
    return labels.float()


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


def build_loss(config: Config, label_format: str, class_counts: Sequence[int] = (),
               num_samples: int = 0) -> HeadLoss:
    """The loss of the config; `pos_weight: auto` is worked out from the manifest counts."""
    loss = config.loss
    if loss.name == "bce" and config.train.mixed_precision != "no":
        log.info("loss bce: sigmoid + BCELoss run in float32 outside autocast (%s)",
                 config.train.mixed_precision)
    pos_weight = resolve_pos_weight(config, class_counts, num_samples)
    return HeadLoss(loss.name, config.model.num_classes, label_format, pos_weight,
                    loss.class_weights, loss.label_smoothing)


def resolve_pos_weight(config: Config, class_counts: Sequence[int],
                       num_samples: int) -> list[float] | None:
    value = config.loss.pos_weight
    if value is None:
        return None
    if value != "auto":
        return [float(value)] if isinstance(value, (int, float)) else list(value)
    positives = _positive_counts(config.model.num_classes, class_counts, num_samples)
    if any(p == 0 or p == num_samples for p in positives):
        raise ConfigError(
            f"loss.pos_weight=auto: a class has no positives or no negatives in the training "
            f"shards (counts {list(class_counts)}); set loss.pos_weight to a number"
        )
    weights = [(num_samples - p) / p for p in positives]
    log.info("loss.pos_weight=auto -> %s (negatives / positives)",
             [round(w, 4) for w in weights])
    return weights


def _positive_counts(k: int, class_counts: Sequence[int], num_samples: int) -> list[int]:
    # One logit: the positive class is class 1 (of 2) or the only class of a vector.
    if k == 1:
        return [class_counts[1] if len(class_counts) == 2 else class_counts[0]]
    return list(class_counts)


def prior_logits(config: Config, class_counts: Sequence[int], num_samples: int) -> torch.Tensor:
    """Head bias that makes the untrained model predict the class prior."""
    k = config.model.num_classes
    if config.loss.name == "cross_entropy":
        freq = [max(c, 1) / num_samples for c in class_counts]
        return torch.tensor([math.log(f) for f in freq])
    positives = _positive_counts(k, class_counts, num_samples)
    rates = [min(max(p / num_samples, 1e-4), 1 - 1e-4) for p in positives]
    return torch.tensor([math.log(r / (1 - r)) for r in rates])


def probabilities(logits_BK: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Sigmoid for BCE heads, softmax for cross-entropy heads; float32 `[B, K]`."""
    logits_BK = logits_BK.float()
    if loss_name in BINARY_LOSSES:
        return torch.sigmoid(logits_BK)
    return torch.softmax(logits_BK, dim=1)


def positive_probability(probs_BK: torch.Tensor) -> torch.Tensor:
    """Probability of class 1 in a binary task, whatever the head: `[B]`."""
    return probs_BK[:, 0] if probs_BK.shape[1] == 1 else probs_BK[:, 1]


def check_contract(config: Config, num_classes_in_data: int, label_format: str,
                   cuda_available: bool | None = None) -> None:
    """Check model.num_classes, loss.*, the labels and precision fit, before anything heavy.

    Raises ConfigError listing every violation, each naming keys, values and the fix.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    problems = _head_problems(config, num_classes_in_data, label_format)
    problems += _weight_problems(config, num_classes_in_data)
    if config.train.mixed_precision == "fp16" and not cuda_available:
        problems.append(
            "train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=no"
        )
    if problems:
        raise ConfigError("head/loss/labels do not fit:\n  " + "\n  ".join(problems))


def _head_problems(config: Config, c: int, label_format: str) -> list[str]:
    k, name = config.model.num_classes, config.loss.name
    fmt = f"the shards' label_format={label_format}"
    if name == "cross_entropy":
        if k < 2:
            return [f"cross_entropy needs model.num_classes >= 2; got model.num_classes={k}. "
                    "For one output use loss.name=bce_with_logits, or set model.num_classes=2"]
        if label_format == "multi_hot":
            return [f"loss.name=cross_entropy cannot learn {fmt} (several positives per "
                    f"sample); use loss.name=bce_with_logits with model.num_classes={c}"]
        return [] if k == c else [f"model.num_classes={k} but the shards hold {c} classes; "
                                  f"set model.num_classes={c}"]
    return _bce_problems(name, k, c, label_format, fmt)


def _bce_problems(name: str, k: int, c: int, label_format: str, fmt: str) -> list[str]:
    if label_format in ("index", "binary_float", "one_hot") and k == 1:
        return [] if c == 2 else [
            f"loss.name={name} with model.num_classes=1 is a binary head, but the shards "
            f"hold {c} classes; use loss.name=cross_entropy model.num_classes={c}"]
    if label_format in ("index", "binary_float"):
        return [f"loss.name={name} with model.num_classes={k} needs 0/1 label vectors, but "
                f"{fmt} holds one class per sample; use model.num_classes=1 for a binary "
                f"task or loss.name=cross_entropy model.num_classes={c}"]
    if k != c:
        return [f"model.num_classes={k} but {fmt} has {c} labels per sample; "
                f"set model.num_classes={c}"]
    return []


def _weight_problems(config: Config, c: int) -> list[str]:
    loss, k, problems = config.loss, config.model.num_classes, []
    if loss.pos_weight is not None and loss.name == "cross_entropy":
        problems.append("loss.pos_weight applies to bce_with_logits and bce; "
                        "for cross_entropy use loss.class_weights")
    elif isinstance(loss.pos_weight, list) and len(loss.pos_weight) != k:
        problems.append(f"loss.pos_weight has {len(loss.pos_weight)} values for "
                        f"model.num_classes={k}; give one per output, or a number, or auto")
    if loss.class_weights is not None and loss.name != "cross_entropy":
        problems.append(f"loss.class_weights applies to cross_entropy; for "
                        f"loss.name={loss.name} use loss.pos_weight")
    elif loss.class_weights is not None and len(loss.class_weights) != c:
        problems.append(f"loss.class_weights has {len(loss.class_weights)} values; the "
                        f"shards hold {c} classes, give one weight per class")
    if loss.label_smoothing and loss.name != "cross_entropy":
        problems.append("loss.label_smoothing applies to cross_entropy only; set it to 0")
    return problems
