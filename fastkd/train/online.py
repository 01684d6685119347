"""The online objective: a multi-branch student whose ensemble teaches its branches, no teacher.

Plugs into :class:`~fastkd.train.engine.Trainer` like :class:`~fastkd.train.distiller.Distiller`
(``.student``, ``.criteria``, ``trainable_parameters()``, ``forward`` → (total, {name: loss},
logits)). The student is a :class:`fastkd.models.MultiBranchResNet`; a recipe picks the method by
its model and losses:

| method (recipe) | student | losses |
| --- | --- | --- |
| ONE, Lan et al. 2018 (``*_one``) | ``resnet32_one3`` (gate on the shared feature) | ce, online_kd (T 3) |
| diversity enhancement, Li et al. 2020 (``*_mbde``) | ``resnet32_mb3`` (Feature Fusion Module) | ce, online_kd, cd |
| OKDDip, Chen et al. 2020 (``*_okddip``) | ``resnet32_avg4`` (3 peers, the last branch leads) | ce, okddip |
| branches alone, the baseline (``*_online``) | ``resnet32_avg3`` | ce |

``ce`` is Σ_i CE(z_i, y) over the branches, plus CE(z_e, y) of the ensemble when the model learns
its ensemble weights (gate, FFM; those weights learn from it). ``online_kd`` distils every branch
toward the (detached) ensemble; ``cd`` is the Classifier Diversification loss on the branch
classifiers; ``okddip`` holds OKDDip's query / key projections and applies its ramp by the epoch.
Those losses register with ``objective="online"`` (:mod:`fastkd.losses.online`) and take the
features this objective offers (``OnlineDistiller.OFFERS``). Evaluation (:meth:`eval_outputs`)
reports the ensemble and every branch.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.functional.online import branch_cross_entropy
from fastkd.losses import Features
from fastkd.models.multibranch import MultiBranchResNet
from fastkd.train import terms


class OnlineDistiller(nn.Module):
    """Σ weight · loss over a multi-branch student's branches; see the module docstring."""

    OBJECTIVE, WHAT, CE = "online", "online distillation", True
    OFFERS = frozenset({"branch_logits", "ensemble_logits", "branch_pooled", "classifiers", "target", "epoch"})

    def __init__(self, student: nn.Module, losses: dict[str, dict]):
        super().__init__()
        if not isinstance(student, MultiBranchResNet):
            raise TypeError(f"online distillation needs a multi-branch student (fastkd.models.MultiBranchResNet, "
                            f"e.g. resnet32_mb3), got {type(student).__name__}")
        self.entries = terms.entries_for(losses, self)
        self.student = student
        self.weights = terms.weights(losses)
        probe = Features(self.WHAT, classifiers=student.classifiers())
        self.criteria = terms.build_criteria(self.entries, losses, probe)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters (trunk, branches, gate / FFM) and the losses' (OKDDip's projections)."""
        return [*self.student.parameters(), *self.criteria.parameters()]

    def forward(self, images: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None, epoch: int | None = None):
        out = self.student(images, branches=True)
        parts = {}
        if "ce" in self.weights:
            learned = self.student.aggregation != "mean"
            parts["ce"] = branch_cross_entropy(out.logits, target, out.ensemble if learned else None)
        features = Features(self.WHAT, branch_logits=out.logits, ensemble_logits=out.ensemble, branch_pooled=out.pooled,
                            classifiers=self.student.classifiers(), target=target, epoch=epoch)
        parts.update(terms.evaluate(self.entries, self.criteria, features))
        return terms.total(self.weights, parts), parts, out.ensemble

    def eval_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"": the ensemble's logits, "branch0": …, "branch{m-1}": …} for the engine's evaluation."""
        out = self.student(images, branches=True)
        return {"": out.ensemble, **{f"branch{i}": z for i, z in enumerate(out.logits.unbind(0))}}
