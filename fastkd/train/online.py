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
Evaluation (:meth:`eval_outputs`) reports the ensemble and every branch.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.functional.online import branch_cross_entropy
from fastkd.models.multibranch import MultiBranchResNet
from fastkd.train.recipe import LOSSES, ONLINE_LOSSES


class OnlineDistiller(nn.Module):
    """Σ weight · loss over a multi-branch student's branches; see the module docstring."""

    def __init__(self, student: nn.Module, losses: dict[str, dict]):
        super().__init__()
        if not isinstance(student, MultiBranchResNet):
            raise TypeError(f"online distillation needs a multi-branch student (fastkd.models.MultiBranchResNet, "
                            f"e.g. resnet32_mb3), got {type(student).__name__}")
        bad = sorted(set(losses) - {"ce", *ONLINE_LOSSES})
        if bad:
            raise ValueError(f"losses {bad} do not apply to online distillation; valid: ce, {', '.join(ONLINE_LOSSES)}")
        if "okddip" in losses and student.num_branches < 3:
            raise ValueError(f"okddip needs at least 3 branches (2 peers and a leader), the student has "
                             f"{student.num_branches}")
        self.student = student
        self.weights = {name: float(options["weight"]) for name, options in losses.items()}
        self.criteria = nn.ModuleDict()
        for name, options in losses.items():
            if name == "ce":
                continue
            kwargs = {k: v for k, v in options.items() if k != "weight"}
            if name == "okddip":
                kwargs["in_dim"] = student.classifiers()[0].in_features
            self.criteria[name] = LOSSES[name](**kwargs)

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
        for name, criterion in self.criteria.items():
            if name == "online_kd":
                parts[name] = criterion(out.logits, out.ensemble)
            elif name == "cd":
                parts[name] = criterion(self.student.classifiers())
            else:  # okddip
                parts[name] = criterion(out.logits, out.pooled, epoch=epoch)
        total = sum(self.weights[name] * value.float() for name, value in parts.items())
        return total, parts, out.ensemble

    def eval_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"": the ensemble's logits, "branch0": …, "branch{m-1}": …} for the engine's evaluation."""
        out = self.student(images, branches=True)
        return {"": out.ensemble, **{f"branch{i}": z for i, z in enumerate(out.logits.unbind(0))}}
