"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) as used
by RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

WRN-d-k: depth d = 6n+4, widths 16, 16k, 32k, 64k; pre-activation blocks (BN-ReLU-conv). Module
names and the ``state_dict`` layout are RepDistiller's (``models/wrn.py``: ``block1.layer.0.bn1``,
``convShortcut``, ...), so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models._blocks import global_avg_pool, init_weights


class BasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 on a pre-activated input; a 1×1 ``convShortcut`` of the
    activated input when the width or resolution changes, the raw input otherwise."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equalInOut else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """``nb_layers`` blocks, the first one changing width / resolution (held as ``.layer``)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32×32 inputs.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, f1, f2, f3, f4],
    logits)``: stem conv output, the three block-group outputs and the pooled feature. With
    ``preact`` f1–f3 are passed through the BatchNorm that opens the next group (f3: the final
    ``bn1``), as RepDistiller does — which, as there, runs those BatchNorms a second time (a
    second running-statistics update in training mode).
    """

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        init_weights(self, linear_bias_zero=True)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        if preact:
            groups = ["block2.layer.0.relu1:input", "block3.layer.0.relu1:input", "relu:input"]
        else:
            groups = ["block1", "block2", "block3"]
        return ["conv1", *groups, "fc:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = self.relu(self.bn1(f3))
        pooled = global_avg_pool(out).flatten(1)  # the published avg_pool2d(out, 8) at 32 × 32
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        if preact:
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, pooled], logits


def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=1, drop_rate=drop_rate)


def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=2, drop_rate=drop_rate)


def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=1, drop_rate=drop_rate)


def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=2, drop_rate=drop_rate)
