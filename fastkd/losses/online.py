"""Online distillation modules (formulas in :mod:`fastkd.functional.online`): the losses of ONE,
OKDDip and multi-branch diversity enhancement on a :class:`fastkd.models.MultiBranchResNet`.

The ensemble weights (ONE's gate, the Feature Fusion Module) belong to the model, which forms the
ensemble logits; OKDDip's query / key projections belong to :class:`OKDDipLoss`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.online import (classifier_diversity_loss, okddip_loss, online_kd_loss, peer_attention,
                                      sigmoid_rampup)
from fastkd.losses._registry import register

__all__ = ["OnlineKDLoss", "ClassifierDiversityLoss", "OKDDipLoss"]


@register("online_kd", takes=("branch_logits", "ensemble_logits"), objective="online")
class OnlineKDLoss(nn.Module):
    """Every branch toward the ensemble teacher (ONE; multi-branch diversity enhancement), T = 3.

    loss = T²·Σ_i (1/B) Σ_b KL(softmax(z_e/T) ‖ softmax(z_i/T)), see
    :func:`fastkd.functional.online_kd_loss`. ``detach_teacher`` (default) stops the gradient at
    the ensemble, so the ensemble weights learn from its cross entropy only.
    """

    def __init__(self, temperature: float = 3.0, detach_teacher: bool = True) -> None:
        super().__init__()
        self.temperature = _checks.number("temperature", temperature, positive=True)
        self.detach_teacher = bool(detach_teacher)

    def forward(self, branch_logits: torch.Tensor, ensemble_logits: torch.Tensor) -> torch.Tensor:
        teacher = ensemble_logits.detach() if self.detach_teacher else ensemble_logits
        return online_kd_loss(branch_logits, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, detach_teacher={self.detach_teacher}"


@register("cd", takes=("classifiers",), objective="online")
class ClassifierDiversityLoss(nn.Module):
    """Classifier Diversification (Li et al., ACCV 2020): Σ_{i<j} ‖W_iᵀ W_j‖_F, weight 5e-8 in the recipes.

    ``forward(weights)`` takes the branch classifiers' weight matrices (or the ``nn.Linear``
    classifiers themselves); the gradient reaches every one of them. It reads no batch, so the
    empty-batch rule of the other losses does not apply to it.
    """

    def forward(self, weights: Sequence[torch.Tensor | nn.Linear]) -> torch.Tensor:
        if isinstance(weights, (list, tuple)):
            weights = [w.weight if isinstance(w, nn.Linear) else w for w in weights]
        return classifier_diversity_loss(weights)



def _with_projections(cls, probe, **options) -> nn.Module:
    """OKDDip: query / key projections of the branches' pooled features (the classifiers' input width)."""
    classifiers = probe["classifiers"]
    if len(classifiers) < 3:
        raise ValueError(f"okddip needs at least 3 branches (2 peers and a leader), the student has {len(classifiers)}")
    return cls(in_dim=classifiers[0].in_features, **options)


@register("okddip", takes=("branch_logits", "branch_pooled", "epoch"), objective="online", build=_with_projections,
          derived=("in_dim",), ramp="ramp_epochs")
class OKDDipLoss(nn.Module):
    """OKDDip (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020).

    The last of the m branches is the group leader, the others are peers. Peer i's target is
    t_i = Σ_j a_ij z_j with a = softmax_j(q_i·k_j), q_i = W_q h_i, k_i = W_k h_i (``dim`` = 8, h_i
    the pooled last-block feature of peer i); the leader distils from the peers' mean; the sum is
    scaled by OKDDip's ramp exp(−5(1 − e/ramp_epochs)²) when ``epoch`` is given (see
    :func:`fastkd.functional.okddip_loss`, :func:`fastkd.functional.sigmoid_rampup`). ``epoch`` counts from 1,
    as fastkd's engine hands it to every loss; OKDDip's published code counts from 0, so e = epoch − 1
    (the first epoch is weighted exp(−5)).

    ``in_dim``: the channels of h (the engine fills it in from the model).
    """

    def __init__(self, in_dim: int, dim: int = 8, temperature: float = 3.0, ramp_epochs: float = 80.0) -> None:
        super().__init__()
        in_dim = _checks.integer("in_dim", in_dim, 1)
        self.query = nn.Linear(in_dim, _checks.integer("dim", dim, 1), bias=False)
        self.key = nn.Linear(in_dim, dim, bias=False)
        self.temperature = _checks.number("temperature", temperature, positive=True)
        self.ramp_epochs = _checks.number("ramp_epochs", ramp_epochs, nonnegative=True)

    def attention(self, pooled: torch.Tensor) -> torch.Tensor:
        """a [B, p, p] among the peers from their pooled features [p, B, C]."""
        _checks.tensor("pooled", pooled, ndim=3)
        _checks.module_device("pooled", pooled, self)
        return peer_attention(self.query(pooled), self.key(pooled))

    def forward(self, branch_logits: torch.Tensor, pooled: torch.Tensor, epoch: float | None = None) -> torch.Tensor:
        """``branch_logits`` [m, B, K] (the last is the leader), ``pooled`` [m, B, C]."""
        _checks.tensor("branch_logits", branch_logits, ndim=3)
        if branch_logits.shape[0] < 3:
            raise ValueError(f"branch_logits must stack at least 3 branches (2 peers and a leader), "
                             f"got shape {tuple(branch_logits.shape)}")
        _checks.nonempty("branch_logits", branch_logits, dim=1)  # before the attention is computed
        loss = okddip_loss(branch_logits[:-1], branch_logits[-1], self.attention(pooled[:-1]), self.temperature)
        return loss if epoch is None else sigmoid_rampup(max(epoch - 1, 0), self.ramp_epochs) * loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ramp_epochs={self.ramp_epochs}"
