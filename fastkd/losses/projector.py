"""Projector-based feature distillation as a drop-in module: SRD."""
from __future__ import annotations

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.projector import _BN_EPS, _srd_distance, _srd_mode
from fastkd._precision import upcast
from fastkd.losses._registry import register, widths

__all__ = ["SRDLoss"]


def _pooled(name: str, f: torch.Tensor, width: int, owner: str) -> torch.Tensor:
    """``[B, C, H, W]`` → global average pool → ``[B, C]``; ``[B, C]`` as it is. C must be ``width``."""
    z = f.mean(dim=(2, 3)) if f.dim() == 4 else f
    if z.shape[1] != width:
        raise ValueError(f"{name} has {z.shape[1]} channels (shape {tuple(f.shape)}) but {owner} = {width}")
    return z


def _like_statistics(z: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """``z`` in the dtype of ``bn``'s running statistics: fp32 for an fp32 module under autocast."""
    return z.to(bn.running_mean.dtype)


@register("srd", takes=("pooled_s", "pooled_t"), build=widths(), derived=("s_dim", "t_dim"))
class SRDLoss(nn.Module):
    """SRD (Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge
    Distillation", AAAI 2024 / arXiv 2023): a linear projector on the student, BatchNorm without
    affine on both sides, then :func:`fastkd.functional.srd_loss`'s distance::

        mode="feature":      log Σ_{b,d} |BN_s(W z_s + b) − BN_t(z_t)|^α
        mode="correlation":  log(Σ_d |c_d − 1|^α + 1e-5),  c_d = (1/B) Σ_b ŝ_bd t̂_bd   (DeiT form)

    ``forward(f_s, f_t)`` takes the last-stage outputs ``[B, C, H, W]`` (global-average-pooled
    here, as the authors do) or already pooled features ``[B, C]``. The authors' ImageNet recipe
    weights this loss by 2 next to CE and KD (T = 1); the weight is not inside the loss.

    Attributes:
        projector: ``nn.Linear(s_dim, t_dim)`` with bias (trainable; give it to the optimizer).
        bn_s, bn_t: ``nn.BatchNorm1d(t_dim, eps=1e-4, affine=False)``. In training mode they
            normalise with the batch's statistics (B ≥ 2) and update their running statistics,
            so training values equal :func:`fastkd.functional.srd_loss` on the projected
            feature; in eval mode they use the running statistics, like any BatchNorm.
            They normalise in the dtype of their running statistics (fp32 for an fp32 module
            under autocast); the distance is summed in fp32 at least.

    Args:
        s_dim, t_dim: channels of the student's and the teacher's feature.
        alpha: exponent α > 0 (authors: 4). mode: ``"feature"`` or ``"correlation"``.
    """

    def __init__(self, s_dim: int, t_dim: int, alpha: float = 4.0, mode: str = "feature") -> None:
        super().__init__()
        s_dim = _checks.integer("s_dim", s_dim, 1)
        t_dim = _checks.integer("t_dim", t_dim, 1)
        self.alpha = _checks.number("alpha", alpha, positive=True)
        self.mode = _srd_mode(mode)
        self.projector = nn.Linear(s_dim, t_dim)
        self.bn_s = nn.BatchNorm1d(t_dim, eps=_BN_EPS, affine=False)
        self.bn_t = nn.BatchNorm1d(t_dim, eps=_BN_EPS, affine=False)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        _checks.pair_of("f_s", f_s, "f_t", f_t, ndim=(2, 4))
        _checks.module_device("f_s", f_s, self)
        if self.training:
            _checks.min_batch("f_s", f_s, 2, "BatchNorm in training mode needs batch statistics")
        z_s = self.projector(_pooled("f_s", f_s, self.projector.in_features, "s_dim"))
        z_t = _pooled("f_t", f_t, self.projector.out_features, "t_dim")
        s_hat = upcast(self.bn_s(_like_statistics(z_s, self.bn_s)))
        t_hat = upcast(self.bn_t(_like_statistics(z_t, self.bn_t)))
        return _srd_distance(s_hat, t_hat, self.alpha, self.mode)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mode={self.mode!r}"
