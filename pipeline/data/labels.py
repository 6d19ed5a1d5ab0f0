"""Label formats a shard set may carry, as recorded in its manifest (`label_format`).

Each sample stores its label as text in the `<key>.cls` member:
  index         "3"          one class index                -> int64 scalar
  binary_float  "1.0"        0.0 or 1.0 (a binary task)     -> float32 scalar
  one_hot       "0,0,1,0"    C values, exactly one is 1     -> float32 [C]
  multi_hot     "1,0,1,0"    C values, each 0 or 1          -> float32 [C]
How a format becomes the loss's targets is one rule, in `pipeline.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LABEL_FORMATS = ("index", "binary_float", "one_hot", "multi_hot")
VECTOR_FORMATS = ("one_hot", "multi_hot")

Label = int | float | tuple[float, ...]


def parse_label(text: str, label_format: str, num_classes: int | None) -> Label:
    """Parse a `.cls` text; raise ValueError saying what is wrong with it."""
    if label_format == "index":
        value = int(text)
        if num_classes is not None and not 0 <= value < num_classes:
            raise ValueError(f"label {value} is outside 0..{num_classes - 1}")
        return value
    if label_format == "binary_float":
        value = float(text)
        if value not in (0.0, 1.0):
            raise ValueError(f"label {text!r} is not 0 or 1")
        return value
    if label_format in VECTOR_FORMATS:
        return _parse_vector(text, label_format, num_classes)
    raise ValueError(f"unknown label_format {label_format!r}; one of {LABEL_FORMATS}")


def _parse_vector(text: str, label_format: str, num_classes: int | None) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(","))
    if num_classes is not None and len(values) != num_classes:
        raise ValueError(f"label {text!r} has {len(values)} values, not {num_classes}")
    if any(v not in (0.0, 1.0) for v in values):
        raise ValueError(f"label {text!r} holds values other than 0 and 1")
    if label_format == "one_hot" and sum(values) != 1:
        raise ValueError(f"one-hot label {text!r} does not have exactly one 1")
    return values


def format_label(label: int | Sequence[int]) -> str:
    """The `.cls` text of a class index or a 0/1 vector."""
    if isinstance(label, int):
        return str(label)
    return ",".join(str(int(v)) for v in label)


def collate_labels(labels: Sequence[Label], label_format: str) -> torch.Tensor:
    """Stack a batch: int64 `[B]`, float32 `[B]`, or float32 `[B, C]` for vectors."""
    if label_format == "index":
        return torch.tensor(labels, dtype=torch.int64)
    return torch.tensor(labels, dtype=torch.float32)
