"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2)
as used by RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

Depth 6n+2: a 3×3 stem and three stages of n basic blocks at 32×32, 16×16 and 8×8. ``resnet8``
… ``resnet110`` have widths 16/16/32/64; the ``x4`` variants 32/64/128/256. Module names and
the ``state_dict`` layout are RepDistiller's (``models/resnet.py``), so its checkpoints load
with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models._blocks import GlobalAvgPool, Stage, init_weights, run_stages


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the (projected) input, then ReLU (``relu_out``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += shortcut
        act = self.relu_out(out)
        return (act, out) if return_preact else act


class ResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2`` with stage widths ``widths = [stem, s1, s2, s3]``.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, f1, f2, f3, f4],
    logits)`` where f0 is the stem output, f1–f3 the stage outputs (with ``preact`` their values
    before the last ReLU) and f4 the pooled feature.
    """

    def __init__(self, depth: int, widths: list[int], num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], blocks, stride=1)
        self.layer2 = self._make_layer(widths[2], blocks, stride=2)
        self.layer3 = self._make_layer(widths[3], blocks, stride=2)
        self.avgpool = GlobalAvgPool()  # the published AvgPool2d(8) at 32 × 32, any input size otherwise
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return Stage(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules up to the last stage (RepDistiller trains these in its FSP/AB init phase)."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BatchNorm of each stage (the pre-ReLU features of the AB / OFD distillers)."""
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        stages = [f"layer{i}" for i in (1, 2, 3)]
        if preact:
            stages = [f"{s}.{len(getattr(self, s)) - 1}.relu_out:input" for s in stages]
        return ["relu", *stages, "fc:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, outs, pres = run_stages((self.layer1, self.layer2, self.layer3), x, is_feat and preact)
        pooled = self.avgpool(x).flatten(1)
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        return [f0, *(pres if preact else outs), pooled], logits


_NARROW = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, _NARROW, num_classes)


def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, _NARROW, num_classes)


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, _NARROW, num_classes)


def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, _NARROW, num_classes)


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, _WIDE, num_classes)
