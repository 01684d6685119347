"""The model zoo and feature taps.

CIFAR models under RepDistiller's names (Tian et al., "Contrastive Representation Distillation",
ICLR 2020), whose ``state_dict``s match RepDistiller's so its teacher checkpoints
(``torch.load(path)['model']``) load with ``strict=True``; ImageNet ResNets under torchvision's
names and ``state_dict`` layout. Every model's ``forward(x, is_feat=False, preact=False)``
follows RepDistiller: with ``is_feat`` it returns ``(features, logits)``.

    model = fastkd.models.create("resnet32x4", num_classes=100)
    model.load_state_dict(torch.load("resnet32x4_vanilla/ckpt_epoch_240.pth")["model"])
"""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from fastkd.models.mobilenet_imagenet import mobilenet_v1
from fastkd.models.mobilenetv2 import mobilenetv2
from fastkd.models.multibranch import MULTIBRANCH_MODELS, BranchOutput, MultiBranchResNet
from fastkd.models.resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                                  resnet56, resnet110)
from fastkd.models.resnet50 import ResNet50
from fastkd.models.resnet_imagenet import resnet18, resnet34, resnet50
from fastkd.models.sequence import RowConv, RowGRU, rowconv, rowgru
from fastkd.models.shufflenetv1 import ShuffleV1
from fastkd.models.shufflenetv2 import ShuffleV2
from fastkd.models.tap import FeatureTap, default_taps, resnet_taps
from fastkd.models.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from fastkd.models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8, "resnet14": resnet14, "resnet20": resnet20, "resnet32": resnet32,
    "resnet44": resnet44, "resnet56": resnet56, "resnet110": resnet110,
    "resnet8x4": resnet8x4, "resnet32x4": resnet32x4, "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1, "wrn_16_2": wrn_16_2, "wrn_40_1": wrn_40_1, "wrn_40_2": wrn_40_2,
    "vgg8": vgg8, "vgg11": vgg11, "vgg13": vgg13, "vgg16": vgg16, "vgg19": vgg19,
    "MobileNetV2": mobilenetv2, "ShuffleV1": ShuffleV1, "ShuffleV2": ShuffleV2,
}
"""RepDistiller's ``model_dict`` names → builders (CIFAR, 32×32 inputs, 100 classes by default)."""

IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "mobilenet_v1": mobilenet_v1,
}
"""torchvision's names → builders (ImageNet, 1000 classes by default), and MobileNet v1 (the
ResNet-50 → MobileNet distillation student; torchvision has none). Note ``resnet50`` is the
ImageNet model, ``ResNet50`` RepDistiller's CIFAR one."""

SEQUENCE_MODELS: dict[str, Callable[..., nn.Module]] = {"rowconv": rowconv, "rowgru": rowgru}
"""Models that read an image's rows as frames and output per-frame features ``[B, T, C]`` (IUSP's teacher and
student, :mod:`fastkd.models.sequence`; 10 classes by default)."""

_MODELS = {**CIFAR_MODELS, **MULTIBRANCH_MODELS, **IMAGENET_MODELS, **SEQUENCE_MODELS}


def names() -> list[str]:
    """The names :func:`create` accepts: the CIFAR zoo, the multi-branch CIFAR ResNets of online
    distillation (``resnet32_mb3`` …, see :mod:`fastkd.models.multibranch`), the ImageNet ResNets, the sequence
    models (``rowconv``, ``rowgru``)."""
    return list(_MODELS)


def create(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` with ``num_classes`` outputs (default: 100 for the CIFAR zoo,
    1000 for the ImageNet ResNets, 10 for the sequence models); ``kwargs`` go to its builder (e.g. ``drop_rate`` for WRNs,
    ``zero_init_residual`` for the ImageNet ResNets)."""
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(_MODELS)}")
    if num_classes is None:
        num_classes = 1000 if name in IMAGENET_MODELS else 10 if name in SEQUENCE_MODELS else 100
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
    "create", "names", "FeatureTap", "default_taps", "resnet_taps", "CIFAR_MODELS", "IMAGENET_MODELS",
    "MULTIBRANCH_MODELS", "SEQUENCE_MODELS", "MultiBranchResNet", "BranchOutput", "RowConv", "RowGRU", "rowconv",
    "rowgru",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
    "vgg16", "vgg19", "mobilenetv2", "ShuffleV1", "ShuffleV2", "resnet18", "resnet34", "resnet50",
    "mobilenet_v1",
]
