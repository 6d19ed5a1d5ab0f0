"""Learning-rate schedules, and the monitor behind early stopping and the plateau rule.

Both schedules start with a linear warmup over optim.warmup_fraction of the run's
optimizer steps, then:
  cosine   decay to optim.min_lr_ratio * lr at the last step of the run;
  plateau  CNNDetection's rule: hold the LR, divide it by 10 each time the monitored
           metric has not improved for optim.plateau_patience evaluations (counted
           again from zero after a drop), and stop the run when a drop takes it
           below optim.min_lr.
Early stopping (train.early_stop_patience) watches the same metric: the run stops
after that many evaluations without a new best. The best value is kept across LR
drops, so "best" always means the best of the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from pipeline.config import Config

log = logging.getLogger(__name__)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> LRScheduler:
    """The schedule of optim.schedule, sized in optimizer steps."""
    warmup = int(config.optim.warmup_fraction * total_steps)
    if config.optim.schedule == "plateau":
        return PlateauLR(optimizer, warmup)
    floor = config.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class PlateauLR(LRScheduler):
    """Linear warmup, then the peak LR divided by 10 at each `drop()`."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.drops = 0
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        return warm * 0.1**self.drops

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def peak_lr(self) -> float:
        """The first group's LR after warmup at the current number of drops."""
        return self.base_lrs[0] * 0.1**self.drops

    def drop(self) -> None:
        """Divide the LR by 10 now, not only from the next optimizer step on."""
        self.drops += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


@dataclass
class Verdict:
    """What one evaluation means for the run."""

    new_best: bool
    drop_lr: bool
    stop_reason: str | None


class Monitor:
    """Follows train.monitor over evaluations: best value, patience counters, stop reason.

    The latest verdict stays readable: `last_was_best` (save a "best" checkpoint) and
    `stop_reason` (None while the run goes on).
    """

    def __init__(self, key: str | None, mode: str = "max", min_delta: float = 0.0,
                 early_stop_patience: int | None = None,
                 plateau_patience: int | None = None) -> None:
        self.key, self.mode, self.min_delta = key, mode, min_delta
        self.early_stop_patience = early_stop_patience
        self.plateau_patience = plateau_patience
        self.best: float | None = None
        self.evals_since_best = 0
        self.evals_since_change = 0  # since the last new best or LR drop
        self.last_was_best = False
        self.stop_reason: str | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, value: float) -> Verdict:
        """Take one evaluation's value of the monitored metric."""
        self.last_was_best = self.improves(value)
        if self.last_was_best:
            self.best, self.evals_since_best, self.evals_since_change = value, 0, 0
        else:
            self.evals_since_best += 1
            self.evals_since_change += 1
        drop = self.plateau_patience is not None and \
            self.evals_since_change >= self.plateau_patience
        if drop:
            self.evals_since_change = 0
        patience = self.early_stop_patience
        if patience is not None and self.evals_since_best >= patience:
            margin = f" by more than {self.min_delta:g}" if self.min_delta else ""
            self.stop_reason = (f"{self.key} has not improved on {self.best}{margin} for "
                                f"{patience} evaluations (train.early_stop_patience)")
        return Verdict(self.last_was_best, drop, self.stop_reason)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "evals_since_best": self.evals_since_best,
                "evals_since_change": self.evals_since_change,
                "last_was_best": self.last_was_best, "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.evals_since_best = int(state["evals_since_best"])
        self.evals_since_change = int(state["evals_since_change"])
        self.last_was_best = bool(state["last_was_best"])
        self.stop_reason = state["stop_reason"]


def build_monitor(config: Config) -> Monitor:
    plateau = config.optim.plateau_patience if config.optim.schedule == "plateau" else None
    train = config.train
    return Monitor(train.monitor, train.monitor_mode, train.monitor_min_delta,
                   train.early_stop_patience, plateau)


def apply_verdict(verdict: Verdict, monitor: Monitor, scheduler: LRScheduler,
                  min_lr: float) -> None:
    """Drop the LR on a plateau; a drop below optim.min_lr ends the run."""
    if not verdict.drop_lr or not isinstance(scheduler, PlateauLR):
        return
    scheduler.drop()
    lr = scheduler.peak_lr()
    log.info("%s has not improved for %d evaluations: learning rate divided by 10, now %.3g",
             monitor.key, monitor.plateau_patience, lr)
    if lr < min_lr and monitor.stop_reason is None:
        monitor.stop_reason = (f"the learning rate {lr:.3g} fell below optim.min_lr={min_lr:g} "
                               "(optim.schedule=plateau)")
