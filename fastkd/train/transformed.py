"""Objectives that distil through transformed inputs: SSKD's two stages (rotations) and STKD (mixup).

Each plugs into :class:`~fastkd.train.engine.Trainer` like :class:`~fastkd.train.distiller.Distiller`
and reads features by RepDistiller's ``is_feat`` convention (or feature taps, through
:func:`~fastkd.train.distiller.feature_function`).

SSKD (Xu et al., ECCV 2020), recipes ``cifar100_sskd_teacher`` then ``cifar100_sskd``:

1. :class:`SSKDTeacherStage` (losses: ``rotation``): the teacher frozen in eval mode, its
   self-supervision head trained on the four views (60 epochs). The run's checkpoint holds the
   teacher as ``student`` and the head under ``losses``, so it is stage 2's ``teacher.checkpoint``.
2. :class:`SSKDDistiller` (losses: ``ce`` 0.1, ``kd`` 0.9, ``sskd_rot`` 2.7, ``sskd`` 10): the
   student sees the four views; CE and KD (T 4) on the upright ones, KD on the rotated ones
   (selected), similarity transfer (τ 0.5, selected) through the student's head and the frozen
   stage-1 head of the teacher.

STKD (a reconstruction, see :class:`fastkd.STKDLoss`): :class:`MixupDistiller` (losses: ``stkd``)
mixes each batch and distils on the mixture.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.functional.self_supervised import rotations
from fastkd.train.distiller import feature_function
from fastkd.train.recipe import LOSSES


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _options(losses: dict[str, dict], name: str) -> dict:
    return {k: v for k, v in losses.get(name, {}).items() if k != "weight"}


def _check_names(losses: dict[str, dict], valid: Sequence[str], what: str) -> None:
    bad = sorted(set(losses) - set(valid))
    if bad:
        raise ValueError(f"losses {bad} do not apply to {what}; valid: {', '.join(valid)}")


class _FrozenTeacher(nn.Module):
    """Keeps ``self.teacher`` in eval mode whatever ``train()`` is called with."""

    teacher: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.student.parameters(), *self.criteria.parameters()] if p.requires_grad]


class SSKDTeacherStage(_FrozenTeacher):
    """SSKD stage 1: train the teacher's self-supervision head (``rotation`` loss) on its frozen backbone.

    ``student`` is the teacher itself (what the engine evaluates and saves); only the head trains.
    """

    def __init__(self, teacher: nn.Module, losses: dict[str, dict], sample: torch.Tensor,
                 taps: Sequence[str] | None = None):
        super().__init__()
        _check_names(losses, ("rotation",), "SSKD's first stage")
        self.student = self.teacher = _frozen(teacher)
        self._features = feature_function(teacher, taps)
        with torch.no_grad():
            dim = self._features(sample)[0][-1].shape[1]
        self.weights = {"rotation": float(losses["rotation"]["weight"])}
        self.criteria = nn.ModuleDict({"rotation": LOSSES["rotation"](dim, **_options(losses, "rotation"))})

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        with torch.no_grad():
            features, logits = self._features(rotations(images))
        parts = {"rotation": self.criteria["rotation"](features[-1].detach())}
        return self.weights["rotation"] * parts["rotation"].float(), parts, logits[0::4]


class SSKDDistiller(_FrozenTeacher):
    """SSKD stage 2 (losses ``ce``, ``kd``, ``sskd_rot``, ``sskd``); see the module docstring.

    ``teacher_head``: the stage-1 head's state (``RotationContrastLoss`` keys ``head.*``, as saved
    under ``losses`` by stage 1 with a ``rotation.`` prefix, which is stripped here).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, dict], sample: torch.Tensor,
                 teacher_head: dict[str, torch.Tensor], student_taps: Sequence[str] | None = None,
                 teacher_taps: Sequence[str] | None = None):
        super().__init__()
        _check_names(losses, ("ce", "kd", "sskd_rot", "sskd"), "SSKD's second stage")
        self.student, self.teacher = student, _frozen(teacher)
        self._features_s = feature_function(student, student_taps)
        self._features_t = feature_function(teacher, teacher_taps)
        with torch.no_grad():
            was = student.training
            student.eval()
            s_dim = self._features_s(sample)[0][-1].shape[1]
            student.train(was)
            t_dim = self._features_t(sample)[0][-1].shape[1]
        self.weights = {name: float(options["weight"]) for name, options in losses.items()}
        self.criteria = nn.ModuleDict()
        for name in losses:
            if name == "sskd":
                self.criteria[name] = LOSSES[name](s_dim, t_dim, **_options(losses, name))
                self.criteria[name].load_teacher_head({k.removeprefix("rotation."): v for k, v in teacher_head.items()})
            elif name != "ce":
                self.criteria[name] = LOSSES[name](**_options(losses, name))

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        views = rotations(images)
        feat_s, logit_s = self._features_s(views)
        with torch.no_grad():
            feat_t, logit_t = self._features_t(views)
        upright_s, upright_t = logit_s[0::4], logit_t[0::4].detach()
        parts = {}
        if "ce" in self.weights:
            parts["ce"] = F.cross_entropy(upright_s.float(), target)
        if "kd" in self.criteria:
            parts["kd"] = self.criteria["kd"](upright_s, upright_t)
        if "sskd_rot" in self.criteria:
            parts["sskd_rot"] = self.criteria["sskd_rot"](logit_s, logit_t.detach(), target)
        if "sskd" in self.criteria:
            parts["sskd"] = self.criteria["sskd"](feat_s[-1], feat_t[-1].detach())
        total = sum(self.weights[name] * value.float() for name, value in parts.items())
        return total, parts, upright_s


class MixupDistiller(_FrozenTeacher):
    """STKD (losses: ``stkd``): each batch mixed by :meth:`fastkd.STKDLoss.mix`, the student distilled
    from the teacher's logits on the mixture with the mixed labels."""

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, dict]):
        super().__init__()
        _check_names(losses, ("stkd",), "STKD")
        self.student, self.teacher = student, _frozen(teacher)
        self.weights = {"stkd": float(losses["stkd"]["weight"])}
        self.criteria = nn.ModuleDict({"stkd": LOSSES["stkd"](**_options(losses, "stkd"))})

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        mixed, target_a, target_b, lam = self.criteria["stkd"].mix(images, target)
        logit_s = self.student(mixed)
        with torch.no_grad():
            logit_t = self.teacher(mixed)
        parts = {"stkd": self.criteria["stkd"](logit_s, logit_t, target_a, target_b, lam)}
        return self.weights["stkd"] * parts["stkd"].float(), parts, logit_s
