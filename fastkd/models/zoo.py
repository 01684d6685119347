"""fastkd's own model zoo: RepDistiller's CIFAR models, the multi-branch CIFAR ResNets and the ImageNet
ResNets by name (:func:`fastkd.models.create` builds them; :mod:`fastkd.models.sources` and
:mod:`fastkd.models.reader` read these tables without importing the package above them)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fastkd.models.mobilenet_imagenet import mobilenet_v1
from fastkd.models.mobilenetv2 import mobilenetv2
from fastkd.models.multibranch import MULTIBRANCH_MODELS
from fastkd.models.resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                                  resnet56, resnet110)
from fastkd.models.resnet50 import ResNet50
from fastkd.models.resnet_imagenet import resnet18, resnet34, resnet50
from fastkd.models.sequence import rowconv, rowgru
from fastkd.models.shufflenetv1 import ShuffleV1
from fastkd.models.shufflenetv2 import ShuffleV2
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
