"""Default taps for torchvision and timm models: which modules give the stem, the stages and the
pooled feature, in the order a distillation objective reads them (RepDistiller's ``is_feat`` list:
stem, each stage's output, the pooled penultimate feature).

- timm models say where their stages are in ``feature_info`` (the modules ``forward_intermediates``
  returns): a CNN's stages are its entries after the first (the stem); a vision transformer lists
  every block at one stride, so its stem is ``patch_embed`` and its stages are up to four blocks
  spread evenly over the depth, ending at the last. The pooled feature is the input of the
  classifier (``get_classifier()``): the class token or the averaged tokens after the final norm.
- torchvision models by their module names: ResNets (``layer1`` … ``layer4``, ``fc``); the
  ``features`` trunks of MobileNet v2 / v3, EfficientNet, ConvNeXt, Swin, VGG, … (the last module
  at each resolution is a stage, found by one forward of a small input); ViT (``conv_proj``,
  ``encoder.layers.*``, ``heads.head``).

Vision-transformer blocks give tokens ``[B, N, C]`` and Swin stages channels-last maps; the
:class:`~fastkd.models.reader.FeatureReader` turns them into ``[B, C, h, w]`` maps.
"""
from __future__ import annotations

import torch
from torch import nn

STAGES = 4
"""How many blocks of a transformer (all at one stride) are taken as its stages."""


def spread(items: list, count: int = STAGES) -> list:
    """``count`` items of ``items`` spread evenly, ending at the last (all of them when there are fewer): a
    transformer's blocks taken as its stages, and the longer of two networks' stage lists met with the shorter
    (a ResNet's 4 stages against a 2-block ViT: stages 2 and 4)."""
    if len(items) <= count:
        return list(items)
    return [items[(i + 1) * len(items) // count - 1] for i in range(count)]


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def is_torchvision(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.")


def channels_last_stages(model: nn.Module) -> bool:
    """Whether the model's stages give ``[B, H, W, C]`` maps (torchvision's and timm's Swin)."""
    return "swin" in type(model).__name__.lower()


def timm_taps(model: nn.Module) -> list[str]:
    """Default taps of a timm model, from its ``feature_info`` and classifier (see the module doc)."""
    info = getattr(model, "feature_info", None)
    entries = [dict(item) for item in info] if isinstance(info, (list, tuple)) else []
    modules = dict(model.named_modules())
    entries = [e for e in entries if e.get("module") in modules]
    if not entries:
        raise TypeError(f"no default taps for timm's {type(model).__name__}: it has no feature_info naming its "
                        "stages; name the modules to tap (student.taps / teacher.taps)")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = head[0] if isinstance(head, (tuple, list)) else head  # DeiT's distilled ViT: (head, head_dist)
    classifier = _name_of(model, head) if isinstance(head, nn.Module) else None
    if not classifier:
        raise TypeError(f"no default taps for timm's {type(model).__name__}: its classifier is not a module of it; "
                        "name the modules to tap (student.taps / teacher.taps)")
    stages = [e["module"] for e in entries]
    if len({e.get("reduction") for e in entries}) == 1 and len(entries) > 1:  # a transformer: blocks at one stride
        stages = spread(stages)
    stem = next((name for name in ("stem", "patch_embed", "conv_stem") if name in modules and name not in stages), None)
    if stem is None:  # the first entry is the stem (a ResNet's act1)
        stem, stages = stages[0], stages[1:]
    return [stem, *stages, f"{classifier}:input"]


def _trunk_stages(model: nn.Module, trunk: nn.Sequential, prefix: str, size: int = 64) -> list[str]:
    """The last child of ``trunk`` at each resolution, by one forward of a ``size``² input (eval mode, no grad)."""
    sides: dict[str, tuple] = {}
    nhwc = channels_last_stages(model)

    def hook(name):
        def record(module, args, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sides[name] = tuple(output.shape[1:3] if nhwc else output.shape[2:])
        return record

    handles = [child.register_forward_hook(hook(f"{prefix}.{name}")) for name, child in trunk.named_children()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for handle in handles:
            handle.remove()
    order = [f"{prefix}.{name}" for name, _ in trunk.named_children() if f"{prefix}.{name}" in sides]
    return [name for i, name in enumerate(order) if i + 1 == len(order) or sides[order[i + 1]] != sides[name]]


def _classifier_input(model: nn.Module) -> str:
    """The tap of the pooled feature: the input of the last ``nn.Linear`` of the classifier."""
    for head in ("classifier", "head", "heads", "fc"):
        module = getattr(model, head, None)
        if isinstance(module, nn.Linear):
            return f"{head}:input"
        if isinstance(module, nn.Module):
            linears = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
            if linears:
                return f"{head}.{linears[-1]}:input"
    raise TypeError(f"no default taps for torchvision's {type(model).__name__}: no classifier (classifier, head, "
                    "heads or fc) found; name the modules to tap (student.taps / teacher.taps)")


def torchvision_taps(model: nn.Module) -> list[str]:
    """Default taps of a torchvision classification model (see the module doc)."""
    encoder = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(getattr(model, "conv_proj", None), nn.Module) and isinstance(encoder, nn.Sequential):  # ViT
        blocks = [f"encoder.layers.{name}" for name, _ in encoder.named_children()]
        return ["conv_proj", *spread(blocks), _classifier_input(model)]
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Sequential) and len(trunk) > 1:
        stages = _trunk_stages(model, trunk, "features")
        first = f"features.{next(iter(trunk.named_children()))[0]}"
        stem, stages = first, [s for s in stages if s != first]
        return [stem, *stages, _classifier_input(model)]
    raise TypeError(f"no default taps for torchvision's {type(model).__name__}; name the modules to tap "
                    "(student.taps / teacher.taps)")
