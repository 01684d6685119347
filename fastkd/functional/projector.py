"""Projector-based feature distillation: SRD (Miles & Mikolajczyk, "Understanding the Role of the
Projector in Knowledge Distillation", AAAI 2024, arXiv:2303.11098, 2023).

Values match the authors' code (roymiles/Simple-Recipe-Distillation); METHODS.md gives the
formula. fp16 / bf16 inputs are computed in fp32, and the loss comes back in fp32. Fewer than two
samples (an empty batch included) raise ``ValueError``: batch statistics need two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd._precision import upcast

__all__ = ["srd_loss"]

_SRD_MODES = ("feature", "correlation")
_BN_EPS = 1e-4


def _srd_mode(mode) -> str:
    if mode not in _SRD_MODES:
        raise ValueError(f"mode must be one of {_SRD_MODES}, got {mode!r}")
    return mode


def _srd_distance(s_hat: torch.Tensor, t_hat: torch.Tensor, alpha: float, mode: str) -> torch.Tensor:
    """The SRD loss on already normalised ``[B, D]`` features (see :func:`srd_loss`)."""
    if mode == "feature":
        return (s_hat - t_hat).abs().pow(alpha).sum().log()
    correlation = (s_hat * t_hat).mean(dim=0)
    return ((correlation - 1).abs().pow(alpha).sum() + 1e-5).log()


def srd_loss(z_s: torch.Tensor, z_t: torch.Tensor, alpha: float = 4.0, mode: str = "feature") -> torch.Tensor:
    """SRD representation loss (Miles & Mikolajczyk 2023) on the projected student feature.

    Both inputs are standardised per feature with the batch's statistics (biased variance, no
    affine: ``F.batch_norm(x, None, None, training=True, eps=1e-4)``), giving ŝ and t̂::

        mode="feature":      loss = log Σ_{b,d} |ŝ_bd − t̂_bd|^α                       (ResNet / ImageNet)
        mode="correlation":  c_d = (1/B) Σ_b ŝ_bd t̂_bd;  loss = log(Σ_d |c_d − 1|^α + 1e-5)    (DeiT)

    The authors' ImageNet recipe adds 2 · this loss to CE + KD; that weight 2 belongs to the
    recipe and is not applied here. The BatchNorm eps is the ImageNet code's 1e-4 in both modes
    (the authors' DeiT code uses 0, which current PyTorch rejects in training). The feature form
    is −inf when ŝ = t̂ exactly, as in the authors' code.

    Args:
        z_s: the student feature after the projector, ``[B, D]``, B ≥ 2.
        z_t: the teacher feature ``[B, D]``.
        alpha: the exponent α > 0 (authors: 4).
        mode: ``"feature"`` or ``"correlation"``.

    :class:`fastkd.SRDLoss` holds the projector and the BatchNorm layers (with running statistics).
    """
    alpha = _checks.number("alpha", alpha, positive=True)
    mode = _srd_mode(mode)
    _checks.pair_of("z_s", z_s, "z_t", z_t, ndim=2, same_shape=True)
    _checks.min_batch("z_s", z_s, 2, "batch statistics need two samples")
    s_hat = F.batch_norm(upcast(z_s), None, None, training=True, eps=_BN_EPS)
    t_hat = F.batch_norm(upcast(z_t), None, None, training=True, eps=_BN_EPS)
    return _srd_distance(s_hat, t_hat, alpha, mode)
