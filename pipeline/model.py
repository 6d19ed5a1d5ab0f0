"""The network: a torchvision ResNet whose head emits `num_classes` logits.

Activations never live here. Sigmoid and softmax belong to the loss and to the
prediction code, so a model can not apply one twice (case C-06).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


def build_model(config: ModelConfig) -> nn.Module:
    """Build the backbone with a fresh head; load initial weights from a local file if set."""
    builder = getattr(torchvision.models, config.arch)
    model = builder(weights=None, num_classes=config.num_classes)
    if config.weights is not None:
        load_initial_weights(model, Path(config.weights))
    return model


def init_head_bias(model: nn.Module, bias_K: torch.Tensor) -> None:
    """Set the final layer's bias, e.g. to the class prior's log-odds."""
    with torch.no_grad():
        model.fc.bias.copy_(bias_K.to(model.fc.bias.dtype))
    log.info("head bias initialised from the class prior: %s", bias_K.tolist())


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict from `path`; a head of another shape is left freshly initialised.

    That lets an ImageNet checkpoint (1000 classes) start a one-logit detector.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    if not usable:
        raise ConfigError(
            f"model.weights={str(path)!r} shares no tensor with {type(model).__name__}; "
            "is it a state dict of the same architecture (model.arch)?"
        )
    model.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d tensors from %s; %d kept fresh (%s)",
        len(usable), path, len(missing), ", ".join(missing[:4]) or "none",
    )
    if skipped:
        log.info("ignored %d tensors of other shape or name: %s", len(skipped), skipped[:4])


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling code: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise ConfigError(
            f"model.weights={str(path)!r} does not exist; give a local weights file "
            "(weights are never downloaded)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}
