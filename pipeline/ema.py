"""An exponential moving average (EMA) of the model's weights, evaluated beside the model.

After each optimizer step every parameter moves towards the trained one,
`ema = decay * ema + (1 - decay) * weight`; buffers (BatchNorm statistics) are
copied as they are, since averaging running statistics of older weights would
not describe the averaged weights any better. The EMA remembers about the last
1 / (1 - decay) steps; it starts from the initial weights with no bias correction,
so its metrics mean little until the run is several times that long.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class EMA:
    """A frozen copy of the model whose weights follow the trained ones."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move towards `model`, the unwrapped trained model (same architecture)."""
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.updates += 1

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            log.info("EMA decay changed from %s to %s on resume", state["decay"], self.decay)
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
