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

Their losses register with the objective they need (``objective="sskd_teacher"``, ``"sskd_student"``,
``"mixup"``: :mod:`fastkd.losses.self_supervised`) and take the features each objective offers
(its ``OFFERS``); SSKD's second stage also runs any offline loss that takes only what it offers
(KD, on the upright views, as published).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.functional.self_supervised import rotations
from fastkd.losses import Features
from fastkd.train import terms
from fastkd.train.distiller import feature_function


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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

    OBJECTIVE, WHAT, CE = "sskd_teacher", "SSKD's first stage", False
    OFFERS = frozenset({"view_pooled_t"})

    def __init__(self, teacher: nn.Module, losses: dict[str, dict], sample: torch.Tensor,
                 taps: Sequence[str] | None = None):
        super().__init__()
        self.entries = terms.entries_for(losses, self)
        self.student = self.teacher = _frozen(teacher)
        self._features = feature_function(teacher, taps)
        self.weights = terms.weights(losses)
        self.criteria = terms.build_criteria(self.entries, losses, self._views(sample)[0])

    def _views(self, images: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """The features of the four rotated views, and the teacher's logits on them."""
        with torch.no_grad():
            features, logits = self._features(rotations(images))
        return Features(self.WHAT, view_pooled_t=features[-1].detach()), logits

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        features, logits = self._views(images)
        parts = terms.evaluate(self.entries, self.criteria, features)
        return terms.total(self.weights, parts), parts, logits[0::4]


class SSKDDistiller(_FrozenTeacher):
    """SSKD stage 2 (losses ``ce``, ``kd``, ``sskd_rot``, ``sskd``); see the module docstring.

    ``teacher_losses``: the loss states saved in the teacher's checkpoint (its ``losses`` entry);
    stage 1 saves its head there (``rotation.head.*``), which :class:`fastkd.SSKDLoss` loads.
    """

    OBJECTIVE, WHAT, CE = "sskd_student", "SSKD's second stage", True
    OFFERS = frozenset({"logits_s", "logits_t", "view_logits_s", "view_logits_t", "view_pooled_s", "view_pooled_t",
                        "target", "epoch"})

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, dict], sample: torch.Tensor,
                 teacher_losses: dict[str, torch.Tensor], student_taps: Sequence[str] | None = None,
                 teacher_taps: Sequence[str] | None = None):
        super().__init__()
        self.entries = terms.entries_for(losses, self)
        self.student, self.teacher = student, _frozen(teacher)
        self._features_s = feature_function(student, student_taps)
        self._features_t = feature_function(teacher, teacher_taps)
        with torch.no_grad():
            was = student.training
            student.eval()
            probe = self._views(sample)
            student.train(was)
        probe["teacher_losses"] = teacher_losses
        self.weights = terms.weights(losses)
        self.criteria = terms.build_criteria(self.entries, losses, probe)

    def _views(self, images: torch.Tensor, **batch) -> Features:
        """The features of the four rotated views (logits on the upright ones as ``logits_*``)."""
        views = rotations(images)
        feat_s, logit_s = self._features_s(views)
        with torch.no_grad():
            feat_t, logit_t = self._features_t(views)
        logit_t = logit_t.detach()
        return Features(self.WHAT, logits_s=logit_s[0::4], logits_t=logit_t[0::4], view_logits_s=logit_s,
                        view_logits_t=logit_t, view_pooled_s=feat_s[-1], view_pooled_t=feat_t[-1].detach(), **batch)

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        features = self._views(images, target=target, epoch=epoch)
        upright_s = features["logits_s"]
        parts = {}
        if "ce" in self.weights:
            parts["ce"] = F.cross_entropy(upright_s.float(), target)
        parts.update(terms.evaluate(self.entries, self.criteria, features))
        return terms.total(self.weights, parts), parts, upright_s


class MixupDistiller(_FrozenTeacher):
    """STKD (losses: ``stkd``): each batch mixed by the loss that names this objective (``mix(images,
    target)``, :meth:`fastkd.STKDLoss.mix`), the student distilled from the teacher's logits on the
    mixture with the mixed labels."""

    OBJECTIVE, WHAT, CE = "mixup", "STKD", False
    OFFERS = frozenset({"mixed_logits_s", "mixed_logits_t", "mix_target_a", "mix_target_b", "mix_lam"})

    def __init__(self, student: nn.Module, teacher: nn.Module, losses: dict[str, dict]):
        super().__init__()
        self.entries = terms.entries_for(losses, self)
        mixers = [name for name, loss in self.entries.items() if loss.objective == self.OBJECTIVE]
        if len(mixers) != 1:
            raise ValueError(f"STKD mixes each batch with one loss that names the mixup objective, got {mixers}")
        self._mixer = mixers[0]
        self.student, self.teacher = student, _frozen(teacher)
        self.weights = terms.weights(losses)
        self.criteria = terms.build_criteria(self.entries, losses, Features(self.WHAT))

    def forward(self, images: torch.Tensor, target: torch.Tensor, index=None, contrast_idx=None, epoch=None):
        mixed, target_a, target_b, lam = self.criteria[self._mixer].mix(images, target)
        logit_s = self.student(mixed)
        with torch.no_grad():
            logit_t = self.teacher(mixed)
        features = Features(self.WHAT, mixed_logits_s=logit_s, mixed_logits_t=logit_t, mix_target_a=target_a,
                            mix_target_b=target_b, mix_lam=lam)
        parts = terms.evaluate(self.entries, self.criteria, features)
        return terms.total(self.weights, parts), parts, logit_s
