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
| ft | ``Translator`` (trainable) of ``features[-2]`` against ``Paraphraser`` (frozen) of the teacher's |
| ab | ``Connector`` (trainable) of the pre-activation stage outputs ``features[1:-1]``, against the teacher's |
| fsp | the stem and stage outputs ``features[:-1]`` |

The loss modules with parameters (``ConvReg``, VID's regressors, CRD's embeds, SRD's projector,
CC's embeds, AB's connector, FT's translator) are built here from feature shapes probed with one
batch, and are trained with the student.

FT, AB and FSP have an initialisation stage before the main one, RepDistiller's ``init()``
(:meth:`Distiller.init_stage`, run by the trainer for the recipe's ``init_epochs``, 30 in
RepDistiller): FT trains the paraphraser as an autoencoder of the teacher's ``features[-2]`` (MSE
of the reconstruction); AB trains the connector and the student's feature modules
(``get_feat_modules()``) with the AB loss; FSP trains those modules with the FSP loss. As
published, the student stays in eval mode during that stage (BatchNorm uses its running
statistics). With AB in a recipe all features are pre-activation (RepDistiller's ``preact``).
RepDistiller's main stage gives AB and FSP weight 0 (the CIFAR-100 recipes do): a weight-0 loss
is only computed in the initialisation stage.
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

_INIT_STAGED = ("ft", "ab", "fsp")  # the losses with an initialisation stage (RepDistiller's init())
OWN_OBJECTIVES = (*ONLINE_LOSSES, *SSKD_LOSSES, *MIXUP_LOSSES)


def feature_function(model: nn.Module, taps: Sequence[str] | None = None, preact: bool = False) -> Callable:
    """x → (features, logits) for ``model``: its own ``is_feat`` when it has one and no taps are
    named, else a :class:`~fastkd.models.FeatureTap` on ``taps`` (or the model's default taps);
    ``preact`` asks for the stage outputs before their last activation."""
    if taps is None and "is_feat" in inspect.signature(model.forward).parameters:
        return lambda x: model(x, is_feat=True, preact=preact)
    tap = FeatureTap(model, taps if taps is not None else default_taps(model, preact))

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
            preact = "ab" in losses
            self._features_s = feature_function(student, student_taps, preact)
            self._features_t = feature_function(teacher, teacher_taps, preact)
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
        if name == "ab":
            return nn.ModuleDict({"loss": cls(**kwargs), "connector": fastkd.Connector(
                [f.shape for f in feat_s[1:-1]], [f.shape for f in feat_t[1:-1]])})
        if name == "ft":
            return nn.ModuleDict({"loss": cls(**kwargs), "paraphraser": fastkd.Paraphraser(feat_t[-2].shape),
                                  "translator": fastkd.Translator(feat_s[-2].shape, feat_t[-2].shape)})
        return cls(**kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and those of the losses (regressors, embeds, projectors), less
        FT's paraphraser, which only its initialisation stage trains."""
        frozen = {id(p) for p in self.criteria["ft"]["paraphraser"].parameters()} if "ft" in self.criteria else set()
        return [*self.student.parameters(), *(p for p in self.criteria.parameters() if id(p) not in frozen)]

    # --- the initialisation stage of FT, AB and FSP -----------------------------------------
    def init_stage(self) -> tuple[nn.ModuleList, Callable] | None:
        """(modules, images → loss) of the initialisation stage, or None when no loss has one.

        The caller puts the distiller in eval mode and ``modules`` in train mode (RepDistiller's
        init(): the feature modules it trains are the student's, so its BatchNorms train) and
        optimises ``modules.parameters()``; see the module doc.
        """
        staged = [name for name in _INIT_STAGED if name in self.criteria]
        if not staged:
            return None
        modules = nn.ModuleList()
        if "ft" in staged:
            modules.append(self.criteria["ft"]["paraphraser"])
        if "ab" in staged:
            modules.append(self.criteria["ab"]["connector"])
        if "ab" in staged or "fsp" in staged:
            feat_modules = getattr(self.student, "get_feat_modules", None)
            if not callable(feat_modules):
                raise ValueError(f"the initialisation stage of {' and '.join(s for s in staged if s != 'ft')} trains "
                                 f"the student's feature modules: {type(self.student).__name__} needs a "
                                 "get_feat_modules() method (every fastkd.models CIFAR model has one)")
            modules.append(feat_modules())

        def loss(images: torch.Tensor) -> torch.Tensor:
            feat_s = self._features_s(images)[0] if "ab" in staged or "fsp" in staged else None
            with torch.no_grad():
                feat_t = [f.detach() for f in self._features_t(images)[0]]
            total = 0.0
            if "ft" in staged:
                _, rebuilt = self.criteria["ft"]["paraphraser"](feat_t[-2])
                total = total + F.mse_loss(rebuilt.float(), feat_t[-2].float())
            if "ab" in staged:
                ab = self.criteria["ab"]
                total = total + ab["loss"](ab["connector"](feat_s[1:-1]), feat_t[1:-1]).float()
            if "fsp" in staged:
                total = total + self.criteria["fsp"](feat_s[:-1], feat_t[:-1]).float()
            return total

        return modules, loss

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
        if name == "ab":
            return criterion["loss"](criterion["connector"](feat_s[1:-1]), feat_t[1:-1])
        if name == "fsp":
            return criterion(feat_s[:-1], feat_t[:-1])
        if name == "ft":
            with torch.no_grad():
                factor_t = criterion["paraphraser"](feat_t[-2], is_factor=True)
            return criterion["loss"](criterion["translator"](feat_s[-2]), factor_t)
        if name == "crd":
            if index is None:
                raise ValueError("the crd loss needs the dataset indices of the batch (an index-returning dataset)")
            return criterion(feat_s[-1], feat_t[-1], index, contrast_idx)
        return criterion(feat_s[-1], feat_t[-1])  # cc, cckd, rkd, pkt, srd

    def forward(self, images: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None, epoch: int | None = None):
        needs_features = any(self.weights[name] != 0 for name in self.criteria)
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
            if self.weights[name] == 0:
                continue  # kept for its initialisation stage only (AB and FSP as published)
            parts[name] = self._term(name, feat_s, logit_s, feat_t, logit_t, target, index, contrast_idx, epoch)
        total = sum(self.weights[name] * value.float() for name, value in parts.items())
        return total, parts, logit_s
