"""ImageNet MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", 2017), width 1.0: the student of the ResNet-50 → MobileNet ImageNet
distillation setting (Heo et al. 2019's overhaul-distillation, Tian et al. 2020's CRD, Zhao et
al. 2022's DKD).

A 3×3 stride-2 conv-BN-ReLU stem (32 channels), then 13 depthwise-separable blocks — a 3×3
depthwise conv-BN-ReLU and a 1×1 pointwise conv-BN-ReLU — of widths
64, 128, 128, 256, 256, 512 ×6, 1024, 1024 (stride 2 at the 2nd, 4th, 6th and 12th), global
average pooling and a linear classifier: 4,231,976 parameters for 1000 classes. The layers are
``model.0`` … ``model.13`` (each an ``nn.Sequential``: conv, bn, relu[, conv, bn, relu]) and
``fc``, the ``state_dict`` layout those works' ImageNet checkpoints use; the pooling is adaptive,
so any input size ≥ 32 works.

``forward(x, is_feat=False, preact=False)``: with ``is_feat`` ``([f0, …, f4, pooled], logits)``,
f0 the stem's output and f1 … f4 the outputs of the last block at strides 4, 8, 16, 32
(``model.3``, ``model.5``, ``model.11``, ``model.13``); ``preact`` gives those before their ReLU.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models._blocks import init_weights

# (output channels, stride) of the 13 depthwise-separable blocks
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
STAGE_ENDS = (3, 5, 11, 13)  # indices in ``model`` of the blocks whose outputs are f1 … f4


def _conv_bn_relu(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _separable(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNet v1 for ImageNet; see the module doc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, width = [_conv_bn_relu(3, 32, 2)], 32
        for out, stride in BLOCKS:
            layers.append(_separable(width, out, stride))
            width = out
        self.model = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.model, self.fc])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.model[i][4] for i in STAGE_ENDS]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns."""
        stages = [f"model.{i}.5:input" if preact else f"model.{i}" for i in STAGE_ENDS]
        return ["model.0", *stages, "fc:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        feats = []
        for index, block in enumerate(self.model):
            if is_feat and preact and index in STAGE_ENDS:
                before = block[:-1](x)
                feats.append(before)
                x = torch.relu(before)
                continue
            x = block(x)
            if is_feat and (index == 0 or index in STAGE_ENDS):
                feats.append(x)
        pooled = self.avgpool(x).flatten(1)
        logits = self.fc(pooled)
        return ([*feats, pooled], logits) if is_feat else logits


def mobilenet_v1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """MobileNet v1 (width 1.0) for ImageNet."""
    return MobileNetV1(num_classes, **kwargs)
