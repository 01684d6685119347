"""The distillation objective: a frozen teacher, a student and a weighted set of losses.

Models follow RepDistiller's convention, ``model(x, is_feat=True, preact=False)`` →
``(features, logits)``, where ``features`` lists the stem output, each stage's output and, last,
the pooled penultimate feature (every model of :mod:`fastkd.models` does this). Any other model
(torchvision, timm, your own) is read through a :class:`~fastkd.models.FeatureTap`: name its
modules with ``student_taps`` / ``teacher_taps`` in that order (stem, stages…, pooled feature),
or let :func:`~fastkd.models.default_taps` find them for ResNet-style models. Which features
each loss takes is declared by the loss itself, where it registers its recipe key
(:mod:`fastkd.losses._registry`): RepDistiller's ``train_student.py`` choice for the published ones.
This objective offers each network's

| feature | is |
| --- | --- |
| ``logits_s`` / ``logits_t`` | the logits |
| ``blocks_*`` | the stage outputs ``features[1:-1]`` (AT, NST, VID, AB) |
| ``maps_*`` | the stem and stage outputs ``features[:-1]`` (FSP) |
| ``last_block_*`` | the last stage's output ``features[-2]`` (SP, FT) |
| ``frames_*`` | a sequence model's last per-frame output ``features[-2]``, ``[B, T, C]`` (IUSP) |
| ``hint_layer_*`` | the stage output ``features[hint_layer]``, 2 by default (FitNet) |
| ``pooled_*`` | the pooled feature ``features[-1]`` (CC, CCKD, RKD, PKT, SRD, CRD) |

and the batch's ``target``, ``index`` (dataset indices, when the data gives them), ``contrast_idx``
and ``epoch``. Each loss is built by its registered adapter from the features of one probe batch
(and the training-set size ``num_data``): the loss modules with parameters (``ConvReg``, VID's
regressors, CRD's embeds, SRD's projector, CC's embeds, AB's connector, FT's translator) are
built here from those shapes, and are trained with the student.

FT, AB and FSP have an initialisation stage before the main one, RepDistiller's ``init()``
(:meth:`Distiller.init_stage`, run by the trainer for the recipe's ``init_epochs``, 30 in
RepDistiller): FT trains the paraphraser as an autoencoder of the teacher's ``features[-2]`` (MSE
of the reconstruction); AB trains the connector and the student's feature modules
(``get_feat_modules()``) with the AB loss; FSP trains those modules with the FSP loss (each says
so in its registered ``InitStage``). As published, the student stays in eval mode during that
stage (BatchNorm uses its running statistics). With AB in a recipe all features are
pre-activation (RepDistiller's ``preact``; AB registers with ``preact=True``).
RepDistiller's main stage gives AB and FSP weight 0 (the CIFAR-100 recipes do): a weight-0 loss
is only computed in the initialisation stage.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.losses import FEATURES, Features, LossEntry
from fastkd.models import FeatureTap, default_taps
from fastkd.train import terms

# what the Distiller reads from each network's RepDistiller feature list (and logits), by feature name
_VIEWS: dict[str, Callable] = {
    "logits": lambda features, logits, hint_layer: logits,
    "blocks": lambda features, logits, hint_layer: list(features[1:-1]),
    "maps": lambda features, logits, hint_layer: list(features[:-1]),
    "last_block": lambda features, logits, hint_layer: features[-2],
    "frames": lambda features, logits, hint_layer: _frames(features[-2]),
    "hint_layer": lambda features, logits, hint_layer: features[hint_layer],
    "pooled": lambda features, logits, hint_layer: features[-1],
}


def _frames(feature: torch.Tensor) -> torch.Tensor:
    """A sequence model's last per-frame output, which must be [B, T, C]."""
    if feature.dim() != 3:
        raise ValueError(f"the frames feature (features[-2]) must be per-frame [B, T, C], got shape "
                         f"{tuple(feature.shape)}: a loss that takes frames_s / frames_t (IUSP) needs sequence "
                         "models (fastkd.models: rowconv, rowgru)")
    return feature


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

    OBJECTIVE, WHAT, CE = "offline", "the offline Distiller", True
    OFFERS = frozenset({f"{view}_{side}" for view in _VIEWS for side in "st"}
                       | {"target", "index", "contrast_idx", "epoch"})

    def __init__(self, student: nn.Module, teacher: nn.Module | None, losses: dict[str, dict], sample: torch.Tensor,
                 num_data: int, hint_layer: int = 2, student_taps: Sequence[str] | None = None,
                 teacher_taps: Sequence[str] | None = None):
        super().__init__()
        self.entries = terms.entries_for(losses, self)
        if teacher is None and self.entries:
            raise ValueError(f"losses {sorted(self.entries)} need a teacher")
        self.student, self.teacher, self.hint_layer = student, teacher, hint_layer
        self.weights = terms.weights(losses)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.criteria = nn.ModuleDict()
        if self.entries:
            preact = any(loss.preact for loss in self.entries.values())
            self._features_s = feature_function(student, student_taps, preact)
            self._features_t = feature_function(teacher, teacher_taps, preact)
            self._taken = {name for loss in self.entries.values() for name in (*loss.takes, *loss.init_takes)}
            with torch.no_grad():
                was = student.training
                student.eval()
                feat_s, logit_s = self._features_s(sample)
                student.train(was)
                feat_t, logit_t = self._features_t(sample)
            probe = self._features(feat_s, logit_s, feat_t, logit_t, num_data=num_data)
            self.criteria = terms.build_criteria(self.entries, losses, probe)

    def _features(self, feat_s, logit_s, feat_t, logit_t, index=None, **batch) -> Features:
        """The features the losses take, from each network's feature list and logits (``None``: that
        network did not run) and the batch's ``target`` / ``contrast_idx`` / ``epoch`` (or the probe's
        ``num_data``); a batch without dataset indices offers no ``index``."""
        values = {f"{view}_{side}": read(feats, logits, self.hint_layer)
                  for side, feats, logits in (("s", feat_s, logit_s), ("t", feat_t, logit_t)) if feats is not None
                  for view, read in _VIEWS.items() if f"{view}_{side}" in self._taken}
        if index is not None:
            values["index"] = index
        return Features(self.WHAT, values, **batch)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _staged(self) -> dict[str, LossEntry]:
        """The losses with an initialisation stage, by name."""
        return {name: loss for name, loss in self.entries.items() if loss.init is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and those of the losses (regressors, embeds, projectors), less
        those only an initialisation stage trains (FT's paraphraser)."""
        frozen = {id(p) for name, loss in self._staged().items() if loss.init.frozen
                  for module in loss.init.modules(self.criteria[name]) for p in module.parameters()}
        return [*self.student.parameters(), *(p for p in self.criteria.parameters() if id(p) not in frozen)]

    # --- the initialisation stage of FT, AB and FSP -----------------------------------------
    def init_stage(self) -> tuple[nn.ModuleList, Callable] | None:
        """(modules, images → loss) of the initialisation stage, or None when no loss has one.

        The caller puts the distiller in eval mode and ``modules`` in train mode (RepDistiller's
        init(): the feature modules it trains are the student's, so its BatchNorms train) and
        optimises ``modules.parameters()``; see the module doc.
        """
        staged = self._staged()
        if not staged:
            return None
        modules = nn.ModuleList(module for name, loss in staged.items()
                                for module in loss.init.modules(self.criteria[name]))
        trains_student = [name for name, loss in staged.items() if loss.init.student]
        if trains_student:
            feat_modules = getattr(self.student, "get_feat_modules", None)
            if not callable(feat_modules):
                raise ValueError(f"the initialisation stage of {' and '.join(trains_student)} trains the student's "
                                 f"feature modules: {type(self.student).__name__} needs a get_feat_modules() method "
                                 "(every fastkd.models CIFAR model has one)")
            modules.append(feat_modules())
        reads_student = any(FEATURES[name].side == "student" for loss in staged.values() for name in loss.init_takes)

        def loss(images: torch.Tensor) -> torch.Tensor:
            feat_s, logit_s = self._features_s(images) if reads_student else (None, None)
            with torch.no_grad():
                feat_t, logit_t = self._features_t(images)
            features = self._features(feat_s, logit_s, [f.detach() for f in feat_t], logit_t.detach())
            total = 0.0
            for name, staged_loss in staged.items():
                total = total + staged_loss.init_loss(self.criteria[name], features).float()
            return total

        return modules, loss

    def forward(self, images: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None, epoch: int | None = None):
        needs_features = any(self.weights[name] != 0 for name in self.criteria)
        if needs_features:
            feat_s, logit_s = self._features_s(images)
            with torch.no_grad():
                feat_t, logit_t = self._features_t(images)
            feat_t = [f.detach() for f in feat_t]
        else:
            logit_s = self.student(images)
        parts = {}
        if "ce" in self.weights:
            parts["ce"] = F.cross_entropy(logit_s.float(), target)
        if needs_features:
            features = self._features(feat_s, logit_s, feat_t, logit_t, target=target, index=index,
                                      contrast_idx=contrast_idx, epoch=epoch)
            # a weight-0 loss is kept for its initialisation stage only (AB and FSP as published)
            active = {name: criterion for name, criterion in self.criteria.items() if self.weights[name] != 0}
            parts.update(terms.evaluate(self.entries, active, features))
        return terms.total(self.weights, parts), parts, logit_s
