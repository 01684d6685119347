"""Logit distillation: KD (Hinton et al. 2015) and DKD (Zhao et al. 2022).

Precision: both losses compute in float32 at least. fp16 / bf16 logits are upcast before the
softmax and the loss comes back as a float32 0-dim tensor (float32 and float64 logits keep
their dtype), so the loss keeps its precision under AMP; the gradient reaches the logits in
their own dtype through the cast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd.functional._precision import upcast

__all__ = ["kd_loss", "dkd_loss"]

# mdistiller removes the target class from the NCKD softmax by subtracting 1000 from its z/T.
_TARGET_SHIFT = 1000.0


def _check_logits(logits_s, logits_t) -> None:
    _checks.pair_of("logits_s", logits_s, "logits_t", logits_t, ndim=2, same_shape=True)
    _checks.min_batch("logits_s", logits_s, 1, "the loss is a mean over the batch")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T, in float32 at least."""
    return upcast(logits) / temperature


def _kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over every entry, with p = exp(log p): KL(p ‖ q) summed over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals, Dean 2015), as RepDistiller's ``DistillKL``.

    loss = T² · (1/B) Σ_b Σ_c p_t[b,c] (log p_t[b,c] − log p_s[b,c]),  p = softmax(z / T).

    ``logits_s``, ``logits_t``: [B, C] of one dtype and device. Returns a 0-dim tensor, float32
    for fp16 / bf16 logits (see the module docstring).
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_logits(logits_s, logits_t)
    log_p_s = F.log_softmax(_scaled(logits_s, temperature), dim=1)
    log_p_t = F.log_softmax(_scaled(logits_t, temperature), dim=1)
    return _kl_sum(log_p_t, log_p_s) * temperature**2 / logits_s.shape[0]


def _binary_log_probs(z: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """[log p_gt, log(1 − p_gt)] per row, [B, 2], through log-sum-exp (never log of a rounded 1 − p).

    log p_gt = z_gt − lse(z);  log(1 − p_gt) = lse(z over the non-target classes) − lse(z).
    """
    lse_all = z.logsumexp(dim=1)
    lse_other = z.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    z_gt = z.gather(1, target.unsqueeze(1)).squeeze(1)
    return torch.stack([z_gt - lse_all, lse_other - lse_all], dim=1)


def _non_target_log_probs(z: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """log softmax(z − 1000·onehot(gt)): mdistiller's distribution over the non-target classes."""
    return F.log_softmax(z - _TARGET_SHIFT * is_target, dim=1)


def dkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang 2022), as mdistiller's ``dkd_loss``.

    With p = softmax(z / T), b = [p_gt, 1 − p_gt] and p̂ = softmax(z / T − 1000·onehot(gt)):

    loss = α·T²·(1/B) Σ_b KL(b_t ‖ b_s) + β·T²·(1/B) Σ_b KL(p̂_t ‖ p̂_s)    (TCKD + NCKD).

    log b comes from log-sum-exp, so a confident student (p_gt rounding to 1) gives a finite loss
    where mdistiller's log(1 − p_gt) is −inf. ``target``: int64 [B] in [0, C), C ≥ 2. mdistiller's
    warm-up factor min(epoch / 20, 1) is applied by :class:`fastkd.DKDLoss`, not here.
    """
    alpha = _checks.number("alpha", alpha)
    beta = _checks.number("beta", beta)
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_logits(logits_s, logits_t)
    batch, num_classes = logits_s.shape
    if num_classes < 2:
        raise ValueError(f"logits_s has {num_classes} class; DKD needs at least 2 (the target and another)")
    _checks.index("target", target, num_classes, shape=(batch,), device=logits_s.device)
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)
    tckd = _kl_sum(_binary_log_probs(z_t, target, is_target), _binary_log_probs(z_s, target, is_target))
    nckd = _kl_sum(_non_target_log_probs(z_t, is_target), _non_target_log_probs(z_s, is_target))
    scale = temperature**2 / batch
    return alpha * tckd * scale + beta * nckd * scale
