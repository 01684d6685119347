"""The CIFAR ResNet-50 of RepDistiller (``models/resnetv2.py``; Tian et al., "Contrastive
Representation Distillation", ICLR 2020): He et al.'s bottleneck ResNet-50 ("Deep Residual
Learning for Image Recognition", CVPR 2016) with a 3×3 stride-1 stem and no max-pool, so a
32×32 image reaches the last stage at 4×4. The ``state_dict`` matches RepDistiller's
(``shortcut`` projections, ``linear`` classifier).
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models._blocks import Stage, init_weights, run_stages


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; added to the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        act = self.relu_out(out)
        return (act, out) if return_preact else act


class ResNetCifar(nn.Module):
    """Bottleneck ResNet for 32×32 inputs with ``num_blocks`` blocks in its four stages.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f4, f5],
    logits)``: stem output, the four stage outputs (pre-ReLU with ``preact``), pooled feature.
    """

    def __init__(self, num_blocks: list[int], num_classes: int = 100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.relu = nn.ReLU(inplace=True)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> Stage:
        layers = []
        for index in range(blocks):
            layers.append(Bottleneck(self.in_planes, planes, stride if index == 0 else 1))
            self.in_planes = planes * Bottleneck.expansion
        return Stage(*layers)

    def _stages(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, *self._stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].bn3 for stage in self._stages()]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        stages = [f"layer{i}" for i in (1, 2, 3, 4)]
        if preact:
            stages = [f"{s}.{len(getattr(self, s)) - 1}.relu_out:input" for s in stages]
        return ["relu", *stages, "linear:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, outs, pres = run_stages(self._stages(), x, is_feat and preact)
        pooled = self.avgpool(x).flatten(1)
        logits = self.linear(pooled)
        if not is_feat:
            return logits
        return [f0, *(pres if preact else outs), pooled], logits


def ResNet50(num_classes: int = 100) -> ResNetCifar:
    """RepDistiller's CIFAR ``ResNet50`` (3, 4, 6, 3 bottleneck blocks)."""
    return ResNetCifar([3, 4, 6, 3], num_classes)
