"""The loss registry: each loss declares, next to its class, the recipe key it answers to, the
features it takes and how it is built from the features of a probe batch. The trainer's
objectives (:mod:`fastkd.train`) build and call every loss through its entry here, so adding a
loss touches its own module and its tests, nothing in ``train/``::

    @register("kd", takes=("logits_s", "logits_t"))
    class KDLoss(nn.Module):
        def forward(self, logits_s, logits_t): ...

    @register("cc", takes=("pooled_s", "pooled_t"), build=widths(), derived=("s_dim", "t_dim"))
    class CCLoss(nn.Module):                       # embeds sized by the probed pooled features
        def __init__(self, s_dim, t_dim, feat_dim=128): ...

    @register("rotation", takes=("view_pooled_t",), objective="sskd_teacher", derived=("dim",),
              build=lambda cls, probe, **options: cls(probe.width("view_pooled_t"), **options))
    class RotationContrastLoss(nn.Module): ...

An entry says:

- ``takes``: the names (:data:`FEATURES`) of what the objective hands the loss at each step, in
  the order of its ``forward``'s arguments;
- ``build(cls, probe, **options)``: the criterion, from the recipe's options and the ``probe``, a
  :class:`Features` of one batch (the features the loss takes, with their shapes, plus the
  probe's own: ``num_data``, ...); by default ``cls(**options)``; :func:`widths` passes the
  widths of two features as ``s_dim`` / ``t_dim``. ``derived``: the constructor's
  arguments that ``build`` fills in, which are therefore not recipe options;
- ``call(criterion, *features)``: the loss from the taken features; by default
  ``criterion(*features)``. A loss built with trainable adapters (a regressor, connectors) says
  here how they apply;
- ``objective``: the objective that runs it. ``"offline"`` (the default, the teacher → student
  :class:`~fastkd.train.distiller.Distiller`) losses also run in any other objective that offers
  every feature they take (KD in SSKD's second stage, on the upright views); a loss that needs
  an objective of its own names it (``"online"``, ``"sskd_teacher"``, ``"sskd_student"``, ``"mixup"``),
  and a recipe's losses pick the objective by what they name;
- ``preact``: the objective reads every feature before its last activation (AB, as RepDistiller);
- ``init``: an :class:`InitStage`, RepDistiller's ``init()`` before the main stage (FT, AB, FSP);
- ``ramp``: the constructor option that counts epochs (DKD's ``warmup``, OKDDip's ``ramp_epochs``): a
  run shorter than it is warned about;
- ``ensemble(probes, **options)``: how the loss takes an ensemble of M teachers in one criterion (CRD: one
  pass over M teachers' banks), built from each teacher's probe and called with every teacher-side feature
  as a list over the teachers. Without it, an ensemble run gives a loss that takes only the teacher's logits
  the ensemble's logits, and builds any other teacher-reading loss once per teacher and sums the M terms
  (:class:`~fastkd.train.distiller.Distiller`).

This module sits at the bottom of the losses layer: it imports torch only, never the trainer.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["FEATURES", "Feature", "Features", "InitStage", "LossEntry", "MissingFeature", "entry", "register",
           "registered", "unregister", "widths"]


@dataclass(frozen=True)
class Feature:
    """One thing an objective can hand a loss: what it is, and whose it is (``"student"``,
    ``"teacher"`` or ``None`` for the batch and the run)."""

    doc: str
    side: str | None = None


# The vocabulary of ``takes``. ``features`` is a model's RepDistiller list (stem, each stage's
# output, the pooled penultimate feature), read through ``is_feat`` or feature taps. Each of these
# comes as ``NAME_s`` (the student's) and ``NAME_t`` (the teacher's).
_PAIRED = {
    "logits": "logits on the batch",
    "blocks": "stage outputs features[1:-1] (a list of maps)",
    "maps": "stem and stage outputs features[:-1] (a list of maps)",
    "last_block": "last stage's output features[-2]",
    "frames": "per-frame output [B, T, C] of a sequence model's last stage, features[-2]",
    "hint_layer": "stage output features[hint_layer] (the Distiller's hint_layer, 2 by default)",
    "pooled": "pooled penultimate feature features[-1]",
    "view_logits": "logits on the four rotated views of the batch [4B, K]",
    "view_pooled": "pooled penultimate features of the four rotated views [4B, C]",
    "mixed_logits": "logits on the mixed batch",
}
FEATURES: dict[str, Feature] = {
    **{f"{name}_{side[0]}": Feature(f"the {side}'s {what}", side) for name, what in _PAIRED.items()
       for side in ("student", "teacher")},
    "dist_logits_s": Feature("the student's distillation-token logits (a timm distilled ViT, DeiT), else its logits",
                             "student"),
    "branch_logits": Feature("the branches' logits [m, B, K] of a multi-branch student", "student"),
    "ensemble_logits": Feature("the ensemble logits [B, K] of a multi-branch student", "student"),
    "branch_pooled": Feature("the branches' pooled features [m, B, C] of a multi-branch student", "student"),
    "classifiers": Feature("the branch classifiers (nn.Linear) of a multi-branch student", "student"),
    "target": Feature("the batch's labels [B]"),
    "index": Feature("the batch's dataset indices [B] (a dataset that returns them: fastkd.data.indexed)"),
    "contrast_idx": Feature("the batch's contrast indices [B, K+1] drawn by the dataset, or None"),
    "epoch": Feature("the epoch being trained (None outside the engine)"),
    "mix_target_a": Feature("the labels of the mixed batch's first images"),
    "mix_target_b": Feature("the labels of the mixed batch's partner images"),
    "mix_lam": Feature("the mixing coefficient λ of the mixed batch"),
    "num_data": Feature("the training set's size, on the probe"),
    "teacher_losses": Feature("the loss states saved in the teacher's checkpoint, on the probe (SSKD's first "
                              "stage saves its rotation head there)", "teacher"),
}


class MissingFeature(ValueError):
    """A loss asked for a feature that the objective does not provide."""


class Features(dict):
    """Named features (:data:`FEATURES`) that an objective hands its losses, at a step or on its probe batch.

    ``where`` names the objective in errors: reading a name it does not hold raises
    :class:`MissingFeature` saying what it holds.
    """

    def __init__(self, where: str, values: Mapping[str, Any] = (), **more: Any):
        super().__init__(values, **more)
        self.where = where

    def __missing__(self, name: str):
        known = FEATURES.get(name)
        what = f" ({known.doc})" if known is not None else ""
        raise MissingFeature(f"takes {name!r}{what}, which {self.where} does not provide here; it provides "
                             f"{', '.join(sorted(self)) or 'nothing'}")

    def width(self, name: str) -> int:
        """The channels (dim 1) of the tensor feature ``name``."""
        value = self[name]
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise ValueError(f"feature {name!r} must be a tensor of at least 2 dims to have a width, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return int(value.shape[1])


def _build_plain(cls: type, probe: Features, **options: Any) -> nn.Module:
    return cls(**options)


def widths(student: str = "pooled_s", teacher: str = "pooled_t") -> Callable[..., nn.Module]:
    """A ``build`` that passes ``s_dim`` / ``t_dim``: the widths of the probed features ``student`` and
    ``teacher`` (the pooled ones by default), e.g. for a loss with linear embeds of each side."""
    def build(cls: type, probe: Features, **options: Any) -> nn.Module:
        return cls(s_dim=probe.width(student), t_dim=probe.width(teacher), **options)
    return build


def _call_plain(criterion: nn.Module, *features: Any) -> torch.Tensor:
    return criterion(*features)


def _no_modules(criterion: nn.Module) -> list[nn.Module]:
    return []


@dataclass(frozen=True)
class InitStage:
    """A loss's initialisation stage (RepDistiller's ``init()``), run before the main stage.

    It trains ``modules(criterion)`` and, when ``student``, the student's feature modules
    (``get_feat_modules()``), on ``loss(criterion, *features)`` over the features named in
    ``takes`` (by default the entry's main ``call`` and ``takes``). ``frozen``: the main stage does
    not train ``modules`` (FT's paraphraser).
    """

    modules: Callable[[nn.Module], list[nn.Module]] = _no_modules
    student: bool = False
    loss: Callable[..., torch.Tensor] | None = None
    takes: tuple[str, ...] | None = None
    frozen: bool = False


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: see the module docstring for the fields."""

    key: str
    cls: type
    takes: tuple[str, ...]
    build: Callable[..., nn.Module] = _build_plain
    call: Callable[..., torch.Tensor] = _call_plain
    derived: tuple[str, ...] = ()
    objective: str = "offline"
    preact: bool = False
    init: InitStage | None = None
    ramp: str | None = None
    ensemble: Callable[..., nn.Module] | None = None

    @property
    def options(self) -> list[str]:
        """The recipe options: the keyword arguments of ``cls``'s constructor less the derived ones."""
        return [name for name, p in _parameters(self.cls).items() if name not in self.derived]

    def default(self, option: str) -> Any:
        """The constructor's default for the recipe option ``option``."""
        parameter = _parameters(self.cls).get(option)
        if option in self.derived or parameter is None or parameter.default is parameter.empty:
            raise ValueError(f"loss {self.key!r} has no option {option!r} with a default; options: "
                             f"{', '.join(self.options) or 'none'}")
        return parameter.default

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss takes any of the teacher's features."""
        return any(FEATURES[name].side == "teacher" for name in self.takes)

    @property
    def init_takes(self) -> tuple[str, ...]:
        """The features the initialisation stage takes (none without one)."""
        if self.init is None:
            return ()
        return self.takes if self.init.takes is None else self.init.takes

    def create(self, probe: Features, options: Mapping[str, Any]) -> nn.Module:
        """The criterion for ``options`` (a recipe's, less ``weight``), built from ``probe``."""
        with self._named():
            return self.build(self.cls, probe, **options)

    def loss(self, criterion: nn.Module, features: Features) -> torch.Tensor:
        """The loss of ``criterion`` on the features it takes."""
        with self._named():
            return self.call(criterion, *(features[name] for name in self.takes))

    def create_ensemble(self, probes: list[Features], options: Mapping[str, Any]) -> nn.Module:
        """The one criterion of an ensemble run (``ensemble``), from each teacher's probe and ``options``."""
        with self._named():
            return self.ensemble(probes, **options)

    def init_loss(self, criterion: nn.Module, features: Features) -> torch.Tensor:
        """The initialisation stage's loss of ``criterion`` on the features that stage takes."""
        with self._named():
            return (self.init.loss or self.call)(criterion, *(features[name] for name in self.init_takes))

    def _named(self):
        return _named(self.key)


@contextlib.contextmanager
def _named(key: str):
    """Re-raises a :class:`MissingFeature` with the loss's key in front."""
    try:
        yield
    except MissingFeature as missing:
        if not str(missing).startswith("takes "):
            raise
        raise MissingFeature(f"the {key} loss {missing}") from None


_ENTRIES: dict[str, LossEntry] = {}


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named parameters of ``cls``'s constructor (no ``self``, ``*args``, ``**kwargs``)."""
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def register(key: str, *, takes: tuple[str, ...], build: Callable[..., nn.Module] | None = None,
             call: Callable[..., torch.Tensor] | None = None, derived: tuple[str, ...] = (),
             objective: str = "offline", preact: bool = False, init: InitStage | None = None,
             ramp: str | None = None, ensemble: Callable[..., nn.Module] | None = None):
    """Register the decorated loss class under the recipe key ``key``; see the module docstring.

    Raises ``ValueError`` for a key already registered (or ``ce``, the objectives' own cross
    entropy), a name in ``takes`` outside :data:`FEATURES`, or a ``derived`` name that is not a
    parameter of the constructor.
    """
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"key must be a loss name (a Python identifier such as 'kd'), got {key!r}")
    if key == "ce":
        raise ValueError("key 'ce' is the objectives' own cross entropy; register the loss under another key")
    if isinstance(takes, str) or not isinstance(takes, (tuple, list)):
        raise TypeError(f"takes must be a tuple of feature names, got {takes!r}")
    for name in (*takes, *((init.takes or ()) if init is not None else ())):
        if name not in FEATURES:
            raise ValueError(f"loss {key!r} takes {name!r}, which is not a feature; features: "
                             f"{', '.join(FEATURES)}")
    if not isinstance(objective, str) or not objective:
        raise ValueError(f"objective must name an objective (e.g. 'offline'), got {objective!r}")

    def add(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register({key!r}) decorates an nn.Module subclass, got {cls!r}")
        if key in _ENTRIES:
            raise ValueError(f"loss {key!r} is already registered by {_ENTRIES[key].cls.__qualname__}; "
                             f"unregister({key!r}) first to replace it")
        if ramp is not None and ramp not in _parameters(cls):
            raise ValueError(f"loss {key!r}: ramp {ramp!r} is not a parameter of {cls.__qualname__}")
        unknown = sorted(set(derived) - set(_parameters(cls)))
        if unknown:
            raise ValueError(f"loss {key!r}: derived {unknown} are not parameters of {cls.__qualname__}; its "
                             f"parameters: {', '.join(_parameters(cls)) or 'none'}")
        _ENTRIES[key] = LossEntry(key, cls, tuple(takes), build or _build_plain, call or _call_plain, tuple(derived),
                                  objective, bool(preact), init, ramp, ensemble)
        return cls

    return add


def unregister(key: str) -> LossEntry:
    """Remove ``key`` from the registry; return its entry."""
    entry(key)
    return _ENTRIES.pop(key)


def entry(key: str) -> LossEntry:
    """The entry registered under ``key``; ``ValueError`` naming the registered keys otherwise."""
    try:
        return _ENTRIES[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {key!r}; registered: {', '.join(sorted(_ENTRIES))}") from None


def registered() -> Mapping[str, LossEntry]:
    """Every registered loss by key, in registration order (a read-only view)."""
    return types.MappingProxyType(_ENTRIES)
