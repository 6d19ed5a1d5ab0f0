"""A tiny trainer for the training-feature tests, and the two-rank worker they launch.

The trainer is assembled by the real `build_model_runtime` around a small model and a
stand-in loader that only says how many micro-batches an epoch has, so `train_step`
runs exactly as in training, on data the test chooses.

As a script (under torchrun): `features_support.py OUT_DIR` trains one accumulation
group of 2 micro-batches per step on each rank, rank 1 meeting a NaN image at its
first step, and writes what each rank saw to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from pipeline.config import load_config
from pipeline.log import MetricsLogger
from pipeline.losses import HeadLoss
from pipeline.nonfinite import NonFiniteGuard
from pipeline.schedule import build_monitor
from pipeline.train import Trainer, build_model_runtime, train_step

# Plain SGD at a constant LR, so a hand-written reference step is easy to write
PLAIN_SGD = ["optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0",
             "optim.warmup_fraction=0", "optim.min_lr_ratio=1", "optim.lr=0.1"]


class StepsLoader:
    """Stands in for the training loader: train_step reads steps_per_epoch and uses
    normalize; the batches here are float already, so it passes them through."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        return images


def tiny_model(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """A conv net with one logit; BatchNorm only when asked (it would break equivalences)."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(4)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *norm, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))


def make_trainer(model: nn.Module, steps_per_epoch: int, overrides: list[str] = (),
                 accelerator: Accelerator | None = None, tmp: Path = Path(".")) -> Trainer:
    config = load_config(None, [*PLAIN_SGD, *overrides])
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                     mixed_precision=config.train.mixed_precision)
    model, optimizer, scheduler, ema = build_model_runtime(config, acc, model, steps_per_epoch)
    return Trainer(
        config, acc, tmp, model, HeadLoss("bce_with_logits", 1).to(acc.device), optimizer,
        scheduler, StepsLoader(steps_per_epoch), {}, None, MetricsLogger(None),
        {"epoch": 0, "global_step": 0}, ema=ema, monitor=build_monitor(config),
        nonfinite=NonFiniteGuard(config.train.on_nonfinite_loss,
                                 config.train.max_consecutive_nonfinite),
    )


def batches(count: int, size: int = 4, seed: int = 1, side: int = 8) -> list[dict[str, Any]]:
    """Random images with 0/1 labels, as the loader yields them."""
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 3, side, side, generator=gen),
             "label": torch.randint(0, 2, (size,), generator=gen)} for _ in range(count)]


def run_epoch(trainer: Trainer, data: list[dict[str, Any]]) -> list[bool]:
    """train_step over one epoch, counting steps as the training loop does."""
    stepped = []
    for micro_step, batch in enumerate(data, start=1):
        result = train_step(trainer, batch, micro_step)
        trainer.state["global_step"] += int(result.stepped)
        stepped.append(result.stepped)
    return stepped


def bare(trainer: Trainer) -> nn.Module:
    return trainer.accelerator.unwrap_model(trainer.model)


def sgd_reference(model: nn.Module, groups: list[list[dict[str, Any]]],
                  lr: float = 0.1) -> nn.Module:
    """Plain PyTorch: per group, one step on the mean loss over all its samples."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for group in groups:
        images = torch.cat([b["image"] for b in group])
        labels = torch.cat([b["label"] for b in group]).float().unsqueeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def two_rank_worker(out: Path) -> None:
    """2 ranks x 2 micro-batches per step, 4 steps; rank 1's first micro-batch is NaN."""
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    start = tiny_model(seed=0, batchnorm=True)
    reference_start = copy.deepcopy(start)
    trainer = make_trainer(start, 8, ["train.grad_accum_steps=2"], accelerator=acc)
    # Every rank draws all ranks' data from one seed, then trains on its own share
    data = [batches(8, seed=10 + r) for r in range(world)]
    poisoned = [dict(b) for b in data[rank]]
    if rank == 1:
        poisoned[0]["image"] = poisoned[0]["image"].clone()
        poisoned[0]["image"][0, 0, 0, 0] = float("nan")
    stepped = run_epoch(trainer, poisoned)

    # Step 1 is skipped on both ranks; steps 2-4 must be plain SGD on the mean gradient
    # over both ranks' micro-batches (BatchNorm normalises each micro-batch alone, as in
    # the reference)
    reference = sgd_reference_ranks(reference_start, data, first_step=1)
    params = [p.detach() for p in bare(trainer).parameters()]
    diff = max((p - q).abs().max().item()
               for p, q in zip(params, reference.parameters(), strict=True))
    buffers_finite = all(torch.isfinite(b.float()).all().item()
                         for b in bare(trainer).buffers())
    checksum = float(sum(p.double().sum() for p in params))
    report = {"world": world, "stepped": stepped, "skipped": trainer.nonfinite.skipped,
              "global_step": trainer.state["global_step"], "diff": diff,
              "buffers_finite": buffers_finite, "checksum": checksum}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def sgd_reference_ranks(model: nn.Module, data: list[list[dict[str, Any]]],
                        first_step: int) -> nn.Module:
    """Plain PyTorch DDP arithmetic: per step, the mean over ranks and micro-batches of
    each micro-batch's loss gradient, BatchNorm in training mode per micro-batch."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = len(data[0]) // 2
    for step in range(first_step, steps):
        micro = [data[r][2 * step + i] for r in range(len(data)) for i in range(2)]
        for batch in micro:
            logits = model(batch["image"])
            target = batch["label"].float().unsqueeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
            (loss / len(micro)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


if __name__ == "__main__":
    two_rank_worker(Path(sys.argv[1]))
