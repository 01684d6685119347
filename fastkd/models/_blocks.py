"""Pieces shared by the zoo: a stage that can hand back its pre-activation output, and the
weight initialisations the published models use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Stage(nn.Sequential):
    """A sequence of residual blocks; its last block can also return its pre-activation output.

    ``stage(x)`` returns the output tensor as ``nn.Sequential`` does. ``stage(x, return_preact=True)``
    returns ``(output, preact)``, where ``preact`` is the last block's value before its final
    activation: the feature RepDistiller's ``is_feat=True, preact=True`` hands to a distiller.
    """

    def forward(self, x: torch.Tensor, return_preact: bool = False):
        last = len(self) - 1
        for index, block in enumerate(self):
            if return_preact and index == last:
                return block(x, return_preact=True)
            x = block(x)
        return x


class GlobalAvgPool(nn.Module):
    """Average over the whole feature map, whatever its size: ``avg_pool2d`` with the map's own size as the
    kernel. At the published input size this is the published fixed pooling (``AvgPool2d(8)`` on the CIFAR
    ResNets' 8 × 8 maps) to the bit, which ``adaptive_avg_pool2d`` is not (it sums in another order); at
    any other size (28 × 28 images, 40 × 30) it still gives one value per channel. Output ``[B, C, 1, 1]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """:class:`GlobalAvgPool` as a function."""
    return F.avg_pool2d(x, tuple(x.shape[-2:]))


def run_stages(stages, x: torch.Tensor, preact: bool):
    """Run ``stages`` in turn; return the output, each stage's output and (if ``preact``) each
    stage's pre-activation output (otherwise an empty list)."""
    outs, pres = [], []
    for stage in stages:
        if preact:
            x, pre = stage(x, return_preact=True)
            pres.append(pre)
        else:
            x = stage(x)
        outs.append(x)
    return x, outs, pres


def init_weights(model: nn.Module, *, linear_std: float | None = None, linear_bias_zero: bool = False) -> None:
    """He initialisation (normal, fan-out) of every convolution, unit/zero affine BatchNorm.

    ``linear_std`` draws the ``nn.Linear`` weights from N(0, std²) instead of torch's default;
    ``linear_bias_zero`` zeroes their biases. Convolution biases, where present, are zeroed.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_bias_zero:
                nn.init.zeros_(module.bias)
