"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR
2018) for CIFAR, in the form RepDistiller uses (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; ``models/mobilenetv2.py``, from "Knowledge Distillation via Route
Constrained Optimization"): a stride-2 stem, seven groups of inverted residuals (``blocks``),
a 1×1 conv to 1280 channels and a ``classifier``.

RepDistiller's ``MobileNetV2`` is its ``mobile_half``: expansion 6, width multiplier 0.5.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models._blocks import GlobalAvgPool, init_weights

# expansion t (None: the model's ``expand_ratio``), output channels c, repeats n, first stride s
_SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 linear projection-BN (``conv.0`` … ``conv.7``);
    the input is added when the shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``input_size``×``input_size`` images (a multiple of 32).

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f5], logits)``:
    the stem output, the outputs of groups 1, 2, 4 and 6 and the pooled feature (the group
    outputs end in BatchNorm, so ``preact`` changes nothing, as in RepDistiller).
    """

    def __init__(self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5,
                 input_size: int = 32, remove_avg: bool = False):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.remove_avg = remove_avg
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            out_channels = int(c * width_mult)
            group = []
            for index in range(n):
                group.append(InvertedResidual(channels, out_channels, s if index == 0 else 1,
                                              expand_ratio if t is None else t))
                channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = GlobalAvgPool()  # the published AvgPool2d(input_size // 16) on its 2 × 2 map at 32 × 32
        init_weights(self, linear_std=0.01, linear_bias_zero=True)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        return ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "classifier:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        out = self.conv1(x)
        feats = [out]
        for index, group in enumerate(self.blocks):
            out = group(out)
            if index in (1, 2, 4, 6):
                feats.append(out)
        out = self.conv2(out)
        if not self.remove_avg:
            out = self.avgpool(out)
        pooled = out.flatten(1)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        return [*feats, pooled], logits


def mobilenetv2(num_classes: int = 100, **kwargs) -> MobileNetV2:
    """RepDistiller's ``MobileNetV2`` (``mobile_half``: expansion 6, width 0.5)."""
    return MobileNetV2(num_classes, **kwargs)
