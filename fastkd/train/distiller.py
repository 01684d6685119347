"""The distillation objective: a frozen teacher, a student and a weighted set of losses.

Models follow RepDistiller's convention, ``model(x, is_feat=True, preact=False)`` →
``(features, logits)``, where ``features`` lists the stem output, each stage's output and, last,
the pooled penultimate feature (every model of :mod:`fastkd.models` does this). Any other model
(torchvision, timm, your own) is read through a :class:`~fastkd.models.FeatureTap`: name its
modules with ``student_taps`` / ``teacher_taps`` in that order (stem, stages…, pooled feature),
or let :func:`~fastkd.models.default_taps` find them for ResNet-style models. Which features
each loss takes is RepDistiller's ``train_student.py`` choice:

| loss | student / teacher inputs |
| --- | --- |
| kd, dkd | logits (dkd also the labels and the epoch) |
| hint | ``ConvReg`` (trainable) of stage output ``hint_layer`` (2), against the teacher's |
| at, nst | the stage outputs ``features[1:-1]`` |
| vid | one ``VIDLoss`` (trainable) per stage output ``features[1:-1]`` |
| sp | the last stage's output ``features[-2]`` |
| cc, cckd, rkd, pkt, srd, crd | the pooled feature ``features[-1]`` (crd also the dataset indices) |

The loss modules with parameters (``ConvReg``, VID's regressors, CRD's embeds, SRD's projector,
CC's embeds) are built here from feature shapes probed with one batch, and are trained with the
student. FT, AB and FSP need a pre-training stage (a paraphraser, or an initialisation phase)
that this objective does not run: they are refused with a message saying so.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.models import FeatureTap, default_taps
from fastkd.train.recipe import LOSSES, MIXUP_LOSSES, ONLINE_LOSSES, SSKD_LOSSES

OWN_OBJECTIVES = (*ONLINE_LOSSES, *SSKD_LOSSES, *MIXUP_LOSSES)
_STAGED = {"ft": "a paraphraser pre-trained on the teacher", "ab": "a 30-epoch initialisation stage",
           "fsp": "a 30-epoch initialisation stage"}


def feature_function(model: nn.Module, taps: Sequence[str] | None = None) -> Callable:
    """x → (features, logits) for ``model``: its own ``is_feat`` when it has one and no taps are
    named, else a :class:`~fastkd.models.FeatureTap` on ``taps`` (or the model's default taps)."""
    if taps is None and "is_feat" in inspect.signature(model.forward).parameters:
        return lambda x: model(x, is_feat=True)
    tap = FeatureTap(model, taps if taps is not None else default_taps(model))

    def run(x):
        logits, features = tap(x)
        return list(features), logits

    return run


class Distiller(nn.Module):
    """Σ weight · loss for one batch; ``forward`` returns (total, {name: unweighted loss}, student logits).

    ``losses``: {name: {"weight": w, **options}} as a recipe's ``losses``; ``sample`` is one input
    batch used to probe feature shapes; ``num_data`` the training-set size (CRD's memory banks).
    The teacher is put in eval mode, frozen, and kept so by :meth:`train`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, losses: dict[str, dict], sample: torch.Tensor,
                 num_data: int, hint_layer: int = 2, student_taps: Sequence[str] | None = None,
                 teacher_taps: Sequence[str] | None = None):
        super().__init__()
        for name in losses:
            if name in _STAGED:
                raise ValueError(f"loss {name!r} needs {_STAGED[name]}, which the engine does not run yet; "
                                 f"use it through fastkd.{LOSSES[name].__name__} in your own loop")
            if name in OWN_OBJECTIVES:
                raise ValueError(f"loss {name!r} runs in its own objective (fastkd.train.objectives.build_objective), "
                                 f"not in the offline Distiller")
            if name != "ce" and name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; valid: ce, {', '.join(LOSSES)}")
        if teacher is None and set(losses) - {"ce"}:
            raise ValueError(f"losses {sorted(set(losses) - {'ce'})} need a teacher")
        self.student, self.teacher, self.hint_layer = student, teacher, hint_layer
        self.weights = {name: float(options["weight"]) for name, options in losses.items()}
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.criteria = nn.ModuleDict()
        if set(losses) - {"ce"}:
            self._features_s = feature_function(student, student_taps)
            self._features_t = feature_function(teacher, teacher_taps)
            with torch.no_grad():
                was = student.training
                student.eval()
                feat_s, _ = self._features_s(sample)
                student.train(was)
                feat_t, _ = self._features_t(sample)
            for name, options in losses.items():
                if name != "ce":
                    kwargs = {k: v for k, v in options.items() if k != "weight"}
                    self.criteria[name] = self._build(name, kwargs, feat_s, feat_t, num_data)

    def _build(self, name: str, kwargs: dict, feat_s: list, feat_t: list, num_data: int) -> nn.Module:
        """The loss module, with the feature sizes it needs filled in from the probed features."""
        cls = LOSSES[name]
        if name == "hint":
            return nn.ModuleDict({"loss": cls(**kwargs), "regressor": fastkd.ConvReg(
                feat_s[self.hint_layer].shape, feat_t[self.hint_layer].shape)})
        if name == "vid":
            return nn.ModuleList([cls(s.shape[1], s.shape[1], t.shape[1], **kwargs)
                                  for s, t in zip(feat_s[1:-1], feat_t[1:-1])])
        if name == "crd":
            return cls(feat_s[-1].shape[1], feat_t[-1].shape[1], num_data, **kwargs)
        if name in ("srd", "cc", "cckd"):
            return cls(s_dim=feat_s[-1].shape[1], t_dim=feat_t[-1].shape[1], **kwargs)
        return cls(**kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and those of the losses (regressors, embeds, projectors)."""
        return [*self.student.parameters(), *self.criteria.parameters()]

    def _term(self, name: str, feat_s, logit_s, feat_t, logit_t, target, index, contrast_idx, epoch):
        criterion = self.criteria[name]
        if name == "kd":
            return criterion(logit_s, logit_t)
        if name == "dkd":
            return criterion(logit_s, logit_t, target, epoch=epoch)
        if name == "hint":
            layer = self.hint_layer
            return criterion["loss"](criterion["regressor"](feat_s[layer]), feat_t[layer])
        if name in ("at", "nst"):
            return criterion(list(feat_s[1:-1]), list(feat_t[1:-1]))
        if name == "vid":
            return sum(vid(s, t) for vid, s, t in zip(criterion, feat_s[1:-1], feat_t[1:-1]))
        if name == "sp":
            return criterion(feat_s[-2], feat_t[-2])
        if name == "crd":
            if index is None:
                raise ValueError("the crd loss needs the dataset indices of the batch (an index-returning dataset)")
            return criterion(feat_s[-1], feat_t[-1], index, contrast_idx)
        return criterion(feat_s[-1], feat_t[-1])  # cc, cckd, rkd, pkt, srd

    def forward(self, images: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None, epoch: int | None = None):
        needs_features = bool(len(self.criteria))
        if needs_features:
            feat_s, logit_s = self._features_s(images)
            with torch.no_grad():
                feat_t, logit_t = self._features_t(images)
            feat_t = [f.detach() for f in feat_t]
        else:
            logit_s, feat_s, feat_t, logit_t = self.student(images), None, None, None
        parts = {}
        if "ce" in self.weights:
            parts["ce"] = F.cross_entropy(logit_s.float(), target)
        for name in self.criteria:
            parts[name] = self._term(name, feat_s, logit_s, feat_t, logit_t, target, index, contrast_idx, epoch)
        total = sum(self.weights[name] * value.float() for name, value in parts.items())
        return total, parts, logit_s
