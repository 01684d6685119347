"""A model's distillation features in the forms losses take, whatever the model's family.

:class:`FeatureReader` runs a model through a :class:`~fastkd.models.FeatureTap` on its taps (stem,
stages…, pooled feature: :func:`~fastkd.models.default_taps` or names given) and hands back
RepDistiller's ``(features, logits)``, with every feature but the last as a map ``[B, C, h, w]``
and the last as a vector ``[B, D]``:

- tokens ``[B, N, C]`` (a vision transformer's blocks) become maps: the patch grid (h, w) is the
  input's size over the model's patch size (``patch_embed.patch_size`` in timm, ``patch_size`` in
  torchvision; else the square that fits), the N − h·w tokens in front of the patches (class,
  distillation and register tokens) are taken apart — the pooled feature carries the class token;
- channels-last stages ``[B, H, W, C]`` (Swin) are permuted to ``[B, C, H, W]``;
- the pooled feature is flattened (``[B, C, 1, 1]``), averaged over space or tokens when it is a
  map or tokens.

So map losses (AT, SP, FitNet, NST, VID, …) and vector losses (KD's logits, CRD, SRD, RKD, PKT, CC)
meet the same forms from a ResNet, a ViT or a Swin, and teacher and student may come from
different families.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastkd.models import families
from fastkd.models.tap import FeatureTap, default_taps


def _first_tensor(value):
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), value)
    return value


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The model's patch size (timm: ``patch_embed.patch_size``; torchvision's ViT: ``patch_size``), or None."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        size = getattr(model, "patch_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    return None


def token_grid(tokens: int, image: Sequence[int], patch: tuple[int, int] | None) -> tuple[int, int, int]:
    """``(prefix tokens, h, w)`` of ``tokens`` tokens of an ``image`` (H, W) cut into ``patch``-sized patches."""
    if patch is not None:
        h, w = image[0] // patch[0], image[1] // patch[1]
        if 0 < h * w <= tokens:
            return tokens - h * w, h, w
    for prefix in range(0, min(tokens, 9)):
        side = math.isqrt(tokens - prefix)
        if side > 0 and side * side == tokens - prefix:
            return prefix, side, side
    raise ValueError(f"{tokens} tokens do not form a patch grid of a {image[0]}x{image[1]} input "
                     f"(patch size {patch}); tap modules that give maps, or a model with a square grid")


def as_map(feature, image: Sequence[int], patch: tuple[int, int] | None, channels_last: bool = False):
    """``feature`` as ``[B, C, h, w]`` (see the module doc); a vector or anything else as it is."""
    feature = _first_tensor(feature)
    if not isinstance(feature, torch.Tensor):
        return feature
    if feature.dim() == 4 and channels_last:
        return feature.permute(0, 3, 1, 2)
    if feature.dim() == 3:
        prefix, h, w = token_grid(feature.shape[1], image, patch)
        return feature[:, prefix:].transpose(1, 2).reshape(feature.shape[0], feature.shape[2], h, w)
    return feature


def as_vector(feature, channels_last: bool = False):
    """``feature`` as ``[B, D]``: flattened, or averaged over space (a map) or tokens."""
    feature = _first_tensor(feature)
    if not isinstance(feature, torch.Tensor) or feature.dim() <= 2:
        return feature
    if feature.dim() == 3:
        return feature.mean(dim=1)
    if feature.dim() == 4:
        return feature.mean(dim=(1, 2) if channels_last else (2, 3))
    return feature.flatten(1)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) ``model`` only takes, when it says so (a timm ViT's ``patch_embed.img_size`` without a
    dynamic size, torchvision's ViT ``image_size``); ``None`` for a model that takes any size."""
    embed = getattr(model, "patch_embed", None)
    size = None if getattr(embed, "dynamic_img_size", False) else getattr(embed, "img_size", None)
    size = size or getattr(model, "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) ``model`` is built for: :func:`fixed_input_size`, a timm model's ``pretrained_cfg``,
    32 for fastkd's CIFAR zoo, else 224 (ImageNet)."""
    size = fixed_input_size(model)
    if size is not None:
        return size
    config = getattr(model, "pretrained_cfg", None) or {}
    if len(config.get("input_size", ())) == 3:
        return int(config["input_size"][1]), int(config["input_size"][2])
    from fastkd.models.zoo import CIFAR_MODELS, MULTIBRANCH_MODELS

    zoo = {builder.__module__ for builder in (*CIFAR_MODELS.values(), *MULTIBRANCH_MODELS.values())}
    return (32, 32) if type(model).__module__ in zoo else (224, 224)


class FeatureReader:
    """x → (features, logits) of ``model``, the features in the forms losses take (see the module doc).

    Args:
        model: any classifier ``nn.Module`` whose output is its logits.
        taps: module names as :class:`~fastkd.models.FeatureTap` takes them (stem, stages…, pooled
            feature, in that order); ``None``: :func:`~fastkd.models.default_taps`.
        preact: the stages before their last activation (only where the taps know them).
    """

    def __init__(self, model: nn.Module, taps: Sequence[str] | None = None, preact: bool = False):
        names = list(taps) if taps is not None else default_taps(model, preact)
        if len(names) < 2:
            raise ValueError(f"taps must name at least two modules (a stage and the pooled feature, last), got {names}")
        self.model, self.names = model, names
        self.tap = FeatureTap(model, names)
        self.patch = patch_size(model)
        self.channels_last = families.channels_last_stages(model)

    def __call__(self, x: torch.Tensor):
        logits, features = self.tap(x)
        image = tuple(x.shape[-2:])
        maps = [as_map(f, image, self.patch, self.channels_last) for f in features[:-1]]
        if isinstance(logits, (tuple, list)) and len(logits) == 2 and all(isinstance(t, torch.Tensor) for t in logits) \
                and logits[0].shape == logits[1].shape:  # DeiT's distilled training: (class, distillation) logits
            return [*maps, as_vector(features[-1], self.channels_last)], tuple(logits)
        return [*maps, as_vector(features[-1], self.channels_last)], _first_tensor(logits)

    def remove(self) -> None:
        """Take the taps off the model."""
        self.tap.remove()
