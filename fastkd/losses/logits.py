"""Logit distillation modules: :class:`KDLoss` and :class:`DKDLoss` (formulas in
:mod:`fastkd.functional.logits`)."""
from __future__ import annotations

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.logits import dkd_loss, hard_distillation_loss, kd_loss
from fastkd.losses._registry import register

__all__ = ["KDLoss", "DKDLoss", "HardDistillationLoss"]


@register("kd", takes=("logits_s", "logits_t"))
class KDLoss(nn.Module):
    """Knowledge distillation (Hinton, Vinyals, Dean 2015), a drop-in for RepDistiller's ``DistillKL(T)``.

    loss = T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)); see :func:`fastkd.functional.kd_loss`.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = _checks.number("temperature", temperature, positive=True)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits_s, logits_t, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register("dkd", takes=("logits_s", "logits_t", "target", "epoch"), ramp="warmup")
class DKDLoss(nn.Module):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang 2022), as mdistiller's ``DKD``.

    loss = w · (α·TCKD + β·NCKD), see :func:`fastkd.functional.dkd_loss`; w = min(epoch / warmup, 1)
    when ``epoch`` is given (mdistiller's warm-up), else 1. ``epoch`` counts from 1, as mdistiller's trainer
    and fastkd's engine count: the first epoch is weighted 1/warmup.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 20) -> None:
        super().__init__()
        self.alpha = _checks.number("alpha", alpha, nonnegative=True)
        self.beta = _checks.number("beta", beta, nonnegative=True)
        self.temperature = _checks.number("temperature", temperature, positive=True)
        self.warmup = _checks.number("warmup", warmup, positive=True)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
                epoch: float | None = None) -> torch.Tensor:
        if epoch is not None and _checks.number("epoch", epoch) < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        loss = dkd_loss(logits_s, logits_t, target, self.alpha, self.beta, self.temperature)
        if epoch is None:
            return loss
        return min(epoch / self.warmup, 1.0) * loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, warmup={self.warmup}"


@register("deit", takes=("dist_logits_s", "logits_t"))
class HardDistillationLoss(nn.Module):
    """DeiT's hard-label distillation (Touvron et al. 2021): CE(z_dist, argmax z_t); see
    :func:`fastkd.functional.hard_distillation_loss`.

    In an objective, ``z_dist`` is the student's distillation-token logits when it has that token (timm's
    ``deit_*_distilled_*`` ViTs: the objective turns on their distilled training, so the class token
    learns from the labels and the distillation token from the teacher; evaluation averages the two
    heads, as DeiT does), else the student's logits (DeiT's hard distillation without the token).
    DeiT's weights: ½ CE + ½ this loss.
    """

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        return hard_distillation_loss(logits_s, logits_t)
