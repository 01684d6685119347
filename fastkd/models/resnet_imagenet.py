"""ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with
torchvision's module names, so torchvision ``state_dict``s load with ``strict=True`` (and ours
into torchvision), without torchvision being installed.

The bottleneck strides its 3×3 conv (torchvision's "ResNet v1.5"). ``forward`` takes the zoo's
``is_feat`` / ``preact`` flags; f0 is the stem output (after max-pooling).
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models._blocks import Stage, init_weights, run_stages
from fastkd.models.tap import resnet_taps


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class _Residual(nn.Module):
    """``relu(residual(x) + shortcut(x))``, the shortcut being ``downsample`` or the identity."""

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        out = self.residual(x)
        out += x if self.downsample is None else self.downsample(x)
        if return_preact:
            return torch.relu(out), out
        return self.relu(out)


class BasicBlock(_Residual):
    """Two 3×3 conv-BN with a ReLU between, plus the (projected) input, then ReLU."""

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

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_Residual):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; plus the (projected) input, then ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """ImageNet ResNet: 7×7 stride-2 stem, 3×3 max-pool, four stages of ``block``s, average pool, ``fc``.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f5], logits)``:
    the stem output, the four stage outputs (pre-ReLU with ``preact``) and the pooled feature.
    """

    def __init__(self, block: type[_Residual], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)
        if zero_init_residual:  # each residual branch starts at zero (Goyal et al., 2017)
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def _make_layer(self, block: type[_Residual], planes: int, blocks: int, stride: int) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return Stage(*layers)

    def _stages(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns;
        the same names tap a torchvision ResNet (:func:`fastkd.models.tap.resnet_taps`)."""
        return resnet_taps(self, preact)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x, outs, pres = run_stages(self._stages(), f0, is_feat and preact)
        pooled = self.avgpool(x).flatten(1)
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        return [f0, *(pres if preact else outs), pooled], logits


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ``resnet18`` layout (11.7M parameters with 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ``resnet34`` layout (21.8M parameters with 1000 classes)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ``resnet50`` layout (25.6M parameters with 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)
