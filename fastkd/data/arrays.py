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


FITS = ("resize", "pad", "crop")


def fit_images(data: np.ndarray, size: int, fit: str = "resize", chunk: int = 1024) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` images brought to ``size`` × ``size``, as ``fit`` says:

    * ``resize``: stretched to the square (bilinear with antialiasing; the aspect ratio is not kept);
    * ``pad``: scaled so that the longer side is ``size`` (aspect kept), then centred on a black square;
    * ``crop``: scaled so that the shorter side is ``size``, then the centre square is cut out.

    Images already ``size`` × ``size`` come back unchanged (the same array). Rounded to the nearest
    integer and clamped to 0-255, so the result is uint8 again; done in chunks of ``chunk`` images.
    """
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4:
        raise ValueError(f"data must be uint8 [N, H, W, C], got {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    n, h, w, c = data.shape
    if (h, w) == (size, size):
        return data
    if fit == "resize":
        scaled = (size, size)
    else:
        scale = size / (max(h, w) if fit == "pad" else min(h, w))
        scaled = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = np.zeros((n, size, size, c), dtype=np.uint8)
    top, left = (size - scaled[0]) // 2, (size - scaled[1]) // 2
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.array(data[start:start + chunk])).permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=scaled, mode="bilinear", align_corners=False,
                                            antialias=scaled[0] < h or scaled[1] < w)
        y = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if fit == "crop":
            out[start:start + chunk] = y[:, -top:-top + size if top else None, -left:-left + size if left else None]
        else:
            out[start:start + chunk, top:top + scaled[0], left:left + scaled[1]] = y
    return out


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
