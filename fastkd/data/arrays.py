"""Image datasets held in memory as one uint8 array, the form every small dataset here takes.

An :class:`ArrayDataset` keeps ``data`` (uint8, ``[N, H, W, C]``), ``targets`` (int64, ``[N]``),
``classes`` and the per-channel ``mean`` / ``std`` of its training split in the units of
``data`` (0-255 for images). :class:`~fastkd.data.device.DeviceDataset` takes any of them to the
GPU; on the host, items are ``(image, label)`` with the image a normalised float tensor
``[C, H, W]`` or whatever ``transform`` makes of a PIL image (torchvision's convention).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def channel_stats(data: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of ``[N, H, W, C]`` images, in float64."""
    if not isinstance(data, np.ndarray) or data.ndim != 4:
        raise ValueError(f"data must be a [N, H, W, C] array, got {getattr(data, 'shape', type(data).__name__)}")
    channels = data.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for chunk in np.array_split(data.reshape(-1, channels), max(1, data.shape[0] // 4096)):
        c = chunk.astype(np.float64)
        total += c.sum(0)
        squares += (c * c).sum(0)
    count = data.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` images → float32 ``[..., C, H, W]`` tensor ``(images - mean) / std``."""
    images = np.ascontiguousarray(images)
    x = torch.from_numpy(images if images.flags.writeable else images.copy()).movedim(-1, -3).float()
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - m) / s).contiguous()


class ArrayDataset(Dataset):
    """``(image, label)`` items from a uint8 ``[N, H, W, C]`` array; see the module doc.

    Args:
        data: uint8 images ``[N, H, W, C]``.
        targets: integer labels ``[N]``.
        mean, std: per-channel statistics in the units of ``data`` (one value per channel).
        classes: class names, ``classes[label]`` (``"0"``, ``"1"``, ... by default).
        transform: called on a PIL image; by default the image becomes ``normalize(image, mean, std)``.
    """

    def __init__(self, data: np.ndarray, targets, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str] | None = None, transform: Callable | None = None):
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4:
            raise ValueError("data must be a uint8 numpy array [N, H, W, C], got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        targets = np.asarray(targets)
        if targets.shape != (data.shape[0],) or not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"targets must be {data.shape[0]} integer labels, got {targets.dtype} {targets.shape}")
        channels = data.shape[-1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0 in every channel, got {tuple(std)}")
        self.data = data
        self.targets = targets.astype(np.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        num_classes = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int):
        image, label = self.data[i], int(self.targets[i])
        if self.transform is None:
            return normalize(image, self.mean, self.std), label
        from PIL import Image

        return self.transform(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)), label
