"""The model zoo and feature taps.

CIFAR models under RepDistiller's names (Tian et al., "Contrastive Representation Distillation",
ICLR 2020), whose ``state_dict``s match RepDistiller's so its teacher checkpoints
(``torch.load(path)['model']``) load with ``strict=True``; ImageNet ResNets under torchvision's
names and ``state_dict`` layout; torchvision's and timm's models by a prefixed name (``tv:resnet50``,
``timm:deit_tiny_patch16_224``; :mod:`fastkd.models.sources`). Every model's ``forward(x, is_feat=False, preact=False)``
follows RepDistiller: with ``is_feat`` it returns ``(features, logits)``.

    model = fastkd.models.create("resnet32x4", num_classes=100)
    model.load_state_dict(torch.load("resnet32x4_vanilla/ckpt_epoch_240.pth")["model"])
"""
from __future__ import annotations

import difflib

from torch import nn

from fastkd.models import sources
from fastkd.models.ensemble import TeacherEnsemble
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
from fastkd.models.sources import check
from fastkd.models.tap import FeatureTap, default_taps, resnet_taps
from fastkd.models.reader import FeatureReader, fixed_input_size, input_size
from fastkd.models.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from fastkd.models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2
from fastkd.models.zoo import CIFAR_MODELS, IMAGENET_MODELS, SEQUENCE_MODELS, _MODELS, names


def create(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build the model ``name`` with ``num_classes`` outputs: a zoo model (default: 100 classes for the
    CIFAR zoo, 1000 for the ImageNet ResNets, 10 for the sequence models), ``tv:NAME`` (torchvision) or
    ``timm:NAME`` (timm; their own default class count). ``kwargs`` go to its builder (``drop_rate`` for WRNs,
    ``zero_init_residual`` for the ImageNet ResNets, ``img_size`` / ``patch_size`` / ``depth`` for a
    timm ViT). Never downloads weights (see :mod:`fastkd.models.sources`)."""
    if isinstance(name, str) and ":" in name:
        if num_classes is not None:
            _check_classes(num_classes)
        return sources.create_external(name, num_classes, **kwargs)
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(_MODELS)}")
    if num_classes is None:
        num_classes = 1000 if name in IMAGENET_MODELS else 10 if name in SEQUENCE_MODELS else 100
    _check_classes(num_classes)
    return _MODELS[name](num_classes=num_classes, **kwargs)


def _check_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


__all__ = [
    "create", "names", "check", "FeatureTap", "FeatureReader", "input_size", "fixed_input_size", "default_taps", "resnet_taps", "CIFAR_MODELS", "IMAGENET_MODELS",
    "MULTIBRANCH_MODELS", "MultiBranchResNet", "BranchOutput", "SEQUENCE_MODELS", "RowConv", "RowGRU", "rowconv",
    "rowgru", "TeacherEnsemble",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
    "vgg16", "vgg19", "mobilenetv2", "ShuffleV1", "ShuffleV2", "resnet18", "resnet34", "resnet50",
    "mobilenet_v1",
]
