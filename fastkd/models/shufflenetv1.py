"""ShuffleNet (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices", CVPR 2018) for CIFAR, as used by RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020; ``models/ShuffleNetv1.py``): a 1×1 stem and three
stages of grouped bottlenecks with channel shuffle, 240/480/960 channels, 3 groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models._blocks import Stage, global_avg_pool, run_stages


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g·c, H, W] → [N, c·g, H, W], interleaving the ``groups``."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1×1 reduce, shuffle, 3×3 depthwise (strided), grouped 1×1 expand; added to the input,
    or, with stride 2, concatenated with its 3×3 average pool; then ReLU (``relu_out``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        act = self.relu_out(pre)
        return (act, pre) if return_preact else act


class ShuffleFeatures:
    """The feature interface both ShuffleNets share: stem ``conv1``/``bn1``, stages ``layer1..3``,
    classifier ``linear`` (RepDistiller's ``get_feat_modules`` and fastkd's tap names)."""

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        raise NotImplementedError(f"{type(self).__name__} has no BatchNorm before its stage ReLUs "
                                  "(not an 'Overhaul' teacher)")

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        stages = [f"layer{i}" for i in (1, 2, 3)]
        if preact:
            stages = [f"{s}.{len(getattr(self, s)) - 1}.relu_out:input" for s in stages]
        return ["layer1:input", *stages, "linear:input"]


class ShuffleNet(ShuffleFeatures, nn.Module):
    """ShuffleNet for 32×32 inputs: stage widths ``out_planes``, ``num_blocks`` blocks per stage.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f4], logits)``:
    the stem output, the three stage outputs (pre-ReLU with ``preact``), the pooled feature.
    """

    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> Stage:
        layers = []
        for index in range(num_blocks):
            # the strided first block concatenates its input, so it adds only the difference
            added = out_planes - self.in_planes if index == 0 else out_planes
            layers.append(Bottleneck(self.in_planes, added, stride=2 if index == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return Stage(*layers)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        x, outs, pres = run_stages((self.layer1, self.layer2, self.layer3), f0, is_feat and preact)
        pooled = global_avg_pool(x).flatten(1)  # the published avg_pool2d(x, 4) at 32 × 32
        logits = self.linear(pooled)
        if not is_feat:
            return logits
        return [f0, *(pres if preact else outs), pooled], logits


def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    """RepDistiller's ``ShuffleV1``: widths 240/480/960, 4/8/4 blocks, 3 groups."""
    return ShuffleNet([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
