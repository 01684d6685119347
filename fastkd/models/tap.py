"""Feature taps: the intermediate tensors a distillation loss needs, from any ``nn.Module``.

A tap names a submodule by its qualified name in ``model.named_modules()`` (``"layer3"``,
``"layer3.4.relu"``, ``"blocks.6"``) and records what it returns on every forward, through a
forward hook; ``"name:input"`` records its first input instead (a pre-activation feature is
the input of a ReLU, a pooled feature the input of the classifier). The model is untouched,
so the same code taps this zoo, torchvision and timm models.

    tap = FeatureTap(student, ["layer1", "layer2", "layer3", "fc:input"])
    logits, feats = tap(images)            # run the model and take its features
    ...
    tap.remove()                           # or use ``with FeatureTap(...) as tap:``

Memory: a tap keeps only the tensors of the latest forward and drops them when they are taken
(:meth:`FeatureTap.pop`, or calling the tap) or when the model's next forward starts, so no step
keeps the previous step's activations (or their autograd graph) alive.

In-place operations: a recorded tensor is the module's own result; if a later in-place op
(``ReLU(inplace=True)``, ``out += x``) overwrites it, reading it raises instead of returning
the overwritten values — tap with ``clone=True`` or tap another point. The input of a module
that works in place (``inplace=True``) is always cloned, so ``"relu:input"`` is safe.
A module that runs more than once per forward (torchvision's blocks reuse one ReLU) is
recorded at its last call.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

_WHERE = ("output", "input")


def _version(value) -> int | None:
    try:
        return value._version
    except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor
        return None


def _versions(value) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(_version(item) for item in value)
    return (_version(value),)


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(item) for item in value)
    return value


def _unknown_module(name: str, spec: str, model: nn.Module, modules: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, modules, n=6, cutoff=0.5)
    top = [child for child, _ in model.named_children()]
    hint = f"close matches: {', '.join(close)}" if close else f"its top-level modules: {', '.join(top)}"
    return ValueError(f"FeatureTap: {type(model).__name__} has no module {name!r} (tap {spec!r}); {hint}. "
                      "Names are those of model.named_modules().")


def _parse(spec: str, model: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, str]:
    if spec in modules:
        return spec, "output"
    name, sep, where = spec.rpartition(":")
    if not sep:
        raise _unknown_module(spec, spec, model, list(modules))
    if where not in _WHERE:
        raise ValueError(f"FeatureTap: tap {spec!r} must be 'module', 'module:output' or 'module:input', "
                         f"got {where!r} after the ':'")
    if name not in modules:
        raise _unknown_module(name, spec, model, list(modules))
    return name, where


class FeatureTap:
    """Record the outputs (or inputs) of ``model``'s submodules named in ``names``, in that order.

    Args:
        model: any ``nn.Module``.
        names: qualified module names (``model.named_modules()``), each optionally suffixed
            ``":output"`` (the default) or ``":input"`` (the module's first input); ``""`` is the
            model itself. :func:`default_taps` gives the zoo's ``is_feat`` features.
        clone: store copies (for tensors that later in-place ops overwrite).

    After a forward, :meth:`pop` returns the features in the order of ``names`` and forgets them;
    ``tap[name]``, :meth:`values` and :meth:`as_dict` read them without forgetting;
    ``tap(*args)`` runs the model and returns ``(output, tap.pop())``. :meth:`remove` (or leaving
    a ``with`` block) takes the hooks off the model.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, clone: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureTap: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"FeatureTap: names must be a list of module names, got {names!r}")
        names = tuple(names)
        if not names or not all(isinstance(name, str) for name in names):
            raise TypeError(f"FeatureTap: names must be a non-empty list of strings, got {names!r}")
        modules = dict(model.named_modules())
        self.model = model
        self.names = names
        self._key = {spec: _parse(spec, model, modules) for spec in names}
        self._values: dict[tuple[str, str], tuple[object, tuple]] = {}
        self._removed = False
        self._handles = [model.register_forward_pre_hook(self._on_model_call, prepend=True)]
        for key in dict.fromkeys(self._key.values()):
            name, where = key
            module = modules[name]
            if where == "input":
                copy = clone or bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(key, copy), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(key, clone)))

    def _on_model_call(self, module, args) -> None:
        self._values.clear()

    def _store(self, key, value, copy: bool) -> None:
        if copy:
            value = _copy(value)
        self._values[key] = (value, _versions(value))

    def _input_hook(self, key, copy: bool):
        def hook(module, args, kwargs):
            if args:
                value = args[0]
            elif kwargs:
                value = next(iter(kwargs.values()))
            else:
                raise RuntimeError(f"FeatureTap: {key[0]!r} was called without an input to record")
            self._store(key, value, copy)
        return hook

    def _output_hook(self, key, copy: bool):
        def hook(module, args, output):
            self._store(key, output, copy)
        return hook

    def __getitem__(self, spec: str):
        if spec not in self._key:
            raise KeyError(f"FeatureTap: {spec!r} is not one of the tapped names {list(self.names)}")
        if self._removed:
            raise RuntimeError("FeatureTap: this tap was removed")
        key = self._key[spec]
        if key not in self._values:
            raise RuntimeError(f"FeatureTap: {spec!r} did not run in the last forward of {type(self.model).__name__} "
                               "(no forward since the features were taken, or the module is skipped for this input)")
        value, versions = self._values[key]
        if _versions(value) != versions:
            raise RuntimeError(f"FeatureTap: the tensor recorded at {spec!r} was modified in place after it was "
                               "recorded (an in-place op such as ReLU(inplace=True) or +=); tap it with "
                               "clone=True, or tap the module that produces the final value")
        return value

    def values(self) -> list:
        """The features of the last forward, in the order of ``names``."""
        return [self[spec] for spec in self.names]

    def as_dict(self) -> dict:
        """The features of the last forward, by tap name."""
        return {spec: self[spec] for spec in self.names}

    def pop(self) -> list:
        """The features of the last forward, in the order of ``names``; the tap then forgets them."""
        try:
            return self.values()
        finally:
            self.clear()

    def clear(self) -> None:
        """Forget the recorded features."""
        self._values.clear()

    def __call__(self, *args, **kwargs):
        """Run the model; return ``(its output, the features)``."""
        output = self.model(*args, **kwargs)
        return output, self.pop()

    def remove(self) -> None:
        """Take the hooks off the model and forget the features (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._values.clear()
        self._removed = True

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._values)} recorded"
        return f"FeatureTap({type(self.model).__name__}, {list(self.names)}, {state})"


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation"


def resnet_taps(model: nn.Module, preact: bool = False) -> list[str]:
    """Taps for a torchvision- or timm-style ResNet (``layer1`` … ``layer4``, ``fc``): the stem
    output (``layer1:input``), the four stage outputs — with ``preact`` the input of each stage's
    last block's last activation module — and the pooled feature (``fc:input``)."""
    taps = ["layer1:input"]
    for index in (1, 2, 3, 4):
        stage = f"layer{index}"
        if not preact:
            taps.append(stage)
            continue
        block_name, block = list(getattr(model, stage).named_children())[-1]
        acts = [name for name, child in block.named_children() if _is_activation(child)]
        if not acts:
            raise ValueError(f"{stage}.{block_name} has no activation module whose input is the pre-activation")
        taps.append(f"{stage}.{block_name}.{acts[-1]}:input")
    return [*taps, "fc:input"]


def _is_resnet_like(model: nn.Module) -> bool:
    return all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in (1, 2, 3, 4)) \
        and isinstance(getattr(model, "fc", None), nn.Module)


def default_taps(model: nn.Module, preact: bool = False) -> list[str]:
    """The tap names whose features equal what ``model(x, is_feat=True, preact=preact)`` returns
    for a zoo model (block outputs, then the pooled penultimate feature), for CIFAR-sized input;
    for a torchvision/timm-style ResNet, :func:`resnet_taps`; for other timm and torchvision models,
    their family's (:mod:`fastkd.models.families`: stem, stages, pooled feature). Pre-activation
    features (``preact``) are known for the zoo and ResNets only."""
    from fastkd.models import families

    method = getattr(model, "feature_taps", None)
    if callable(method):
        return list(method(preact))
    if _is_resnet_like(model):
        return resnet_taps(model, preact)
    if families.is_timm(model) or families.is_torchvision(model):
        if preact:
            raise ValueError(f"no pre-activation taps are known for {type(model).__name__} (a loss such as AB reads "
                             "the stages before their last activation): name them with student.taps / teacher.taps "
                             "('module:input' of each stage's last activation)")
        return families.timm_taps(model) if families.is_timm(model) else families.torchvision_taps(model)
    raise TypeError(f"no default taps for {type(model).__name__}; name the modules to tap "
                    "(see model.named_modules()) and pass them to FeatureTap (a recipe: student.taps / teacher.taps)")
