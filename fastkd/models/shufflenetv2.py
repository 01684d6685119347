"""ShuffleNet V2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018) for CIFAR, as used by RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; ``models/ShuffleNetv2.py``): a 1×1 stem, three stages (a strided
``DownBlock`` then channel-split ``BasicBlock``s) of 116/232/464 channels, a 1×1 conv to 1024.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models._blocks import Stage, global_avg_pool, run_stages
from fastkd.models.shufflenetv1 import ShuffleBlock, ShuffleFeatures

# net_size → stage widths + final conv width, blocks per stage (RepDistiller's table)
CONFIGS = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


class SplitBlock(nn.Module):
    """Split the channels at ``ratio``: (x[:, :c], x[:, c:])."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Split; the second half goes 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN; concatenate, ReLU, shuffle.

    The ReLU (``relu_out``) runs on the concatenation ``[x1, branch]``, which is the block's
    pre-activation (RepDistiller's ``preact``). The untouched half ``x1`` comes from a previous
    block's or DownBlock's ReLU, so it is non-negative and ReLU leaves it unchanged: the output
    equals RepDistiller's ``shuffle(cat([x1, relu(branch)]))``.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.shuffle = ShuffleBlock()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = torch.cat([x1, self.bn3(self.conv3(out))], 1)
        out = self.shuffle(self.relu_out(pre))
        return (out, pre) if return_preact else out


class DownBlock(nn.Module):
    """Two strided branches, each ending in ReLU: depthwise 3×3-BN, 1×1-BN-ReLU on the left;
    1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU on the right; concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(ShuffleFeatures, nn.Module):
    """ShuffleNet V2 of size ``net_size`` (a key of :data:`CONFIGS`) for 32×32 inputs.

    ``forward(x, is_feat=False, preact=False)``: logits; with ``is_feat`` ``([f0, …, f4], logits)``:
    the stem output, the three stage outputs (with ``preact`` the last block's pre-ReLU
    concatenation, before the shuffle, as RepDistiller returns it) and the pooled feature.
    """

    def __init__(self, net_size: float = 1, num_classes: int = 100):
        super().__init__()
        if net_size not in CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(CONFIGS)}, got {net_size!r}")
        out_channels, num_blocks = CONFIGS[net_size]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> Stage:
        layers = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return Stage(*layers)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        x, outs, pres = run_stages((self.layer1, self.layer2, self.layer3), f0, is_feat and preact)
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = global_avg_pool(x).flatten(1)  # the published avg_pool2d(x, 4) at 32 × 32
        logits = self.linear(pooled)
        if not is_feat:
            return logits
        return [f0, *(pres if preact else outs), pooled], logits


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net size 1: widths 116/232/464, 1024; 3/7/3 blocks)."""
    return ShuffleNetV2(1, num_classes)
