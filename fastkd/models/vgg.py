"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), as used by RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020): five conv groups, no hidden fully connected layers,
global average pooling and one ``classifier`` layer.

RepDistiller's ``vgg8``/``vgg11``/... names build its ``vgg*_bn`` models; so do these. Each
group ``blockK`` is an ``nn.Sequential`` of conv(bias)-BN-ReLU triples whose final ReLU is left
out (applied in ``forward``), so the ``state_dict`` indices match RepDistiller's ``models/vgg.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models._blocks import init_weights

# conv widths of the five groups, per depth
_CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _group(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN with the conv groups ``config`` (a list of five lists of widths).

    Groups 0–2 are each followed by 2×2 max-pooling; ``pool3`` runs only for 64×64 inputs (as in
    RepDistiller), so a 32×32 image reaches groups 3 and 4 at 4×4.
    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f5], logits)``:
    the five group outputs after ReLU (groups 1–4 before it with ``preact``) and the pooled feature.
    """

    def __init__(self, config: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.block0 = _group(config[0], 3)
        self.block1 = _group(config[1], config[0][-1])
        self.block2 = _group(config[2], config[1][-1])
        self.block3 = _group(config[3], config[2][-1])
        self.block4 = _group(config[4], config[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, linear_std=0.01, linear_bias_zero=True)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([
            self.block0, self.pool0, self.block1, self.pool1, self.block2, self.pool2,
            self.block3, self.pool3, self.block4, self.pool4,
        ])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def feature_taps(self, preact: bool = False) -> list[str]:
        """Tap names (see :class:`fastkd.models.FeatureTap`) giving the features ``is_feat`` returns
        for 32×32 inputs (for 64×64 ones f3 is ``pool3:input``)."""
        if preact:
            groups = ["block1", "block2", "block3", "block4"]
        else:
            groups = ["pool1:input", "pool2:input", "block4:input", "pool4:input"]
        return ["pool0:input", *groups, "classifier:input"]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        height = x.shape[2]
        f0 = F.relu(self.block0(x))
        p1 = self.block1(self.pool0(f0))
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if height == 64 else f3)
        f4 = F.relu(p4)
        pooled = self.pool4(f4).flatten(1)
        logits = self.classifier(pooled)
        if not is_feat:
            return logits
        if preact:
            return [f0, p1, p2, p3, p4, pooled], logits
        return [f0, f1, f2, f3, f4, pooled], logits


def vgg8(num_classes: int = 100) -> VGG:
    """RepDistiller's ``vgg8`` (its ``vgg8_bn``)."""
    return VGG(_CONFIGS[8], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    """RepDistiller's ``vgg11`` (its ``vgg11_bn``)."""
    return VGG(_CONFIGS[11], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    """RepDistiller's ``vgg13`` (its ``vgg13_bn``)."""
    return VGG(_CONFIGS[13], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    """RepDistiller's ``vgg16`` (its ``vgg16_bn``)."""
    return VGG(_CONFIGS[16], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    """RepDistiller's ``vgg19`` (its ``vgg19_bn``)."""
    return VGG(_CONFIGS[19], num_classes)
