"""How the model runs: SyncBatchNorm, channels_last memory format, torch.compile.

Applied by the trainer before Accelerate wraps the model in DDP, in this order:
channels_last, (the EMA copy is taken here, with plain BatchNorm), SyncBatchNorm,
then torch.compile in place, so DDP wraps the compiled module and the state dict
keeps its plain names.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def to_channels_last(model: nn.Module, config: TrainConfig) -> nn.Module:
    """NHWC weights; the training step sends its images in the same layout."""
    if not config.channels_last:
        return model
    log.info("train.channels_last: weights and training images in NHWC layout")
    return model.to(memory_format=torch.channels_last)


def sync_batchnorm(model: nn.Module, enabled: bool, world_size: int, on_gpu: bool) -> nn.Module:
    """BatchNorm statistics over all ranks' batches (model.sync_batchnorm)."""
    if not enabled:
        return model
    if world_size == 1:
        log.info("model.sync_batchnorm: one process, nothing to synchronise; plain BatchNorm")
        return model
    if not on_gpu:
        # Seen with torch 2.14 and gloo: DDP refuses, "SyncBatchNorm layers only work
        # with GPU modules"
        raise ConfigError(
            f"model.sync_batchnorm=true needs GPUs; these {world_size} processes run on the "
            "CPU, where torch's SyncBatchNorm does not work. Set model.sync_batchnorm=false"
        )
    log.info("model.sync_batchnorm: BatchNorm statistics over all %d ranks", world_size)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def compile_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """torch.compile in place (train.compile); the first steps pay for compilation."""
    if config.compile:
        log.info("train.compile: the model is compiled at its first steps")
        model.compile()
    return model


def images_to(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=layout)
