"""Image transforms: PIL RGB image in, uint8 tensor [3, S, S] out; `Normalize`
turns a batch of them into the model's float32 input where the model runs.

Train: optional Gaussian blur and JPEG re-encode (the CNNDetection recipe for
robust fake-image detectors), then a random resized crop (or resize + center
crop when turned off), an optional horizontal flip, to tensor.
Eval: resize the short side to round(S * eval_resize_ratio), center crop S,
to tensor; no randomness at all.

Batches stay uint8 until they reach the device: a quarter of the bytes to move
from the loader's workers (a float32 batch cost about 1 ms per image more to
hand over) and to the GPU, and the normalisation is one fused step there.

Every random choice is drawn from the `random.Random` the caller passes, never
from a global generator, so the loader seeds each reader from (seed, epoch,
rank, worker), a run repeats exactly, and the trainer's own RNG is untouched.
The geometry runs on the PIL image (crop and resize in one resample), which is
faster than converting to a tensor first.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter

from pipeline.config import DataConfig

# Aspect ratios the random crop may take, as torchvision's RandomResizedCrop
CROP_RATIO = (3 / 4, 4 / 3)
Box = tuple[int, int, int, int]  # left, top, right, bottom


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC PIL image -> uint8 CHW tensor."""
    # np.array copies: PIL's buffer is read-only, which torch warns about
    pixels_HWC = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels_HWC.permute(2, 0, 1).contiguous()


class Normalize:
    """uint8 [B, 3, S, S] -> float32 (x / 255 - mean) / std, on the batch's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._factors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images_B3SS: torch.Tensor) -> torch.Tensor:
        scale, shift = self._on(images_B3SS.device)
        return torch.addcmul(shift, images_B3SS.float(), scale)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # x / (255 std) - mean / std: one multiply-add per value
        if device not in self._factors:
            std = torch.tensor(self.std, dtype=torch.float64).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, 3, 1, 1)
            self._factors[device] = ((1 / (255 * std)).float().to(device),
                                     (-mean / std).float().to(device))
        return self._factors[device]

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_normalize(data_cfg: DataConfig) -> Normalize:
    return Normalize(data_cfg.mean, data_cfg.std)


class TrainTransform:
    def __init__(self, data_cfg: DataConfig):
        self.size = data_cfg.image_size
        self.augment = data_cfg.augment

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = self._degrade(image, rng)
        if self.augment.random_resized_crop:
            box = random_crop_box(image.size, self.augment.crop_scale, rng)
        else:
            box = center_crop_box(image.size, 1.0)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if self.augment.hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    def _degrade(self, image: Image.Image, rng: random.Random) -> Image.Image:
        aug = self.augment
        if aug.blur_prob > 0 and rng.random() < aug.blur_prob:
            sigma = rng.uniform(*aug.blur_sigma)
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        if aug.jpeg_prob > 0 and rng.random() < aug.jpeg_prob:
            image = jpeg_reencode(image, rng.randint(*aug.jpeg_quality))
        return image

    def __repr__(self) -> str:
        crop = "random_resized" if self.augment.random_resized_crop else "center"
        return f"TrainTransform(size={self.size}, crop={crop}, {self.augment!r})"


class EvalTransform:
    def __init__(self, data_cfg: DataConfig):
        self.size = data_cfg.image_size
        self.resize_to = round(data_cfg.image_size * data_cfg.eval_resize_ratio)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        # Crop box in source pixels for "short side -> resize_to, center crop size"
        box = center_crop_box(image.size, self.size / self.resize_to)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        return to_tensor(image)

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize_to}, center_crop={self.size})"


def build_train_transform(data_cfg: DataConfig) -> TrainTransform:
    return TrainTransform(data_cfg)


def build_eval_transform(data_cfg: DataConfig) -> EvalTransform:
    return EvalTransform(data_cfg)


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        return reloaded.convert("RGB")


def center_crop_box(size: tuple[int, int], fraction: float) -> Box:
    """The centered square whose side is `fraction` of the short side."""
    width, height = size
    side = max(1, round(min(width, height) * fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_crop_box(size: tuple[int, int], scale: tuple[float, float], rng: random.Random) -> Box:
    """torchvision's RandomResizedCrop sampling, drawn from rng.

    Up to 10 tries for a crop of area fraction in `scale` and aspect ratio in
    CROP_RATIO (log-uniform); else the largest centered crop within the ratios.
    """
    width, height = size
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(area * aspect))
        crop_h = round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    return _fallback_crop_box(width, height)


def _fallback_crop_box(width: int, height: int) -> Box:
    if width / height < CROP_RATIO[0]:
        crop_w, crop_h = width, round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        crop_w, crop_h = round(height * CROP_RATIO[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h
