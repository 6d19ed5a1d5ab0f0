"""What happens to an optimizer step whose loss is NaN or infinite (train.on_nonfinite_loss).

- skip: the step's gradients are dropped and the optimizer does not step; the
  BatchNorm statistics the bad forward passes changed are put back; the skip is
  logged and counted (train/nonfinite_steps). The LR schedule and the step counter
  still advance, so the schedule stays aligned with the epochs. More than
  train.max_consecutive_nonfinite skips in a row stop the run: it has diverged.
- stop: the run stops with an error naming the step, the loss and what to try.

Every rank takes the same decision: the ranks' flags and bad losses travel in one
all-reduce per optimizer step (DDP's own gradient all-reduce runs inside backward,
where nothing can ride along). Reading the result costs one host sync per step, as
the fp16 grad scaler's overflow check does. The logged train/loss of a window with a
skipped step shows the non-finite value: the mean is left honest, not cleaned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

HINTS = ("lower optim.lr or raise optim.warmup_fraction, set train.grad_clip_norm, use "
         "train.mixed_precision=bf16 instead of fp16, check the data with "
         "`pipeline verify --deep`, or set train.on_nonfinite_loss=skip to step over it")


class NonFiniteLossError(RuntimeError):
    """The loss was not finite and the policy (or too many skips in a row) says stop."""


class NonFiniteGuard:
    """Collects a group's losses on this rank, then decides with all ranks at its end."""

    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._saved_buffers: list[torch.Tensor] = []

    def begin_group(self, model: nn.Module) -> None:
        """Remember the buffers a bad forward pass could spoil (skip only)."""
        self._losses = []
        if self.policy != "skip":
            return
        buffers = [b.detach() for b in model.buffers()]
        if len(self._saved_buffers) != len(buffers):
            self._saved_buffers = [b.clone() for b in buffers]
            return
        with torch.no_grad():  # the same small tensors every step: copy, do not allocate
            for saved, buffer in zip(self._saved_buffers, buffers, strict=True):
                saved.copy_(buffer)

    def observe(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().reshape(()))

    def should_skip(self, accelerator: Any, model: nn.Module, where: str) -> bool:
        """True when any rank saw a non-finite loss in this group (same on every rank).

        Raises NonFiniteLossError under `stop`, or after too many skips in a row.
        `where` names the step for the messages, e.g. "step 12 (epoch 2)".
        """
        bad_ranks = self._bad_losses(accelerator)
        if not bad_ranks:
            self.consecutive = 0
            return False
        losses = ", ".join(f"rank {rank}: {value}" for rank, value in bad_ranks.items())
        if self.policy == "stop":
            raise NonFiniteLossError(f"non-finite loss at {where} ({losses}); {HINTS}")
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"non-finite loss at {where} ({losses}), {self.consecutive} steps in a row "
                f"(train.max_consecutive_nonfinite={self.max_consecutive}): the run has "
                f"diverged; {HINTS}")
        self._restore_buffers(model)
        log.warning("non-finite loss at %s (%s): optimizer step skipped, %d so far",
                    where, losses, self.skipped)
        return True

    def _bad_losses(self, accelerator: Any) -> dict[int, float]:
        """{rank: its first non-finite loss of the group}, from one all-reduce of 2 x world."""
        losses = torch.stack(self._losses).float()
        bad = ~torch.isfinite(losses)
        world, rank = accelerator.num_processes, accelerator.process_index
        payload = torch.zeros(2 * world, device=losses.device)
        payload[rank] = bad.any().float()
        # NaN and inf survive a sum with the zeros the other ranks send
        first_bad = losses[bad.long().argmax()]
        payload[world + rank] = torch.where(bad.any(), first_bad, torch.zeros_like(first_bad))
        total = accelerator.reduce(payload, "sum").tolist()
        return {r: total[world + r] for r in range(world) if total[r] > 0}

    @torch.no_grad()
    def _restore_buffers(self, model: nn.Module) -> None:
        for buffer, saved in zip(model.buffers(), self._saved_buffers, strict=True):
            buffer.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
