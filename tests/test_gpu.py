"""GPU paths: bf16, fp16 with the grad scaler, channels_last, torch.compile (marked gpu).

Skipped where CUDA is absent (tests/conftest.py). Each test trains a ResNet-18 for
a few real steps, through the real `train_step`, on 24 crops of scikit-learn's two
sample photos (which photo is the label), and checks the loss is finite, falls, and
that the options took effect (dtypes, memory format, compiled module).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from accelerate.state import AcceleratorState, GradientState
from features_support import bare, make_trainer

from pipeline.train import train_step

pytestmark = pytest.mark.gpu

STEPS = 12
ADAMW = ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Each test asks for its own mixed precision; Accelerate keeps one per process
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def photo_batch(photo_crops) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(np.stack(photo_crops)).permute(0, 3, 1, 2).float() / 255
    images = (images - 0.5) / 0.25
    labels = torch.tensor([0] * 12 + [1] * 12)  # first photo, second photo
    return {"image": images, "label": labels}


def train_on(overrides: list[str], batch: dict[str, torch.Tensor]):
    """Train STEPS steps on one batch; return the trainer, the losses and fc's output dtype."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1)
    trainer = make_trainer(model, STEPS, [*ADAMW, *overrides])
    seen = {}
    handle = bare(trainer).fc.register_forward_hook(
        lambda _m, _i, out: seen.update(dtype=out.dtype))
    losses = [train_step(trainer, batch, step).loss.item() for step in range(1, STEPS + 1)]
    handle.remove()
    return trainer, losses, seen["dtype"]


def assert_learns(losses: list[float]) -> None:
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_bf16_autocast_trains(photo_batch):
    trainer, losses, logits_dtype = train_on(["train.mixed_precision=bf16"], photo_batch)
    assert logits_dtype == torch.bfloat16
    assert bare(trainer).fc.weight.dtype == torch.float32  # weights stay fp32
    assert trainer.accelerator.scaler is None
    assert_learns(losses)


def test_fp16_trains_with_the_grad_scaler(photo_batch):
    trainer, losses, logits_dtype = train_on(["train.mixed_precision=fp16"], photo_batch)
    assert logits_dtype == torch.float16
    scaler = trainer.accelerator.scaler
    assert scaler is not None and math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert_learns(losses)


def test_channels_last_trains(photo_batch):
    trainer, losses, logits_dtype = train_on(["train.channels_last=true"], photo_batch)
    assert bare(trainer).conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert logits_dtype == torch.float32
    assert_learns(losses)


def test_compile_trains(photo_batch):
    trainer, losses, _ = train_on(["train.compile=true"], photo_batch)
    assert getattr(bare(trainer), "_compiled_call_impl", None) is not None
    assert_learns(losses)


def test_everything_together_with_accumulation_and_ema(photo_batch):
    options = ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=true",
               "train.grad_accum_steps=2", "train.ema_decay=0.5"]
    trainer, losses, logits_dtype = train_on(options, photo_batch)
    assert logits_dtype == torch.bfloat16
    assert trainer.ema.updates == STEPS // 2
    assert_learns(losses)
