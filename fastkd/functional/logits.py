"""Logit distillation: KD (Hinton et al. 2015) and DKD (Zhao et al. 2022).

Precision: both losses compute in float32 at least. fp16 / bf16 logits are upcast before the
softmax and the loss comes back as a float32 0-dim tensor (float32 and float64 logits keep
their dtype), so the loss keeps its precision under AMP; the gradient reaches the logits in
their own dtype through the cast.

Both losses run on the backend :func:`fastkd.backends.choose` picks: the published computation
(``torch``) or the fused ops ``fastkd::kd_loss`` / ``fastkd::dkd_loss`` of :mod:`fastkd.ops.logits`
(native C++ on CPU tensors, Triton on CUDA tensors), which give the same values and gradients.
An empty batch (B = 0; the mean over it is 0/0) raises ``ValueError`` naming ``logits_s``.
"""
from __future__ import annotations

import torch

from fastkd import _checks
from fastkd.ops import logits as ops

__all__ = ["kd_loss", "dkd_loss", "hard_distillation_loss"]


def _check_logits(logits_s, logits_t) -> None:
    _checks.pair_of("logits_s", logits_s, "logits_t", logits_t, ndim=2, same_shape=True)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals, Dean 2015), as RepDistiller's ``DistillKL``.

    loss = T² · (1/B) Σ_b Σ_c p_t[b,c] (log p_t[b,c] − log p_s[b,c]),  p = softmax(z / T).

    ``logits_s``, ``logits_t``: [B, C] of one dtype and device, C ≥ 1 (a softmax over no class is no
    distribution: C = 0 is refused, on every backend). Returns a 0-dim tensor, float32 for fp16 / bf16
    logits (see the module docstring). Accurate at any T > 0 (at T ≥ 1e3 and for a student close to its
    teacher too, where the published form rounds to negative values): see :mod:`fastkd.ops.logits`.
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_logits(logits_s, logits_t)
    if logits_s.shape[1] < 1:
        raise ValueError(f"logits_s has 0 classes (shape {tuple(logits_s.shape)}); KD needs at least 1 class")
    return ops.kd(logits_s, logits_t, temperature)


def dkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang 2022), as mdistiller's ``dkd_loss``.

    With p = softmax(z / T), b = [p_gt, 1 − p_gt] and p̂ = softmax(z / T − 1000·onehot(gt)):

    loss = α·T²·(1/B) Σ_b KL(b_t ‖ b_s) + β·T²·(1/B) Σ_b KL(p̂_t ‖ p̂_s)    (TCKD + NCKD).

    log b comes from log-sum-exp, so a confident student (p_gt rounding to 1) gives a finite loss
    where mdistiller's log(1 − p_gt) is −inf; accurate at any T > 0, for a student close to its teacher
    and at logits of 1e4 (the teacher's gradient included). α, β ≥ 0. ``target``: int64 [B] in [0, C),
    C ≥ 2. mdistiller's
    warm-up factor min(epoch / 20, 1) is applied by :class:`fastkd.DKDLoss`, not here.
    """
    alpha = _checks.number("alpha", alpha, nonnegative=True)
    beta = _checks.number("beta", beta, nonnegative=True)
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_logits(logits_s, logits_t)
    batch, num_classes = logits_s.shape
    if num_classes < 2:
        raise ValueError(f"logits_s has {num_classes} class; DKD needs at least 2 (the target and another)")
    _checks.index("target", target, num_classes, shape=(batch,), device=logits_s.device)
    return ops.dkd(logits_s, logits_t, target, alpha, beta, temperature)


def hard_distillation_loss(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """DeiT's hard-label distillation (Touvron et al., "Training data-efficient image transformers &
    distillation through attention", ICML 2021): CE(z_s, argmax_c z_t), the cross entropy of the student's
    logits (its distillation token's, in DeiT) against the teacher's top class, mean over the batch, in fp32.
    DeiT weights it ½ beside ½ CE on the labels."""
    _check_logits(logits_s, logits_t)
    return torch.nn.functional.cross_entropy(logits_s.float(), logits_t.argmax(dim=1))
