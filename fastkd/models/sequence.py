"""Small sequence models that read an image's rows as frames: the teacher / student pair of the IUSP recipe
(``digits_seq_iusp``), where each frame-level output is a ``[B, T, C]`` sequence.

An image batch ``[B, channels, H, W]`` becomes H frames of ``width`` features: the channel mean (the zoo's data
repeats grey images to three channels), its W pixels average-pooled to ``width`` (8: a digit at 8 × 8 keeps its
pixels, at 32 × 32 — pixels repeated 4× — gets them back exactly). Both models follow RepDistiller's convention,
``forward(x, is_feat=False, preact=False)``, with ``features`` = [each stage's per-frame output ``[B, T, C]``…,
the pooled feature ``[B, C]`` (the mean over the frames)]: ``features[-2]`` is the last per-frame output, the
``frames_s`` / ``frames_t`` feature that IUSP takes. ``preact`` is accepted and changes nothing.

* ``rowconv`` (teacher): three 1-D convolutions over the frames (kernel 3, 64 / 64 / 128 channels, BatchNorm,
  ReLU), 40k parameters at 10 classes.
* ``rowgru`` (student): one GRU layer of 32 units over the frames, 4.4k parameters at 10 classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FRAME_WIDTH = 8  # features per frame


def image_rows(x: torch.Tensor, width: int = FRAME_WIDTH) -> torch.Tensor:
    """[B, channels, H, W] images → [B, H, width] frames: the channel mean, each row average-pooled to width."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, channels, H, W], got shape {tuple(x.shape)}")
    rows = x.mean(dim=1)
    return rows if rows.shape[2] == width else F.adaptive_avg_pool1d(rows, width)


class RowConv(nn.Module):
    """1-D convolutions over an image's rows as frames (see the module doc)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 64, 128), kernel: int = 3):
        super().__init__()
        stages, channels = [], FRAME_WIDTH
        for width in widths:
            stages.append(nn.Sequential(nn.Conv1d(channels, width, kernel, padding=kernel // 2, bias=False),
                                        nn.BatchNorm1d(width), nn.ReLU()))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        h = image_rows(x).transpose(1, 2)  # [B, width, T]: channels first for Conv1d
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h.transpose(1, 2))  # [B, T, C]
        pooled = h.mean(dim=2)
        logits = self.fc(pooled)
        return ([*features, pooled], logits) if is_feat else logits


class RowGRU(nn.Module):
    """A GRU over an image's rows as frames (see the module doc)."""

    def __init__(self, num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.gru = nn.GRU(FRAME_WIDTH, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        frames, _ = self.gru(image_rows(x))  # [B, T, hidden]
        pooled = frames.mean(dim=1)
        logits = self.fc(pooled)
        return ([frames, pooled], logits) if is_feat else logits


def rowconv(num_classes: int = 10, **kwargs) -> RowConv:
    return RowConv(num_classes=num_classes, **kwargs)


def rowgru(num_classes: int = 10, **kwargs) -> RowGRU:
    return RowGRU(num_classes=num_classes, **kwargs)
