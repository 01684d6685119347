"""ImageNet's standard train and val transforms on PIL images, without torchvision.

Train: random-resized crop (area 8–100 %, aspect 3/4–4/3, ten tries then a centre crop) to
``size``, horizontal flip with probability ½, then a float ``[3, H, W]`` tensor normalised with
``mean`` / ``std`` (0-255 units). Val: resize the shorter side to ``size / 0.875`` (256 for 224),
centre crop ``size``, normalise. The train transform draws from its ``rng``: Python's ``random``
module by default, which torch's DataLoader seeds differently in every worker; the engine passes
a ``random.Random`` that :class:`~fastkd.data.keyed.KeyedBatches` reseeds per batch, so a resumed
run replays the crops.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch

from fastkd.data.arrays import normalize
from fastkd.data.folder import IMAGENET_MEAN, IMAGENET_STD


def _crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
              rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area at an aspect in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    side = min(width, height)  # fallback: the largest centred square
    return (width - side) // 2, (height - side) // 2, side, side


class TrainTransform:
    """Random-resized crop + flip + normalise (see the module doc)."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, rng: random.Random | None = None):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.mean, self.std = size, scale, ratio, mean, std
        self.rng = rng or random

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        left, top, w, h = _crop_box(image.width, image.height, self.scale, self.ratio, self.rng)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(np.asarray(image), self.mean, self.std)


class EvalTransform:
    """Resize the shorter side to ``round(size / crop_fraction)``, centre crop ``size``, normalise."""

    def __init__(self, size: int = 224, crop_fraction: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.size, self.resize = size, int(round(size / crop_fraction))
        self.mean, self.std = mean, std

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        scale = self.resize / min(image.width, image.height)
        w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return normalize(np.asarray(image), self.mean, self.std)
