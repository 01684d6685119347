"""The distillation objective: a frozen teacher, a student and a weighted set of losses.

Models follow RepDistiller's convention, ``model(x, is_feat=True, preact=False)`` →
``(features, logits)``, where ``features`` lists the stem output, each stage's output and, last,
the pooled penultimate feature (every model of :mod:`fastkd.models` does this). Any other model
(torchvision, timm, your own) is read through a :class:`~fastkd.models.FeatureReader`: name its
modules with ``student_taps`` / ``teacher_taps`` in that order (stem, stages…, pooled feature),
or let :func:`~fastkd.models.default_taps` find them (ResNet-style models, torchvision's and timm's
families); a vision transformer's tokens come as maps, its class token as the pooled feature. Which features
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

With a teacher cache (``teacher_cache=``, a :class:`~fastkd.train.teacher_cache.TeacherCache`; the
recipe's ``teacher.cache``) there is no teacher network: each batch carries the teacher's outputs
(``forward(..., teacher={"logits": ..., "feature.i": ...})``, appended to the batch by
:meth:`~fastkd.train.teacher_cache.TeacherCache.batches`), and the losses are built from the cache's
first record. Everything else is the same computation, so a cache that holds exact outputs gives the
live run's numbers to the bit.

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

import copy
import inspect
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.losses import FEATURES, Features, LossEntry, MissingFeature
from fastkd.models.families import spread
from fastkd.models import FeatureReader, fixed_input_size, input_size
from fastkd.models.ensemble import TeacherEnsemble
from fastkd.train import terms

if TYPE_CHECKING:
    from fastkd.train.teacher_cache import TeacherCache

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
    named, else a :class:`~fastkd.models.FeatureReader` on ``taps`` (or the model's default taps:
    torchvision's and timm's families too), which gives maps ``[B, C, h, w]`` of a transformer's
    tokens; ``preact`` asks for the stage outputs before their last activation."""
    if taps is None and "is_feat" in inspect.signature(model.forward).parameters:
        return lambda x: model(x, is_feat=True, preact=preact)
    return FeatureReader(model, taps, preact)


def _distilled(logits):
    """(class logits, distillation-token logits or None): a DeiT student in distilled training gives both."""
    if isinstance(logits, (tuple, list)):
        return logits[0], (logits[1] if len(logits) > 1 else None)
    return logits, None


paired = spread  # how the longer of two networks' stage lists meets the shorter one


def _shapes(value) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) if value.dim() else "scalar"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shapes(v) for v in value) + "]"
    return type(value).__name__


def probe_input(model: nn.Module, other: nn.Module | None = None, batch: int = 4) -> torch.Tensor:
    """A batch of zeros, on ``model``'s device, of the size one of the models only takes
    (:func:`fastkd.models.fixed_input_size`: a ViT's), else the size ``model`` is built for
    (:func:`fastkd.models.input_size`)."""
    h, w = fixed_input_size(model) or (fixed_input_size(other) if other is not None else None) or input_size(model)
    parameter = next(model.parameters(), None)
    return torch.zeros(batch, 3, h, w, device=parameter.device if parameter is not None else "cpu")


class Distiller(nn.Module):
    """Σ weight · loss for one batch; ``forward`` returns (total, {name: unweighted loss}, student logits).

    ``losses``: {name: {"weight": w, **options}} as a recipe's ``losses`` (or {name: w}); ``sample``
    is one input batch used to probe feature shapes (default: zeros of the student's input size,
    :func:`fastkd.models.input_size`); ``num_data`` the training-set size, needed only by losses
    that keep a bank per sample (CRD). ``student_taps`` / ``teacher_taps`` name the modules to read
    (default: :func:`fastkd.models.default_taps`). The teacher is put in eval mode, frozen, and kept
    so by :meth:`train`. ``teacher_cache``: the teacher's outputs come from this cache instead
    (``teacher`` is then ``None``; see the module doc).

    ``teacher`` may be a :class:`~fastkd.models.TeacherEnsemble` of M networks (each read through its own
    taps, ``TeacherEnsemble.taps``). Then a loss that takes only the teacher's logits (KD, DKD) takes the
    ensemble's logits (the averaged prediction); a loss that registered an ``ensemble`` form takes all M
    teachers in one criterion (CRD: one bank per teacher, scored in one pass); any other teacher-reading loss
    is built once per teacher (``criteria[name]`` is then a ``ModuleList``) and its M terms are summed, as CRD's
    are (the CRD paper's ensemble recipe). Losses with an initialisation stage (FT, AB, FSP) and a teacher
    cache do not take an ensemble.

    Each loss is tried once on the probe's features when it is built, so a loss that cannot take
    what the models give (vectors where it needs maps, channels that must match) is refused here
    with the features' shapes, not at the first step. Where the two networks give different
    numbers of stages, the longer list is :func:`paired` down to the shorter.
    """

    OBJECTIVE, WHAT, CE = "offline", "the offline Distiller", True
    OFFERS = frozenset({f"{view}_{side}" for view in _VIEWS for side in "st"}
                       | {"dist_logits_s", "target", "index", "contrast_idx", "epoch"})

    def __init__(self, student: nn.Module, teacher: nn.Module | None, losses: dict[str, dict],
                 sample: torch.Tensor | None = None, num_data: int | None = None, hint_layer: int = 2,
                 student_taps: Sequence[str] | None = None, teacher_taps: Sequence[str] | None = None,
                 teacher_cache: "TeacherCache | None" = None):
        super().__init__()
        losses = terms.normalised(losses)
        self.entries = terms.entries_for(losses, self)
        if teacher is not None and teacher_cache is not None:
            raise ValueError("give the teacher or its cache (teacher_cache=), not both")
        if teacher is None and teacher_cache is None and self.entries:
            raise ValueError(f"losses {sorted(self.entries)} need a teacher")
        self.student, self.teacher, self.hint_layer = student, teacher, hint_layer
        self.teacher_cache = teacher_cache
        self.ensemble = teacher if isinstance(teacher, TeacherEnsemble) else None
        self._forms: dict[str, str] = {}  # an ensemble run's loss → "combined" | "stacked" | "each"
        if self.ensemble is not None:
            if teacher_taps is not None:
                raise ValueError("teacher_taps: an ensemble's members name their taps in TeacherEnsemble(taps=[...])")
            staged = sorted(name for name, loss in self.entries.items() if loss.init is not None)
            if staged:
                raise ValueError(f"losses {staged} have an initialisation stage, which does not take an ensemble "
                                 "of teachers: distil from one teacher, or leave them out")
        self.weights = terms.weights(losses)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.criteria = nn.ModuleDict()
        if self.entries:
            preact = any(loss.preact for loss in self.entries.values())
            self._features_s = feature_function(student, student_taps, preact)
            if self.ensemble is not None:
                self._features_t = [feature_function(member, taps, preact)
                                    for member, taps in zip(self.ensemble.members, self.ensemble.taps)]
            else:
                self._features_t = feature_function(teacher, teacher_taps, preact) if teacher is not None else None
            self._taken = {name for loss in self.entries.values() for name in (*loss.takes, *loss.init_takes)}
            needs_banks = sorted(name for name, loss in self.entries.items() if "num_data" in loss.derived)
            if num_data is None and needs_banks:
                raise ValueError(f"losses {needs_banks} keep a memory bank per training sample: give num_data= (the "
                                 "training set's size) and batches that carry dataset indices")
            if sample is None:
                sample = probe_input(student, teacher)
            if "dist_logits_s" in self._taken and callable(getattr(student, "set_distilled_training", None)):
                student.set_distilled_training(True)  # DeiT: training steps give (class, distillation) logits
            with torch.no_grad():
                was = student.training
                student.eval()
                feat_s, logit_s = self._features_s(sample)
                student.train(was)
                probe = None if teacher_cache is None else teacher_cache.probe(sample.shape[0], device=sample.device)
                feat_t, logit_t = self._teacher_outputs(sample, probe)
            extra = {} if num_data is None else {"num_data": num_data}
            if self.ensemble is not None:
                self.criteria = self._build_for_ensemble(losses, self._ensemble_features(
                    feat_s, logit_s, feat_t, logit_t, **extra))
                target = self.ensemble.combine(logit_t).argmax(dim=1)
                self._try_on_ensemble(self._ensemble_features(feat_s, logit_s, feat_t, logit_t, target=target,
                                                              contrast_idx=None, epoch=1))
            else:
                probe = self._features(feat_s, logit_s, feat_t, logit_t, **extra)
                self.criteria = terms.build_criteria(self.entries, losses, probe)
                target = logit_t.argmax(dim=1) if logit_t is not None else None
                self._try_on(self._features(feat_s, logit_s, feat_t, logit_t, target=target, contrast_idx=None,
                                            epoch=1))
        # the losses a step computes: a weight-0 loss is kept for its initialisation stage only (AB and FSP as published)
        self._active = {name: criterion for name, criterion in self.criteria.items() if self.weights[name] != 0}

    def _teacher_outputs(self, images: torch.Tensor, cached: dict | None = None):
        """The teacher's (features, logits) on ``images``: run (no gradient), or, with a teacher cache, read
        from ``cached`` (the batch's record; feature positions the cache does not hold are ``None``)."""
        if self.ensemble is not None:  # every member's (features, logits), as lists over the members
            with torch.no_grad():
                outputs = [read(images) for read in self._features_t]
            return [[f.detach() for f in feats] for feats, _ in outputs], [logits for _, logits in outputs]
        if self.teacher_cache is None:
            with torch.no_grad():
                feat_t, logit_t = self._features_t(images)
            return [f.detach() for f in feat_t], logit_t
        if cached is None:
            raise ValueError("this Distiller reads its teacher from a cache, and the batch carries no teacher outputs: "
                             "iterate the train loader through TeacherCache.batches(loader)")
        return [cached.get(f"feature.{i}") for i in range(self.teacher_cache.num_features)], cached.get("logits")

    def _try_on(self, features: Features) -> None:
        """Each loss once on the probe's features (on a copy: no state such as BatchNorm statistics or a
        memory bank moves); a loss that fails is refused with the shapes of what it takes."""
        for name, loss in self.entries.items():
            if "index" in loss.takes:  # a bank per sample: its inputs are the pooled vectors, sized by the build
                continue
            self._try_loss(name, loss, self.criteria[name], features)

    @staticmethod
    def _try_loss(name: str, loss: LossEntry, criterion: nn.Module, features: Features) -> None:
        try:
            with torch.no_grad():
                loss.loss(copy.deepcopy(criterion), features)
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            if isinstance(exc, MissingFeature):
                raise
            given = ", ".join(f"{key} {_shapes(features[key])}" for key in loss.takes if key in features)
            raise ValueError(f"loss {name!r} cannot take what these models give ({given}): "
                             f"{str(exc).strip().splitlines()[0]}") from None

    # --- an ensemble of teachers ------------------------------------------------------------
    def _ensemble_features(self, feat_s, logit_s, feats_t, logits_t, **batch):
        """(combined, per teacher, stacked) features of an ensemble step: ``combined`` offers the ensemble's
        logits as ``logits_t``; ``per[m]`` teacher m's features and logits as a single teacher's; ``stacked``
        every teacher-side feature as a list over the teachers."""
        per = [self._features(feat_s, logit_s, feats, logits, **batch) for feats, logits in zip(feats_t, logits_t)]
        wanted = set(self._forms.values()) or {"combined", "stacked"}  # at build: every form
        combined = (Features(self.WHAT, dict(per[0], logits_t=self.ensemble.combine(logits_t)))
                    if "combined" in wanted else None)
        stacked = None
        if "stacked" in wanted:
            teacher_side = [name for name in per[0] if name in FEATURES and FEATURES[name].side == "teacher"]
            stacked = Features(self.WHAT, dict(per[0], **{name: [p[name] for p in per] for name in teacher_side}))
        return combined, per, stacked

    def _form(self, loss: LossEntry) -> str:
        """How an ensemble run serves ``loss``: ``combined`` (it reads only the teacher's logits: the
        ensemble's), ``stacked`` (its registered ``ensemble`` form) or ``each`` (one criterion per teacher)."""
        read = {name for name in loss.takes if FEATURES[name].side == "teacher"}
        if read <= {"logits_t"}:
            return "combined"
        return "stacked" if loss.ensemble is not None else "each"

    def _build_for_ensemble(self, losses: dict[str, dict], views) -> nn.ModuleDict:
        combined, per, stacked = views
        criteria = nn.ModuleDict()
        for name, loss in self.entries.items():
            form = self._forms[name] = self._form(loss)
            options = terms.options(losses[name])
            if form == "combined":
                criteria[name] = loss.create(combined, options)
            elif form == "stacked":
                criteria[name] = loss.create_ensemble(per, options)
            else:
                criteria[name] = nn.ModuleList(loss.create(probe, options) for probe in per)
        return criteria

    def _served(self, name: str, views) -> list[tuple[nn.Module, Features]]:
        """(criterion, the features it takes) of loss ``name`` in an ensemble step: one pair, or one per teacher."""
        combined, per, stacked = views
        form = self._forms[name]
        if form == "each":
            return list(zip(self.criteria[name], per))
        return [(self.criteria[name], combined if form == "combined" else stacked)]

    def _ensemble_terms(self, names, views) -> dict[str, torch.Tensor]:
        """{name: loss} of an ensemble step for the losses ``names`` (the Σ over teachers for ``each``)."""
        out = {}
        for name in names:
            terms = [self.entries[name].loss(criterion, features) for criterion, features in self._served(name, views)]
            out[name] = sum(terms[1:], terms[0])
        return out

    def _try_on_ensemble(self, views) -> None:
        """:meth:`_try_on` for an ensemble run: each loss on copies of its criteria."""
        for name, loss in self.entries.items():
            if "index" not in loss.takes:
                for criterion, features in self._served(name, views):
                    self._try_loss(name, loss, criterion, features)

    def _features(self, feat_s, logit_s, feat_t, logit_t, index=None, dist_s=None, **batch) -> Features:
        """The features the losses take, from each network's feature list and logits (``None``: that
        network did not run) and the batch's ``target`` / ``contrast_idx`` / ``epoch`` (or the probe's
        ``num_data``); a batch without dataset indices offers no ``index``."""
        values = {f"{view}_{side}": read(feats, logits, self.hint_layer)
                  for side, feats, logits in (("s", feat_s, logit_s), ("t", feat_t, logit_t)) if feats is not None
                  for view, read in _VIEWS.items() if f"{view}_{side}" in self._taken}
        for view in ("blocks", "maps"):  # stage lists of different lengths meet at the shorter one's
            if f"{view}_s" in values and f"{view}_t" in values:
                count = min(len(values[f"{view}_s"]), len(values[f"{view}_t"]))
                values[f"{view}_s"], values[f"{view}_t"] = (paired(values[f"{view}_s"], count),
                                                            paired(values[f"{view}_t"], count))
        if index is not None:
            values["index"] = index
        if "dist_logits_s" in self._taken and feat_s is not None:
            values["dist_logits_s"] = logit_s if dist_s is None else dist_s
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

        def loss(images: torch.Tensor, teacher: dict | None = None) -> torch.Tensor:
            feat_s, logit_s = self._features_s(images) if reads_student else (None, None)
            feat_t, logit_t = self._teacher_outputs(images, teacher)
            features = self._features(feat_s, logit_s, feat_t, logit_t)
            total = 0.0
            for name, staged_loss in staged.items():
                total = total + staged_loss.init_loss(self.criteria[name], features).float()
            return total

        return modules, loss

    def forward(self, images: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None, epoch: int | None = None, teacher: dict | None = None):
        """``teacher``: the batch's teacher outputs, with a teacher cache (see the module doc)."""
        needs_features = bool(self._active)
        if needs_features:
            feat_s, logit_s = self._features_s(images)
            feat_t, logit_t = self._teacher_outputs(images, teacher)
        else:
            logit_s = self.student(images)
        logit_s, dist_s = _distilled(logit_s)
        parts = {}
        if "ce" in self.weights:
            parts["ce"] = F.cross_entropy(logit_s.float(), target)
        if needs_features and self.ensemble is not None:
            views = self._ensemble_features(feat_s, logit_s, feat_t, logit_t, target=target, index=index,
                                            contrast_idx=contrast_idx, epoch=epoch, dist_s=dist_s)
            parts.update(self._ensemble_terms(self._active, views))
        elif needs_features:
            features = self._features(feat_s, logit_s, feat_t, logit_t, target=target, index=index,
                                      contrast_idx=contrast_idx, epoch=epoch, dist_s=dist_s)
            parts.update(terms.evaluate(self.entries, self._active, features))
        return terms.total(self.weights, parts), parts, logit_s
