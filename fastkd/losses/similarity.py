"""Batch-relation losses as drop-in modules: SP (and IUSP, its sequence form), CC, CCKD, RKD, PKT.

Each calls its function in :mod:`fastkd.functional.similarity`, which holds the formula.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.similarity import cc_loss, cckd_loss, iusp_loss, pkt_loss, rkd_loss, sp_loss
from fastkd.losses._registry import register, widths

__all__ = ["SPLoss", "IUSPLoss", "CCLoss", "CCKDLoss", "RKDLoss", "PKTLoss"]


@register("sp", takes=("last_block_s", "last_block_t"))
class SPLoss(nn.Module):
    """Similarity-preserving loss (Tung & Mori 2019); see :func:`fastkd.functional.sp_loss`.

    ``forward(f_s, f_t)`` takes two feature maps ``[B, ...]`` or two equal-length lists of them
    (summed). RepDistiller uses the last-stage map before pooling, weight 3000.
    """

    def forward(self, f_s, f_t) -> torch.Tensor:
        return sp_loss(f_s, f_t)


@register("iusp", takes=("frames_s", "frames_t"))
class IUSPLoss(nn.Module):
    """Intra-utterance similarity preservation (Chang et al. 2020), SP between the frames of each sequence; see
    :func:`fastkd.functional.iusp_loss` for the formula, what the paper does and what fastkd does.

    ``forward(f_s, f_t, lengths=None, mask=None)`` takes per-frame features ``[B, T, C_s]`` and ``[B, T, C_t]``
    and, for sequences of different lengths, their frame counts ``[B]`` or a bool mask ``[B, T]``. In a recipe
    (key ``iusp``) it takes the ``frames_s`` / ``frames_t`` features: a sequence model's last per-frame output.
    """

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return iusp_loss(f_s, f_t, lengths, mask)


class _EmbeddedPair(nn.Module):
    """Optional trainable embeds in front of a pair loss, as RepDistiller's ``LinearEmbed``:
    ``embed_s`` / ``embed_t`` = ``nn.Linear(dim, feat_dim)`` on the input flattened per sample.
    Without ``s_dim`` / ``t_dim`` the inputs are taken as the embeddings themselves.
    """

    def __init__(self, s_dim: int | None, t_dim: int | None, feat_dim: int) -> None:
        super().__init__()
        if (s_dim is None) != (t_dim is None):
            raise ValueError("give both s_dim and t_dim (to learn the embeds) or neither")
        if s_dim is None:
            self.embed_s = self.embed_t = None
            return
        feat_dim = _checks.integer("feat_dim", feat_dim, 1)
        self.embed_s = nn.Linear(_checks.integer("s_dim", s_dim, 1), feat_dim)
        self.embed_t = nn.Linear(_checks.integer("t_dim", t_dim, 1), feat_dim)

    def _embed(self, e_s, e_t) -> tuple[torch.Tensor, torch.Tensor]:
        if self.embed_s is None:
            return e_s, e_t
        _checks.pair_of("e_s", e_s, "e_t", e_t, min_ndim=2)
        _checks.module_device("e_s", e_s, self)
        _checks.width("e_s", e_s, self.embed_s.in_features, "s_dim")
        _checks.width("e_t", e_t, self.embed_t.in_features, "t_dim")
        return self.embed_s(e_s.flatten(1)), self.embed_t(e_t.flatten(1))


@register("cc", takes=("pooled_s", "pooled_t"), build=widths(), derived=("s_dim", "t_dim"))
class CCLoss(_EmbeddedPair):
    """Correlation congruence, RepDistiller's 'Correlation' form; see :func:`fastkd.functional.cc_loss`.

    Args:
        s_dim, t_dim: when given, the module owns ``embed_s`` = Linear(s_dim, feat_dim) and
            ``embed_t`` = Linear(t_dim, feat_dim) (trainable), applied to the flattened inputs, as
            RepDistiller does on the pooled features; otherwise ``forward`` takes the embeddings.
        feat_dim: the embedding width (RepDistiller: 128).

    ``forward(e_s, e_t)``, B ≥ 2. RepDistiller weight 0.02.
    """

    def __init__(self, s_dim: int | None = None, t_dim: int | None = None, feat_dim: int = 128) -> None:
        super().__init__(s_dim, t_dim, feat_dim)

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        return cc_loss(*self._embed(e_s, e_t))


@register("cckd", takes=("pooled_s", "pooled_t"), build=widths(), derived=("s_dim", "t_dim"))
class CCKDLoss(_EmbeddedPair):
    """Correlation congruence, the paper's Taylor-RBF form (Peng et al. 2019); see
    :func:`fastkd.functional.cckd_loss`.

    Args:
        gamma: the RBF's γ > 0. order: the Taylor order P ≥ 0.
        s_dim, t_dim, feat_dim: optional trainable embeds, as in :class:`CCLoss`.

    ``forward(e_s, e_t)``; the two embedding widths may differ when there are no embeds.
    """

    def __init__(self, gamma: float = 0.4, order: int = 2, s_dim: int | None = None,
                 t_dim: int | None = None, feat_dim: int = 128) -> None:
        super().__init__(s_dim, t_dim, feat_dim)
        self.gamma = _checks.number("gamma", gamma, positive=True)
        self.order = _checks.integer("order", order, 0)

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        return cckd_loss(*self._embed(e_s, e_t), gamma=self.gamma, order=self.order)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"


@register("rkd", takes=("pooled_s", "pooled_t"))
class RKDLoss(nn.Module):
    """Relational knowledge distillation (Park et al. 2019); see :func:`fastkd.functional.rkd_loss`.

    ``forward(f_s, f_t)`` on features ``[B, ...]``, B ≥ 2; RepDistiller weight 1 on top of
    w_dist = 25, w_angle = 50.
    """

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0) -> None:
        super().__init__()
        self.w_dist = _checks.number("w_dist", w_dist, nonnegative=True)
        self.w_angle = _checks.number("w_angle", w_angle, nonnegative=True)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return rkd_loss(f_s, f_t, w_dist=self.w_dist, w_angle=self.w_angle)

    def extra_repr(self) -> str:
        return f"w_dist={self.w_dist}, w_angle={self.w_angle}"


@register("pkt", takes=("pooled_s", "pooled_t"))
class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018); see :func:`fastkd.functional.pkt_loss`.

    ``forward(f_s, f_t)`` on features ``[B, D_s]``, ``[B, D_t]``; RepDistiller weight 30000.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = _checks.number("eps", eps, nonnegative=True)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return pkt_loss(f_s, f_t, eps=self.eps)
